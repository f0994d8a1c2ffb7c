"""Stage fit: one fuser + head trained on a task's caches for every partition x seed of the grid."""

import argparse
import json
import logging
from pathlib import Path

from pipeline.grid import fit_grid
from stages import params, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--fuser", required=True, choices=["gw", "lw", "moe"])
    parser.add_argument("--out", required=True, help="the runs' root: <out>/<partition>/seed<seed>/")
    parser.add_argument("--scores", required=True, help="JSON file of each run's test score, for dvc metrics")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = params("fit", args.params)
    scores = fit_grid(args.config, args.fuser, p.get("partitions", ["default"]), p.get("seeds", [42]), args.out,
                      p.get("overrides") or {}, p.get("device"))
    Path(args.scores).write_text(json.dumps(scores, indent=2) + "\n")
    print(f"{args.out}: {len(scores)} runs, test " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    run(main)
