"""How much each cache codec shrinks each map encoding, pooled vectors and the trajectory.

    python bench/compression_factors.py [--full-size] [--img-size 256] [--images 2]

Extracts a few demo images with a random DiffusionSat (the tiny one, or with ``--full-size``
SD-2.1's real UNet and VAE widths, written to a temporary folder), encodes the float16 maps as
each ``map_encoding`` would (bit rounding of the mantissa; uint8 with a per-image, per-channel
affine) and writes every array (and the segmentation task's label maps) with the cache's own
chunking (one chunk per image for maps, sharded; one chunk per shard otherwise). Factor = raw
bytes / stored chunk bytes (metadata and shard indexes left out: ``cache plan`` counts those
itself). Also prints each lossy encoding's relative L2 error and largest absolute error against
the float16 maps. ``cache plan`` keeps the factors it prints as constants
(pipeline/cache/planning.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import MemoryStore

from pipeline.cache.layout import CODECS, compressors

ENCODINGS = ["float16"] + [f"bitround-{k}" for k in range(1, 10)] + ["uint8"]


def bitround(x: np.ndarray, keep: int) -> np.ndarray:
    """float16 with the ``keep`` leading mantissa bits, rounded to nearest (ties to even)."""
    drop = 10 - keep
    bits = x.view(np.uint16).astype(np.uint32)
    half = (1 << (drop - 1)) - 1
    bits = (bits + ((bits >> drop) & 1) + half) & ~np.uint32((1 << drop) - 1)
    return bits.astype(np.uint16).view(np.float16)


def to_uint8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scales, decoded): x ~ offset + scale * q per image and channel."""
    x32 = x.astype(np.float32)
    lo, hi = x32.min(axis=(2, 3)), x32.max(axis=(2, 3))
    scale = np.where(hi > lo, (hi - lo) / 255, 1).astype(np.float32)
    q = np.clip(np.rint((x32 - lo[..., None, None]) / scale[..., None, None]), 0, 255).astype(np.uint8)
    decoded = lo[..., None, None] + scale[..., None, None] * q
    return q, np.stack([lo, scale], axis=-1), decoded


def stored_chunk_bytes(arrays: dict, codec: str, sharded: bool) -> int:
    """Bytes of the chunks (shard files less their index) of ``arrays`` written with ``codec``."""
    store = MemoryStore()
    group = zarr.open_group(store, mode="w", zarr_format=3)
    for name, x in arrays.items():
        shape = x.shape
        chunks = (1, *shape[1:]) if sharded else shape
        a = group.create_array(name, shape=shape, chunks=chunks, shards=shape if sharded else None,
                               dtype=x.dtype, compressors=compressors(codec))
        a[:] = x
    index = (len(next(iter(arrays.values()))) * 16 + 4) if sharded else 0  # (offset, nbytes) per chunk + crc32c
    return sum(len(v.to_bytes()) - index for k, v in store._store_dict.items() if not k.endswith("zarr.json"))


def error(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x)), float(np.abs(x - y).max())


def extract(full_size: bool, img_size: int, images: int, folder: Path):
    from pipeline.backbone.demo import build_demo_backbone
    from pipeline.backbone.loader import BackboneSpec, load_diffusionsat
    from pipeline.data.demo import DEMO_CLS_TASK, DEMO_SEG_TASK, build_demo_tasks
    from pipeline.data.geobench_task import GeoBenchSplit, TaskSource, collate
    from pipeline.extract.extractor import ExtractionSettings, FeatureExtractor

    build_demo_tasks(folder / "geobench", block_patches=2, max_grid=(6, 6))
    build_demo_backbone(folder / "backbone", img_size=img_size, full_size=full_size, with_metadata=False)
    model = load_diffusionsat(BackboneSpec(folder / "backbone", img_size), "cpu")
    extractor = FeatureExtractor(model, ExtractionSettings())
    source = TaskSource("demo", "classification", folder / "geobench", DEMO_CLS_TASK, ("04", "03", "02"), 4095.0,
                        img_size, 4)
    split = GeoBenchSplit(source, "train")
    seg = GeoBenchSplit(TaskSource("demo-seg", "segmentation", folder / "geobench", DEMO_SEG_TASK,
                                   ("04", "03", "02"), 4095.0, img_size, 4), "train")
    label_maps = np.stack([seg[i]["label"] for i in range(len(seg))])
    start = time.perf_counter()
    parts = [extractor(b["image"], b["name"]) for b in
             (collate([split[i]]) for i in range(images))]
    seconds = (time.perf_counter() - start) / images
    return parts, seconds, label_maps


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        parts, seconds, label_maps = extract(args.full_size, args.img_size, args.images, Path(tmp))
    maps = {f"{t}/{layer}": torch.cat([p.maps[t][layer] for p in parts]).numpy()
            for t in parts[0].maps for layer in parts[0].maps[t]}
    pooled = {f"{t}/{layer}": torch.cat([p.pooled[t][layer] for p in parts]).numpy()
              for t in parts[0].pooled for layer in parts[0].pooled[t]}
    trajectory = {t: torch.cat([p.trajectory[t] for p in parts]).numpy() for t in parts[0].trajectory}
    trajectory["latents"] = torch.cat([p.latents for p in parts]).numpy()
    raw = sum(x.nbytes for x in maps.values())
    print(f"{'full' if args.full_size else 'tiny'} backbone, {args.img_size} px, {args.images} images "
          f"({seconds:.1f} s each): {len(maps)} maps, {raw / args.images / 2**20:.2f} MiB float16 per image")

    results = {"backbone": "full" if args.full_size else "tiny", "img_size": args.img_size, "images": args.images,
               "float16_bytes_per_image": raw // args.images, "factors": {}, "errors": {}}
    for encoding in ENCODINGS:
        if encoding == "uint8":
            coded = {k: to_uint8(x) for k, x in maps.items()}
            arrays, decoded = {k: c[0] for k, c in coded.items()}, {k: c[2] for k, c in coded.items()}
            scales = {k: c[1] for k, c in coded.items()}
        elif encoding == "float16":
            arrays = decoded = maps
        else:
            arrays = {k: bitround(x, int(encoding.split("-")[1])) for k, x in maps.items()}
            decoded = arrays
        if encoding != "float16":
            errs = [error(maps[k], decoded[k]) for k in maps]
            results["errors"][encoding] = {"rel_l2_max": max(e[0] for e in errs), "abs_max": max(e[1] for e in errs)}
        for codec in CODECS:
            raw_coded = sum(x.nbytes for x in arrays.values())
            results["factors"].setdefault(codec, {})[encoding] = raw_coded / stored_chunk_bytes(arrays, codec, True)
            if encoding == "uint8":
                results["factors"][codec]["feature_scales"] = \
                    sum(x.nbytes for x in scales.values()) / stored_chunk_bytes(scales, codec, False)
    for codec in CODECS:
        results["factors"][codec]["label_maps"] = label_maps.nbytes / stored_chunk_bytes({"labels": label_maps}, codec, False)
        for name, group in (("pooled", pooled), ("trajectory", trajectory)):
            results["factors"][codec][name] = sum(x.nbytes for x in group.values()) / stored_chunk_bytes(group, codec, False)
    for codec, by in results["factors"].items():
        print(f"{codec:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in by.items()))
    for encoding, e in results["errors"].items():
        print(f"{encoding:<11} relative L2 {e['rel_l2_max']:.2e} (worst layer), max abs {e['abs_max']:.3g}")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
