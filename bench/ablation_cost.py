"""What an ablation costs: fusers trained for E epochs from the cache against the same runs
recomputing features every batch (`--live`, the reference's way), and against features in memory.

    python bench/ablation_cost.py [--fusers gw lw moe] [--epochs 2 5 10] [--partition 0.20x_train]

First extracts the task's three splits into a temporary cache (timed: the one-off cost). Then per
fuser and E, three fits of the same seeded model on the same batches, each evaluating val once per
epoch and test once at the end:
  live    features recomputed through the backbone for every batch (VAE + 10 UNet passes per image)
  cached  features read from the Zarr cache for every batch (shuffled, with read-ahead)
  memory  the splits read once into memory, then trained on (what `fit` does by default when a
          split fits `preload_max_gb`; the cached run's compute floor)
Prints the wall times, live/cached (and its growth with E), cached/memory - 1 (the I/O overhead),
live against cached including the one-off extraction, and the share of training time spent
waiting for the next batch. A training partition keeps the live
runs affordable on a CPU; val and test are the task's full splits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _demo import demo_paths  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.extract.run import Extraction  # noqa: E402
from pipeline.fit.run import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo_cls_exp.yaml")
    parser.add_argument("--fusers", nargs="+", default=["gw", "lw", "moe"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[2, 5, 10])
    parser.add_argument("--partition", default="0.20x_train")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="satdifuser-ablation-")
    base = {**demo_paths(), "cache_dir": tmp, "partition": args.partition, "eval_every_n_steps": None,
            "early_stopping_patience": 10_000}
    start = time.perf_counter()
    extraction = Extraction(load_config(args.config, base), args.device)
    sizes = {split: extraction.run(split, progress=False).num_samples for split in ("train", "val", "test")}
    extract_s = time.perf_counter() - start
    print(f"extraction (one-off): {extract_s:.1f} s for {sizes}")

    modes = {"live": {"live": True, "preload_max_gb": 0}, "cached": {"preload_max_gb": 0}, "memory": {"preload_max_gb": 64}}
    rows = []
    for fuser in args.fusers:
        for epochs in args.epochs:
            seconds, wait = {}, {}
            for mode, opts in modes.items():
                cfg = load_config(args.config, {**base, "fuser": fuser, "max_train_epochs": epochs,
                                                "preload_max_gb": opts["preload_max_gb"]})
                with tempfile.TemporaryDirectory() as out:
                    t = time.perf_counter()
                    m = fit(cfg, out, device=args.device, source="live" if opts.get("live") else None, progress=False)
                    seconds[mode] = time.perf_counter() - t
                    wait[mode] = m["data_wait_seconds"] / m["train_seconds"]
            ratio, io = seconds["live"] / seconds["cached"], seconds["cached"] / seconds["memory"] - 1
            with_extract = seconds["live"] / (seconds["cached"] + extract_s)
            rows.append((fuser, epochs, seconds, ratio, io, with_extract, wait))
            print(f"{fuser:>4} E={epochs:<3} live {seconds['live']:7.1f} s  cached {seconds['cached']:6.1f} s  "
                  f"memory {seconds['memory']:6.1f} s  live/cached {ratio:5.2f}x  live/memory "
                  f"{seconds['live'] / seconds['memory']:5.2f}x  I/O overhead {100 * io:+5.1f} %  "
                  f"live/(cached+extraction) {with_extract:4.2f}x  data wait: cached {100 * wait['cached']:.1f} %, "
                  f"memory {100 * wait['memory']:.1f} % of training", flush=True)
    shutil.rmtree(tmp)
    summary = " ".join(f"{f}_E{e}_ratio={r:.2f} {f}_E{e}_memory_ratio={s['live'] / s['memory']:.2f} {f}_E{e}_io={io:.3f} "
                       f"{f}_E{e}_wait={w['cached']:.3f}" for f, e, s, r, io, _, w in rows)
    print(f"RESULT extract_s={extract_s:.1f} {summary}")


if __name__ == "__main__":
    main()
