"""Cache I/O per codec: bytes per image, ratio, write speed, a shuffled epoch's read speed through
the training read path, against reading the same bytes raw.

    python bench/cache_io.py [--cache cache/demo-landcover/train.zarr] [--batch 32]
    python bench/cache_io.py --real-size 32 --codecs blosc-lz4 none

Rewrites the cache's arrays with each codec (the cache layout: one chunk per image, sharded), then
reads one epoch of every feature map in shuffled batches with ``CacheBatches`` (the fit's read path:
direct shard reads, read-ahead on, preload off). The limit is the same float16 bytes stored as one
raw file per array and read whole with ``np.fromfile``. Every read is measured twice: warm (the
second read after writing and flushing, so from the page cache) and cold (the files' pages dropped with
``posix_fadvise`` first, so from the disk). For the first codec, the epoch is also read through zarr alone
(``direct_reads=False``), the path before direct reads, and with shard-aligned shuffling
(``shuffle_buffer_shards``: whole shards read in a random order, images shuffled within groups).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from pipeline.cache.batches import CacheBatches  # noqa: E402
from pipeline.cache.layout import feature_path  # noqa: E402
from pipeline.cache.reader import open_cache  # noqa: E402
from pipeline.cache.writer import CacheWriter  # noqa: E402


def copy_with_codec(source, path: str, codec: str) -> float:
    plan = dataclasses.replace(source.plan, codec=codec)
    writer = CacheWriter.create(path, source.request, plan)
    names = writer.array_paths()
    seconds = 0.0
    for shard in range(plan.num_shards):
        rows = slice(*plan.shard_range(shard))
        arrays = {name: source.root[name][rows] for name in names}
        start = time.perf_counter()
        writer.write_shard(shard, arrays)
        seconds += time.perf_counter() - start
    return seconds


def flush(root: str, drop: bool = False) -> None:
    """Write every file under ``root`` to disk (so that no write-back runs during a timed read);
    with ``drop``, also drop their pages from the page cache, so that the next read is from disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                if drop:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def epoch_read(cache, batch: int, nbytes: int, warm_up: bool = False, buffer_shards: int = 0) -> float:
    """MB/s of one shuffled epoch of every feature map through the training read path; with
    ``warm_up``, of a second epoch (the first one after a write runs up to 3x slower)."""
    batches = CacheBatches(cache, batch, shuffle=True, seed=0, buffer_shards=buffer_shards)
    for epoch in range(2 if warm_up else 1):
        start = time.perf_counter()
        for _ in batches.epoch(epoch):
            pass
    return nbytes / (time.perf_counter() - start) / 1e6


