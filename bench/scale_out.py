"""Scaling out, side by side: one comparison per part.

    python bench/scale_out.py [--part extract|probe|all] [--config configs/demo_cls_exp.yaml] [--split train]
                              [--train 2000 --eval 500 --seg-train 256 --seg-eval 64]

extract: the demo split extracted by one process and by two torchrun ranks (`extract --nproc 2`),
each into a fresh cache, each as the command a user runs (so the wall time holds the start-up of
every rank: Python, torch, the backbone). Prints the images/s of the extraction proper, the wall
time, the per-rank overhead (wall time less extraction time), and whether both stores hold every
shard with the same ledger counts. On a machine with fewer cores than ranks × threads, two ranks
split the same cores, so the gain is small or negative; the point is correctness and the overhead.

probe: the probe map here and on a 2-worker ``LocalCluster`` (``--scheduler processes``) on
synthetic caches, with the cluster's start-up and whether both maps are equal
(bench/scale_out_probe.py, which runs this part alone).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _demo import demo_paths  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = re.compile(r"(\d+) extracted.*, ([\d.]+) (img/s|s/img)$")


def extract_with(ranks: int, config: str, split: str, cache_dir: str, paths: dict) -> dict:
    """One extraction by ``ranks`` processes, as a user starts it; its figures."""
    command = [sys.executable, "-m", "cli", "extract", config, "--split", split, "--cache-dir", cache_dir,
               "--no-progress", *[f"--set={k}={v}" for k, v in paths.items()]]
    if ranks > 1:
        command += ["--nproc", str(ranks)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"extraction with {ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    line = done.stdout.strip().splitlines()[-1]  # "<cache>: N samples, N extracted by 2 ranks, R img/s"
    images, value, unit = RATE.search(line).groups()
    rate = float(value) if unit == "img/s" else 1 / float(value)
    return {"ranks": ranks, "cache": line.split(": ", 1)[0], "images": int(images), "images_per_s": rate,
            "wall_s": wall, "extract_s": int(images) / rate}


def compare_extraction(args) -> None:
    from pipeline.cache.reader import open_cache

    rows, ledgers, paths = [], [], demo_paths()
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            row = extract_with(ranks, args.config, args.split, tmp, paths)
            cache = open_cache(row["cache"])
            ledgers.append({k: cache.attrs["ledger"][k] for k in ("unet_passes", "vae_passes", "images_extracted")})
            row["complete"] = bool(cache.done.all())
        rows.append(row)
        print(f"{ranks} rank(s): {row['images']} images, {row['images_per_s']:.1f} img/s extracting "
              f"({row['extract_s']:.1f} s), {row['wall_s']:.1f} s wall, overhead {row['wall_s'] - row['extract_s']:.1f} s "
              f"({(row['wall_s'] - row['extract_s']) / ranks:.1f} s per rank); complete {row['complete']}")
    one, two = rows
    print(f"RESULT ranks1_images_per_s={one['images_per_s']:.2f} ranks2_images_per_s={two['images_per_s']:.2f} "
          f"speedup={two['images_per_s'] / one['images_per_s']:.2f} ranks1_wall_s={one['wall_s']:.1f} "
          f"ranks2_wall_s={two['wall_s']:.1f} same_ledger={ledgers[0] == ledgers[1]} "
          f"complete={one['complete'] and two['complete']} cores={len(os.sched_getaffinity(0))}")


def compare_probes(args) -> None:
    from scale_out_probe import probe_part

    probe_part(args.train, args.eval, args.seg_train, args.seg_eval)


PARTS = {"extract": compare_extraction, "probe": compare_probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--config", default="configs/demo_cls_exp.yaml")
    parser.add_argument("--split", default="train", help="the split extracted (extract)")
    parser.add_argument("--train", type=int, default=2000, help="training images (probe, classification)")
    parser.add_argument("--eval", type=int, default=500, help="val and test images each (probe, classification)")
    parser.add_argument("--seg-train", type=int, default=256, help="training images (probe, segmentation)")
    parser.add_argument("--seg-eval", type=int, default=64, help="val and test images each (probe, segmentation)")
    args = parser.parse_args()
    for name, compare in PARTS.items():
        if args.part in (name, "all"):
            print(f"== {name}")
            compare(args)


if __name__ == "__main__":
    main()
