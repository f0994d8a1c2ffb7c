"""Stage fit: one fuser + head trained on a task's caches."""

import argparse
import logging

from pipeline.config import load_config
from pipeline.fit import fit
from stages import params, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--fuser", required=True, choices=["gw", "lw", "moe"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, help="training seed (default: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = params("fit")
    chosen = {"fuser": args.fuser} | ({"seed": args.seed} if args.seed is not None else {})
    cfg = load_config(args.config, {**(p.get("overrides") or {}), **chosen})
    metrics = fit(cfg, args.out, device=p.get("device"), progress=False)
    print(f"{args.out}: test {metrics['selection_metric']} {metrics['test'][metrics['selection_metric']]:.4f}")


if __name__ == "__main__":
    run(main)