def synthetic_real_size(n: int) -> str:
    import numpy as np
    import torch

    from pipeline.backbone.demo import SD21_UNET_CONFIG
    from pipeline.backbone.layers import select_layers
    from pipeline.backbone.sat_unet import SatUNet
    from pipeline.extract.extractor import DEFAULT_LAYER_IDXS, layer_shapes
    from pipeline.synthetic import write_synthetic_cache

    with torch.device("meta"):
        unet = SatUNet(**{**SD21_UNET_CONFIG, "use_metadata": False})
    shapes = layer_shapes(unet, select_layers(unet, DEFAULT_LAYER_IDXS), latent_size=32, cond_dim=1024, device="meta")
    path = os.path.join(tempfile.mkdtemp(prefix="satdifuser-io-"), "train.zarr")
    write_synthetic_cache(path, np.arange(n) % 10, ("t47", "t45", "t40"), shapes, shard_size=8)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="cache/demo-landcover/train.zarr")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--codecs", nargs="+", default=["blosc-lz4", "blosc-zstd", "zstd", "none"])
    parser.add_argument("--buffer-shards", type=int, default=2, help="group size of the shard-aligned read")
    parser.add_argument("--real-size", type=int, metavar="N",
                        help="instead of --cache, a synthetic cache of N images with SD-2.1's 21 maps at 256 px (20 MiB "
                             "per image; random values, so its compression ratio means nothing, its speeds do)")
    args = parser.parse_args()
    if args.real_size:
        args.cache = synthetic_real_size(args.real_size)
    elif not os.path.exists(args.cache):
        sys.exit(f"error: --cache {args.cache} does not exist; run `make demo` (or `satdifuser extract`) first")
    source = open_cache(args.cache)
    n, plan = len(source), source.plan
    feats = [feature_path(t, l) for t in plan.timesteps for l in plan.layer_shapes]
    fp16 = sum(source.root[f].nbytes for f in feats)
    print(f"{args.cache}: {n} images, {len(feats)} feature arrays, {fp16 / 2**20:.1f} MiB float16 "
          f"({2 * fp16 / 2**20:.1f} MiB as float32)")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.cache))) as tmp:
        raw_dir = os.path.join(tmp, "raw")
        os.makedirs(raw_dir)
        raw_write_s = 0.0
        for i, f in enumerate(feats):
            data = source.root[f][...]
            start = time.perf_counter()
            data.tofile(os.path.join(raw_dir, f"{i}.bin"))
            raw_write_s += time.perf_counter() - start
        raw_write = fp16 / raw_write_s / 1e6

        def read_raw(repeat: int = 1) -> float:
            for _ in range(repeat):
                start = time.perf_counter()
                for i in range(len(feats)):
                    np.fromfile(os.path.join(raw_dir, f"{i}.bin"), dtype=np.float16)
            return fp16 / (time.perf_counter() - start) / 1e6

        flush(raw_dir)
        raw = {"warm": read_raw(repeat=2)}
        flush(raw_dir, drop=True)
        raw["cold"] = read_raw()
        print(f"{'raw files':>12}: write {raw_write:6.0f} MB/s, read {raw['warm']:6.0f} MB/s warm, "
              f"{raw['cold']:6.0f} MB/s cold (the limit)")
        results = {}
        for k, codec in enumerate(args.codecs):
            path = os.path.join(tmp, f"{codec}.zarr")
            write_s = copy_with_codec(source, path, codec)
            cache = open_cache(path)
            stored = sum(int(cache.root[f].nbytes_stored()) for f in feats)
            total = sum(int(cache.root[a].nbytes_stored()) for a in CacheWriter(cache.root, path, cache.plan).array_paths())
            flush(path)
            read = {"warm": epoch_read(cache, args.batch, fp16, warm_up=True)}
            flush(path, drop=True)
            read["cold"] = epoch_read(cache, args.batch, fp16)
            if k == 0:
                read["zarr"] = epoch_read(open_cache(path, direct_reads=False), args.batch, fp16, warm_up=True)
                read["zarr_shards"] = epoch_read(open_cache(path, direct_reads=False), args.batch, fp16, warm_up=True,
                                                 buffer_shards=args.buffer_shards)
                read["shards_warm"] = epoch_read(cache, args.batch, fp16, warm_up=True, buffer_shards=args.buffer_shards)
                flush(path, drop=True)
                read["shards_cold"] = epoch_read(cache, args.batch, fp16, buffer_shards=args.buffer_shards)
            results[codec] = (stored, read)
            through_zarr = (f"; shard-aligned ({args.buffer_shards} shards) {read['shards_warm']:5.0f} MB/s warm = "
                            f"{read['shards_warm'] / raw['warm']:.3f} x raw, {read['shards_cold']:5.0f} MB/s cold = "
                            f"{read['shards_cold'] / raw['cold']:.3f} x raw; through zarr alone {read['zarr']:5.0f} MB/s warm, "
                            f"shard-aligned {read['zarr_shards']:5.0f} MB/s warm"
                            if "zarr" in read else "")
            print(f"{codec:>12}: {total / n / 1024:7.1f} KiB/image, ratio {fp16 / stored:.3f} vs fp16, "
                  f"{2 * fp16 / stored:.3f} vs fp32; write {fp16 / write_s / 1e6:5.0f} MB/s; shuffled epoch read "
                  f"{read['warm']:5.0f} MB/s warm = {read['warm'] / raw['warm']:.3f} x raw, {read['cold']:5.0f} MB/s "
                  f"cold = {read['cold'] / raw['cold']:.3f} x raw{through_zarr}", flush=True)
    if args.real_size:
        import shutil

        shutil.rmtree(os.path.dirname(args.cache))
    default = args.codecs[0]
    print(f"RESULT raw_read_mb_s={raw['warm']:.0f} raw_cold_read_mb_s={raw['cold']:.0f} " + " ".join(
        f"{c}_ratio_fp32={2 * fp16 / s:.3f} {c}_read_mb_s={r['warm']:.0f} {c}_read_vs_raw={r['warm'] / raw['warm']:.3f} "
        f"{c}_cold_read_vs_raw={r['cold'] / raw['cold']:.3f}" for c, (s, r) in results.items())
        + f" {default}_zarr_read_mb_s={results[default][1]['zarr']:.0f}"
        + f" {default}_zarr_shards_read_mb_s={results[default][1]['zarr_shards']:.0f}"
        + f" {default}_shards_read_vs_raw={results[default][1]['shards_warm'] / raw['warm']:.3f}"
        + f" {default}_shards_cold_read_vs_raw={results[default][1]['shards_cold'] / raw['cold']:.3f}"
        + f" direct_vs_zarr={results[default][1]['warm'] / results[default][1]['zarr']:.1f}")


if __name__ == "__main__":
    main()
