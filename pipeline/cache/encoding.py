"""Lossy encodings of feature maps (``map_encoding``), applied as a shard is written.

- ``bitround-K``: float16 keeping the K leading of its 10 mantissa bits, rounded to nearest (ties
  to even), the rest zeroed. Still plain float16, so any zarr reader reads it as it is; the
  lossless codec packs the zeroed bits.
- ``uint8``: per image and channel, offset = min and scale = (max - min) / 255 over the map;
  q = round((x - offset) / scale), and x = offset + scale * q. The (offset, scale) pairs are the
  float32 array ``feature_scales/<t>/<layer>`` (N, C, 2). A constant channel has scale 0 and
  decodes exactly to its offset.

The error of every map is measured against the exact float16 maps as they are encoded, so the
numbers a cache records are those of the values its readers get back.
"""

from __future__ import annotations

import math

import numpy as np

from .layout import BITROUND, EXACT_ENCODING, feature_scale_path

MANTISSA_BITS = 10  # of float16
UINT8_DECODE = "x = offset + scale * q"
# Encoding and measuring go a block of rows at a time, so a real-size shard (64 images of up to
# 1280 x 32 x 32 values per array) never has a float32 copy of a whole array in memory.
BLOCK_VALUES = 1 << 22


def kept_bits(encoding: str) -> int | None:
    match = BITROUND.match(encoding)
    return int(match.group(1)) if match else None


def bitround(x: np.ndarray, keep: int) -> np.ndarray:
    """float16 ``x`` with only ``keep`` mantissa bits, rounded to nearest; NaN and inf pass unchanged,
    and a finite value that would round up to inf is truncated instead."""
    drop = MANTISSA_BITS - keep
    bits = np.ascontiguousarray(x, dtype=np.float16).view(np.uint16)
    half = np.uint16((1 << (drop - 1)) - 1)
    rounded = (bits + (((bits >> np.uint16(drop)) & np.uint16(1)) + half)) & np.uint16(0xFFFF << drop & 0xFFFF)
    out = rounded.astype(np.uint16).view(np.float16)
    overflow = np.isinf(out) & np.isfinite(x)
    if overflow.any():
        out[overflow] = (bits[overflow] & np.uint16(0xFFFF << drop & 0xFFFF)).view(np.float16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = x[nan]
    return out


def uint8_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q uint8 like ``x``, scales (N, C, 2) float32 of (offset, scale)) for (N, C, H, W) float16 ``x``."""
    values = x.astype(np.float32)
    low, high = values.min(axis=(2, 3)), values.max(axis=(2, 3))
    scale = (high - low) / np.float32(255)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.rint((values - low[:, :, None, None]) / safe[:, :, None, None])
    return np.clip(q, 0, 255).astype(np.uint8), np.stack([low, scale], axis=-1).astype(np.float32)


def uint8_decode(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float16 maps from uint8 ``q`` (N, C, H, W) and ``scales`` (N, C, 2): x = offset + scale * q."""
    offset, scale = scales[..., 0, None, None], scales[..., 1, None, None]
    return (offset + scale * q.astype(np.float32)).astype(np.float16)


def encode(encoding: str, exact: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    """(stored maps, scales or None, error sums or None) for the exact float16 maps of some rows.

    The error sums are ``{"max_abs", "sum_sq_err", "sum_sq", "images"}`` against ``exact``."""
    if encoding == EXACT_ENCODING:
        return exact, None, None
    keep = kept_bits(encoding)
    rows = max(1, BLOCK_VALUES // max(1, int(np.prod(exact.shape[1:]))))
    stored, scales, sums = [], [], {"max_abs": 0.0, "sum_sq_err": 0.0, "sum_sq": 0.0, "images": 0}
    for start in range(0, len(exact), rows):
        block = exact[start : start + rows]
        if keep is not None:
            coded = decoded = bitround(block, keep)
        else:
            coded, scale = uint8_encode(block)
            decoded = uint8_decode(coded, scale)
            scales.append(scale)
        stored.append(coded)
        sums = add_errors(sums, error_sums(block, decoded))
    return np.concatenate(stored), (np.concatenate(scales) if scales else None), sums


def error_sums(exact: np.ndarray, decoded: np.ndarray) -> dict:
    x = exact.astype(np.float64)
    err = decoded.astype(np.float64) - x
    return {"max_abs": float(np.abs(err).max()) if err.size else 0.0, "sum_sq_err": float(np.sum(err * err)),
            "sum_sq": float(np.sum(x * x)), "images": len(exact)}


def add_errors(a: dict | None, b: dict) -> dict:
    if not a:
        return dict(b)
    return {"max_abs": max(a["max_abs"], b["max_abs"]), "sum_sq_err": a["sum_sq_err"] + b["sum_sq_err"],
            "sum_sq": a["sum_sq"] + b["sum_sq"], "images": a["images"] + b["images"]}


def relative_l2(sums: dict) -> float:
    """sqrt(sum err^2) / sqrt(sum x^2) over every value the sums cover (0 for all-zero maps without error)."""
    if sums["sum_sq"] == 0:
        return 0.0 if sums["sum_sq_err"] == 0 else math.inf
    return math.sqrt(sums["sum_sq_err"] / sums["sum_sq"])


def array_attributes(encoding: str, label_key: str, layer: str) -> dict:
    """What a plain zarr user needs to read ``features/<label_key>/<layer>`` of a cache in ``encoding``."""
    if encoding == EXACT_ENCODING:
        return {}
    if encoding == "uint8":
        return {"encoding": "uint8", "decode": UINT8_DECODE, "scales": feature_scale_path(label_key, layer),
                "scales_layout": "(N, C, 2) float32: [..., 0] offset, [..., 1] scale, per image and channel"}
    drop = MANTISSA_BITS - kept_bits(encoding)
    return {"encoding": encoding, "decode": f"none: float16 with its {drop} trailing mantissa bits zeroed "
            "(rounded to nearest)"}
