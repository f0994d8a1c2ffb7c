"""Wall time of one fit from each feature source, side by side: the stored maps, the maps
recomputed from the stored trajectory, and live.

    python bench/live_vs_cached.py configs/demo_cls_exp.yaml --fuser gw --epochs 1 [--partition 0.20x_train]

The splits are extracted first into a temporary cache (a demo config runs on `make demo`'s task
and backbone, or on ones built for the run).

All runs train the same seeded model on the same batches in the same order; the trajectory run
recomputes every batch's maps with one UNet pass per saved timestep, the live run through the whole
backbone (VAE + the UNet passes of the inversion), as the reference does in every epoch and
evaluation. Prints each fit's time, the time per training image and epoch (the fit's wall time,
evaluations included, over the training images it saw) and the ratios to the maps.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _demo import demo_paths  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.extract.run import Extraction  # noqa: E402
from pipeline.fit.run import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--fuser", default="gw")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--partition", default="default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Evaluate once per epoch and never stop early, so every run does the same work.
    overrides = {"fuser": args.fuser, "max_train_epochs": args.epochs, "eval_every_n_steps": None,
                 "early_stopping_patience": 10_000, "partition": args.partition,
                 "cache_dir": tempfile.mkdtemp(prefix="satdifuser-sources-")}
    cfg = load_config(args.config, {**(demo_paths() if "demo" in Path(args.config).name else {}), **overrides})
    extraction = Extraction(cfg, args.device)
    for split in ("train", "val", "test"):
        extraction.run(split, progress=False)
    seconds, per_image = {}, {}
    for source in ("maps", "trajectory", "live"):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            metrics = fit(cfg, out, device=args.device, source=source, progress=False)
            seconds[source] = time.perf_counter() - start
        per_image[source] = seconds[source] / metrics["train_images_seen"]
        select, ledger = metrics["selection_metric"], metrics["ledger"]
        print(f"{source:>10}: {seconds[source]:.1f} s for {args.epochs} epoch(s), {per_image[source]:.4f} s per training "
              f"image and epoch; {ledger['unet_passes']} UNet and {ledger['vae_passes']} VAE passes; "
              f"test {select} {metrics['test'][select]:.4f}")
    print(f"wall time over the maps': trajectory {seconds['trajectory'] / seconds['maps']:.2f}x, "
          f"live {seconds['live'] / seconds['maps']:.2f}x")
    print(f"RESULT epochs={args.epochs} fuser={args.fuser} " + " ".join(
        f"{s}_s={seconds[s]:.1f} {s}_per_image_s={per_image[s]:.4f}" for s in seconds)
        + f" trajectory_ratio={seconds['trajectory'] / seconds['maps']:.2f} live_ratio={seconds['live'] / seconds['maps']:.2f}")


if __name__ == "__main__":
    main()
