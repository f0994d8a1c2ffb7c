"""Bytes and error of each map encoding, on the demo's activations and at SD-2.1's real size, and
what the lossy encodings change in the demo's probe-map and GW-fit metrics.

    python bench/map_encodings.py [--images 32] [--real-size-images 2] [--metrics]
        [--encodings float16,bitround-7,...] [--metric-encodings float16,bitround-5,uint8]

Bytes are those the cache writer stores for the maps tier (features and, for uint8, their scales)
with the default codec, as a fraction of the exact float16 maps on disk and of raw float16. The
errors are the ones the writer records: relative L2 (sqrt(sum err^2) / sqrt(sum x^2)) per
timestep and layer, the worst of them and over all maps, and the largest absolute error. The real
size is SD-2.1's UNet and VAE with random weights at 256 px (``build_demo_backbone(full_size=True)``,
3.5 GB written to a temporary folder), the default 21 layers x 3 timesteps, on demo images resized
to 256 px. ``--metrics`` extracts both demo tasks exactly, writes each lossy encoding from those
exact maps (what extraction with that encoding writes: it encodes the same maps), and runs the probe
map and a GW fit from every cache. Classification probes read the pooled vectors, which no map
encoding touches, so only the segmentation probe map is run per encoding.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _demo import demo_paths  # noqa: E402

DEFAULT_ENCODINGS = "float16,bitround-8,bitround-7,bitround-6,bitround-5,bitround-4,bitround-3,uint8"


def demo_config(exp: str, overrides: dict):
    from pipeline.config import load_config

    return load_config(f"configs/{exp}_exp.yaml", {"num_workers": 0, "device": "cpu", **overrides})


def activations(cfg, n: int) -> tuple[dict, dict]:
    """The exact float16 maps of the first ``n`` validation images, and their layer shapes."""
    import numpy as np

    from pipeline.data.geobench_task import GeoBenchSplit, collate
    from pipeline.extract.run import Extraction

    extraction = Extraction(cfg)
    dataset = GeoBenchSplit(extraction.source, "val")
    maps = {}
    for start in range(0, n, 4):
        batch = collate([dataset[i] for i in range(start, min(start + 4, n))])
        for t, by_layer in extraction.extractor(batch["image"], batch["name"]).maps.items():
            for layer, x in by_layer.items():
                maps.setdefault((t, layer), []).append(x.numpy())
    maps = {k: np.concatenate(v) for k, v in maps.items()}
    return maps, {layer: tuple(x.shape[1:]) for (_, layer), x in maps.items()}


def measure(maps: dict, shapes: dict, encoding: str, folder: Path) -> dict:
    """Write the maps as a maps-only cache in ``encoding``; its bytes and recorded errors."""
    import numpy as np

    from pipeline.cache.audit import cache_info
    from pipeline.cache.layout import CachePlan, feature_path
    from pipeline.cache.reader import open_cache
    from pipeline.cache.writer import CacheWriter

    n = len(next(iter(maps.values())))
    timesteps = tuple(dict.fromkeys(t for t, _ in maps))
    plan = CachePlan(num_samples=n, shard_size=n, timesteps=timesteps, layer_shapes=shapes, latent_shape=(4, 1, 1),
                     label_shape=(), label_dtype="int64", tiers=("maps",), map_encoding=encoding)
    path = str(folder / f"{encoding}.zarr")
    writer = CacheWriter.create(path, {"backbone": {"id": "bench"}, "extraction": {"map_encoding": encoding}, "dataset": {}},
                                plan)
    arrays = {feature_path(t, layer): x for (t, layer), x in maps.items()}
    start = time.perf_counter()
    writer.write_shard(0, {**arrays, "labels": np.zeros(n, dtype=np.int64),
                           "sample_names": np.array([str(i) for i in range(n)])})
    seconds = time.perf_counter() - start
    info = cache_info(open_cache(path))
    out = {"bytes": info["feature_bytes_on_disk"], "raw": info["feature_bytes_raw_fp16"], "write_s": seconds}
    sums = open_cache(path).attrs.get("map_error", {})
    if sums:
        total_err = sum(s["sum_sq_err"] for s in sums.values())
        total = sum(s["sum_sq"] for s in sums.values())
        out.update(worst=info["map_error"]["worst"], overall=math.sqrt(total_err / total),
                   max_abs=info["map_error"]["max_abs"])
    return out


def table(title: str, maps: dict, shapes: dict, encodings: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {e: measure(maps, shapes, e, Path(tmp)) for e in encodings}
    exact = results["float16"]["bytes"]
    n = len(next(iter(maps.values())))
    print(f"\n{title}: {n} images, {len(shapes)} layers x {len({t for t, _ in maps})} timesteps, "
          f"{results['float16']['raw'] / n / 2**20:.2f} MiB raw float16 per image")
    print("| encoding | KiB per image | vs float16 on disk | vs raw float16 | rel. L2, worst layer | rel. L2, all maps "
          "| max abs error | write s |")
    print("|---|---|---|---|---|---|---|---|")
    for e, r in results.items():
        err = (f"{100 * r['worst']['rel_l2']:.3f} % ({r['worst']['layer']}) | {100 * r['overall']:.3f} % | "
               f"{r['max_abs']:.4g}") if "worst" in r else "0 (exact) | 0 | 0"
        print(f"| `{e}` | {r['bytes'] / n / 1024:.1f} | {100 * r['bytes'] / exact:.1f} % | {100 * r['bytes'] / r['raw']:.1f} % "
              f"| {err} | {r['write_s']:.2f} |")


def real_size_config(n: int, tmp: Path):
    from pipeline.backbone.demo import build_demo_backbone

    paths = demo_paths()
    build_demo_backbone(tmp / "backbone", img_size=256, full_size=True)
    return demo_config("demo_cls", {**paths, "pretrained_model_name_or_path": str(tmp / "backbone"), "img_size": 256,
                                    "extract_batch_size": n})


# ---- metric deltas on the demo -------------------------------------------------------------------


def transcode(exact_dir: Path, out_dir: Path, encoding: str) -> None:
    """Write every split of ``exact_dir`` again with its maps in ``encoding``, shard by shard."""
    import numpy as np

    from pipeline.cache.layout import feature_path, pooled_path, trajectory_path
    from pipeline.cache.reader import open_cache
    from pipeline.cache.writer import CacheWriter

    for split in ("train", "val", "test"):
        exact = open_cache(str(exact_dir / f"{split}.zarr"))
        plan = type(exact.plan)(**{**exact.plan.__dict__, "map_encoding": encoding})
        request = {**exact.request, "extraction": {**exact.request["extraction"], "map_encoding": encoding}}
        info = {k: v for k, v in exact.attrs.items() if k not in ("format_version", "request", "plan", "created")}
        writer = CacheWriter.create(str(out_dir / f"{split}.zarr"), request, plan, info)
        for shard in range(plan.num_shards):
            rows = list(range(*plan.shard_range(shard)))
            arrays = {"latents": exact.latents(rows).numpy(), "labels": exact.labels(rows).numpy(),
                      "sample_names": np.asarray([exact.sample_names[r] for r in rows], dtype=object)}
            for t in plan.timesteps:
                arrays[trajectory_path(t)] = exact.trajectory(rows, [t])[t].numpy()
                feats, pooled = exact.features(rows, [t]), exact.pooled(rows, [t])
                for layer in plan.layer_shapes:
                    arrays[feature_path(t, layer)] = feats[t][layer].numpy()
                    arrays[pooled_path(t, layer)] = pooled[t][layer].numpy()
            writer.write_shard(shard, arrays)


def metric_deltas(encodings: list[str]) -> None:
    from pipeline.extract.run import Extraction
    from pipeline.fit.run import fit
    from pipeline.probe.map import ProbeSettings
    from pipeline.probe.run import run_probe

    paths = demo_paths()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for exp in ("demo_cls", "demo_seg"):
            cfg = demo_config(exp, {**paths, "cache_dir": str(tmp / "float16")})
            start = time.perf_counter()
            extraction = Extraction(cfg)
            for split in ("train", "val", "test"):
                extraction.run(split, progress=False)
            print(f"extracted {cfg.dataset_name} exactly in {time.perf_counter() - start:.0f} s", flush=True)
            exact_dir = Path(cfg.cache_path("train")).parent
            for encoding in encodings:
                root = tmp / encoding
                if encoding != "float16":
                    transcode(exact_dir, root / cfg.dataset_name, encoding)
                row = {"task": cfg.dataset_name, "encoding": encoding}
                if exp == "demo_seg":
                    start = time.perf_counter()
                    probe = run_probe(root / cfg.dataset_name, tmp / "probe" / encoding, ProbeSettings())
                    row["probe"] = probe["best_layer"]["test"], probe["all"]["test"]
                    row["probe_s"] = time.perf_counter() - start
                lossy = demo_config(exp, {**paths, "cache_dir": str(root), "map_encoding": encoding})
                start = time.perf_counter()
                metrics = fit(lossy, tmp / "fit" / exp / encoding, device="cpu", progress=False)
                row["fit"] = metrics["test"][metrics["selection_metric"]]
                row["fit_metric"] = metrics["selection_metric"]
                row["fit_s"] = time.perf_counter() - start
                rows.append(row)
                print(row, flush=True)
    print("\n| task | encoding | probe map test mIoU, best layer / all | Δ (points) | GW fit test | Δ (points) |")
    print("|---|---|---|---|---|---|")
    base = {r["task"]: r for r in rows if r["encoding"] == "float16"}
    for r in rows:
        b = base[r["task"]]
        probe = (f"{r['probe'][0]:.4f} / {r['probe'][1]:.4f} | {100 * (r['probe'][0] - b['probe'][0]):+.2f} / "
                 f"{100 * (r['probe'][1] - b['probe'][1]):+.2f}") if "probe" in r else "pooled vectors: unchanged | 0"
        print(f"| {r['task']} | `{r['encoding']}` | {probe} | {r['fit_metric']} {r['fit']:.4f} | "
              f"{100 * (r['fit'] - b['fit']):+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="demo validation images (128 px)")
    parser.add_argument("--real-size-images", type=int, default=2, help="images at SD-2.1 size, 256 px (0: skip)")
    parser.add_argument("--encodings", default=DEFAULT_ENCODINGS)
    parser.add_argument("--metrics", action="store_true", help="also the demo's probe-map and GW-fit metric deltas")
    parser.add_argument("--metric-encodings", default="float16,bitround-5,bitround-4,uint8")
    args = parser.parse_args()
    import torch

    torch.set_flush_denormal(True)
    encodings = args.encodings.split(",")
    if args.images:
        maps, shapes = activations(demo_config("demo_cls", demo_paths()), args.images)
        table("demo backbone, 128 px", maps, shapes, encodings)
    if args.real_size_images:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            cfg = real_size_config(args.real_size_images, Path(tmp))
            maps, shapes = activations(cfg, args.real_size_images)
            print(f"(real-size activations computed in {time.perf_counter() - start:.0f} s)")
        table("SD-2.1 size (random weights), 256 px", maps, shapes, encodings)
    if args.metrics:
        metric_deltas(args.metric_encodings.split(","))


if __name__ == "__main__":
    main()
