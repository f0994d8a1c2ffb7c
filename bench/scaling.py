"""Scaling: extraction and a fit epoch at growing numbers of images, with each run's peak memory.

    python bench/scaling.py [--partitions 0.10x_train 0.20x_train 0.50x_train 1.00x_train]

Each size is the demo task's training partition of that fraction (55, 110, 275 and 550 images),
run in its own process so its peak resident memory (ru_maxrss) is its own: extract the three
splits into a fresh cache, then fit GW for one epoch reading the cache in streamed batches
(``preload_max_gb: 0``, the path whose memory is bounded by batch and shard size). Prints seconds
per image for the training split's extraction and for the epoch (the epoch includes one
evaluation of the fixed 175-image val split), and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def child(partition: str, device: str) -> None:
    import logging

    from _demo import demo_paths

    from pipeline.config import load_config
    from pipeline.extract.run import Extraction
    from pipeline.fit.run import fit

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("configs/demo_cls_exp.yaml", {
            **demo_paths(), "cache_dir": tmp, "partition": partition, "fuser": "gw", "max_train_epochs": 1,
            "preload_max_gb": 0, "eval_every_n_steps": None})
        extraction = Extraction(cfg, device)
        train = extraction.run("train", progress=False)
        for split in ("val", "test"):
            extraction.run(split, progress=False)
        start = time.perf_counter()
        m = fit(cfg, os.path.join(tmp, "fit"), device=device, progress=False)
        fit_s = time.perf_counter() - start
    print(json.dumps({"images": train.num_samples, "extract_s": train.seconds, "epoch_s": m["train_seconds"],
                      "fit_s": fit_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", nargs="+", default=["0.10x_train", "0.20x_train", "0.50x_train", "1.00x_train"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.device)
    rows = []
    for p in args.partitions:
        out = subprocess.run([sys.executable, __file__, "--child", p, "--device", args.device],
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['images']:>5} images: extraction {r['extract_s']:6.1f} s "
              f"({1000 * r['extract_s'] / r['images']:5.1f} ms/image), "
              f"epoch {r['epoch_s']:5.1f} s ({1000 * r['epoch_s'] / r['images']:5.1f} ms/image), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB",
              flush=True)
    first, last = rows[0], rows[-1]
    grow = last["images"] / first["images"]
    print(f"RESULT images_ratio={grow:.1f} extract_ratio={last['extract_s'] / first['extract_s']:.2f} "
          f"epoch_ratio={last['epoch_s'] / first['epoch_s']:.2f} "
          f"rss_ratio={last['peak_rss_mib'] / first['peak_rss_mib']:.2f} peak_rss_mib={last['peak_rss_mib']:.0f}")


if __name__ == "__main__":
    main()
