"""Reading a cache's feature maps with dask: one shard per chunk (``FeatureCache.to_dask``) against
zarr's inner chunk, one image (what ``dask.array.from_zarr`` takes when given no ``chunks``).

    python bench/dask_reads.py [--cache cache/demo-landcover/train.zarr] [--repeats 3]

Without ``--cache``, extracts the demo classification task's train split into a temporary folder
first. Each way sums every feature map of the cache in float64 on dask's threaded scheduler, after
one untimed pass that warms the page cache; both sums must agree.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _demo import demo_paths  # noqa: E402

from pipeline.cache.reader import open_cache  # noqa: E402


def feature_sums(arrays: dict) -> tuple[float, int]:
    """(sum of every feature map, tasks in the graph)."""
    import dask
    import dask.array as da

    total = da.stack([a.astype(np.float64).sum() for name, a in arrays.items() if name.startswith("features/")]).sum()
    tasks = len(dict(total.__dask_graph__()))
    return float(dask.compute(total, scheduler="threads")[0]), tasks


def timed(arrays: dict, repeats: int) -> tuple[float, float, int]:
    feature_sums(arrays)  # warm
    best, value, tasks = float("inf"), 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        value, tasks = feature_sums(arrays)
        best = min(best, time.perf_counter() - start)
    return best, value, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.cache or extract_demo(tmp)
        measure(path, args.repeats)


def extract_demo(folder: str) -> str:
    from pipeline.config import load_config
    from pipeline.extract.run import Extraction

    cfg = load_config("configs/demo_cls_exp.yaml", {**demo_paths(), "cache_dir": folder})
    return Extraction(cfg, "cpu").run("train", progress=False).path


def measure(path: str, repeats: int) -> None:
    import dask.array as da

    cache = open_cache(path)
    shards = cache.to_dask()
    images = {name: da.from_zarr(cache.array(name)) if name.startswith("features/") else a
              for name, a in shards.items()}
    maps = [n for n in shards if n.startswith("features/")]
    per_shard, shard_sum, shard_tasks = timed(shards, repeats)
    per_image, image_sum, image_tasks = timed(images, repeats)
    np.testing.assert_allclose(shard_sum, image_sum, rtol=1e-9)
    print(f"{path}: {len(cache)} images, {len(maps)} feature arrays, shard size {cache.plan.shard_size}")
    print(f"  chunks per array: {shards[maps[0]].numblocks[0]} (one per shard) vs {images[maps[0]].numblocks[0]} "
          "(one per image)")
    print(f"  sum of every map: {per_shard:.3f} s with shard chunks ({shard_tasks} tasks), {per_image:.3f} s with "
          f"image chunks ({image_tasks} tasks): {per_image / per_shard:.1f}x")
    print(f"RESULT shard_chunks_s={per_shard:.3f} image_chunks_s={per_image:.3f} speedup={per_image / per_shard:.1f} "
          f"shard_tasks={shard_tasks} image_tasks={image_tasks}")


if __name__ == "__main__":
    main()
