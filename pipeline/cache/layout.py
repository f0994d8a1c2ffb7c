"""The Zarr v3 layout of a feature cache: the contract between extraction and every reader.

::

    <split>.zarr/
      attrs["satdifuser"]      provenance (format, backbone fingerprint, extraction, dataset)
      features/<tNN>/<layer>   (N, C, H, W) float16, one chunk per image, sharded along N
      pooled/<tNN>/<layer>     (N, C) float32, spatial mean
      trajectory/<tNN>         (N, 4, h, w) float32, the UNet input x_t of that label's pass
      latents                  (N, 4, h, w) float32
      labels                   (N,) int64 | (N, K) uint8 | (N, H, W) uint8
      sample_names             (N,) str
      done                     (N,) bool, written last for each shard

A unit of work is one shard of ``shard_size`` images; every array is chunked so that a unit
touches whole shards only, and ``done`` has one chunk per unit, so marking it is one atomic
write.
"""

from __future__ import annotations

from dataclasses import dataclass

import zarr.codecs as zc

FORMAT_VERSION = 1
ATTRS_KEY = "satdifuser"

# Lossless codecs on inner chunks; crc32c lets `cache verify` catch corrupted bytes.
CODECS = {
    "blosc-zstd": lambda: [zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc-lz4": lambda: [zc.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "zstd": lambda: [zc.ZstdCodec(level=1)],
    "none": lambda: [],
}


def compressors(name: str) -> list:
    if name not in CODECS:
        raise ValueError(f"codec {name!r} is not one of {list(CODECS)}")
    return CODECS[name]() + [zc.Crc32cCodec()]


def feature_path(label_key: str, layer: str) -> str:
    return f"features/{label_key}/{layer}"


def pooled_path(label_key: str, layer: str) -> str:
    return f"pooled/{label_key}/{layer}"


def trajectory_path(label_key: str) -> str:
    return f"trajectory/{label_key}"


@dataclass(frozen=True)
class CachePlan:
    """Shapes of everything a cache holds; derived from the backbone, settings and dataset."""

    num_samples: int
    shard_size: int
    timesteps: tuple[str, ...]  # label keys, e.g. ("t47", "t45", "t40")
    layer_shapes: dict  # layer -> (C, H, W)
    latent_shape: tuple[int, int, int]
    label_shape: tuple[int, ...]  # per sample: () | (K,) | (H, W)
    label_dtype: str
    codec: str = "blosc-lz4"

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def to_attrs(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            "timesteps": list(self.timesteps),
            "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            "latent_shape": list(self.latent_shape),
            "label_shape": list(self.label_shape),
            "label_dtype": self.label_dtype,
            "codec": self.codec,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> "CachePlan":
        return cls(
            attrs["num_samples"], attrs["shard_size"], tuple(attrs["timesteps"]),
            {k: tuple(v) for k, v in attrs["layer_shapes"].items()}, tuple(attrs["latent_shape"]),
            tuple(attrs["label_shape"]), attrs["label_dtype"], attrs["codec"],
        )
