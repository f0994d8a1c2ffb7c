"""Compare the cache codecs on real cached features: ratio, write and read speed.

    python bench/codecs.py cache/demo-landcover/train.zarr [--images 256]

Every codec writes the same features (all timesteps x layers of the first N images) into a
fresh store with the cache's own layout (one chunk per image, shards of the cache's size), then
reads them back. Ratio is raw float16 bytes over bytes on disk.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import zarr

from pipeline.cache.layout import CODECS, compressors, feature_path
from pipeline.cache.reader import open_cache


def measure(name: str, data: dict, shard: int, root: str) -> dict:
    group = zarr.open_group(f"{root}/{name}.zarr", mode="w")
    arrays = {}
    for path, x in data.items():
        arrays[path] = group.create_array(
            path, shape=x.shape, chunks=(1, *x.shape[1:]), shards=(shard, *x.shape[1:]),
            dtype=x.dtype, compressors=compressors(name),
        )
    start = time.perf_counter()
    for path, x in data.items():
        arrays[path][:] = x
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    for path, x in data.items():
        assert np.array_equal(arrays[path][:], x), f"{name} is not lossless on {path}"
    read_s = time.perf_counter() - start
    raw = sum(x.nbytes for x in data.values())
    disk = sum(a.nbytes_stored() for a in arrays.values())
    mb = raw / 1e6
    return {"codec": name, "ratio": raw / disk, "write_MBps": mb / write_s, "read_MBps": mb / read_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--largest", action="store_true", help="only the layers with the largest maps")
    args = parser.parse_args()
    cache = open_cache(args.cache)
    n = min(args.images, len(cache))
    layers = cache.layers
    if args.largest:
        size = max(math.prod(s) for s in cache.layer_shapes.values())
        layers = [l for l, s in cache.layer_shapes.items() if math.prod(s) == size]
    data = {feature_path(t, l): cache.root[feature_path(t, l)][:n] for t in cache.timesteps for l in layers}
    raw_mb = sum(x.nbytes for x in data.values()) / 1e6
    print(f"{n} images, {len(data)} arrays, {raw_mb:.1f} MB of float16 features from {args.cache}")
    with tempfile.TemporaryDirectory() as root:
        rows = [measure(name, data, cache.plan.shard_size, root) for name in CODECS]
    print(f"{'codec':<12}{'ratio':>8}{'write MB/s':>12}{'read MB/s':>12}")
    for r in rows:
        print(f"{r['codec']:<12}{r['ratio']:>8.3f}{r['write_MBps']:>12.0f}{r['read_MBps']:>12.0f}")
    print("RESULT " + " ".join(f"{r['codec']}_ratio={r['ratio']:.3f} {r['codec']}_write_MBps={r['write_MBps']:.0f} "
                                f"{r['codec']}_read_MBps={r['read_MBps']:.0f}" for r in rows))


if __name__ == "__main__":
    main()
