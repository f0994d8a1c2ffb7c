"""Stage extract: one split of one task into its feature cache.

DVC deletes nothing here (the cache is a persistent output), so a killed run resumes; when DVC
re-runs the stage because settings changed, the stale cache is replaced.
"""

import argparse
import logging

from pipeline.config import load_config
from pipeline.extract import extract_split
from stages import params, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--split", required=True, choices=["train", "val", "test"])
    parser.add_argument("--geobench-dir", help="GEO-Bench root (params.yaml geobench_root)")
    parser.add_argument("--backbone", help="DiffusionSat checkpoint root (params.yaml backbone)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = params("extract")
    paths = {k: v for k, v in (("geobench_dir", args.geobench_dir), ("pretrained_model_name_or_path", args.backbone)) if v}
    cfg = load_config(args.config, {**paths, **(p.get("overrides") or {})})
    result = extract_split(cfg, args.split, device=p.get("device"), replace_mismatched=True, progress=False)
    print(f"{result.path}: {result.extracted} of {result.num_samples} extracted in {result.seconds:.1f} s")


if __name__ == "__main__":
    run(main)
