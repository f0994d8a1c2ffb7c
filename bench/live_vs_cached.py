"""Wall time of one fit trained on cached features against the same fit recomputing them.

    python bench/live_vs_cached.py configs/demo_cls_exp.yaml --fuser gw --epochs 1

Both runs train the same seeded model on the same batches in the same order; the live run
recomputes every batch's features through the backbone (VAE + the UNet passes of the inversion),
as the reference does in every epoch and evaluation. Prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from pipeline.config import load_config
from pipeline.fit import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--fuser", default="gw")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Evaluate once per epoch and never stop early, so both runs do the same work.
    cfg = load_config(args.config, {"fuser": args.fuser, "max_train_epochs": args.epochs,
                                    "eval_every_n_steps": None, "early_stopping_patience": 10_000})
    seconds, metrics = {}, {}
    for mode in ("cached", "live"):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            metrics[mode] = fit(cfg, out, device=args.device, live=mode == "live", progress=False)
            seconds[mode] = time.perf_counter() - start
        print(f"{mode:>6}: {seconds[mode]:.1f} s for {args.epochs} epoch(s); "
              f"test {metrics[mode]['selection_metric']} {metrics[mode]['test'][metrics[mode]['selection_metric']]:.4f}")
    ratio = seconds["live"] / seconds["cached"]
    print(f"live / cached wall time: {ratio:.2f}x")
    print(f"RESULT epochs={args.epochs} fuser={args.fuser} cached_s={seconds['cached']:.1f} "
          f"live_s={seconds['live']:.1f} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
