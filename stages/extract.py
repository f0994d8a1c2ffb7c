"""Stage extract: one split of one task into its feature cache.

DVC deletes nothing here (the cache is a persistent output), so a killed run resumes; when DVC
re-runs the stage because settings changed, the stale cache is replaced.
"""

import argparse
import logging
import os

from pipeline.config import ConfigError, load_config
from pipeline.extract import extract_split
from stages import params, run, task_entries


def check_declared_output(config: str, cfg, split: str) -> None:
    """dvc.yaml declares ``cache/<dataset>/<split>.zarr`` from the params.yaml ``tasks`` entry of
    this config; the extraction writes ``cfg.cache_path(split)``. Both must be the same place, or
    DVC would track an empty output and the cache would lie where nothing looks for it."""
    for entry in task_entries(config):
        declared = f"cache/{entry.get('dataset')}/{split}.zarr"
        if entry.get("dataset") != cfg.dataset_name:
            raise ConfigError(
                f"params.yaml tasks entry {entry}: dataset {entry.get('dataset')!r}, but {config} has dataset_name "
                f"{cfg.dataset_name!r}: the extraction would write {cfg.cache_path(split)} where dvc.yaml expects "
                f"{declared}; make the entry's dataset {cfg.dataset_name!r}")
        if os.path.abspath(declared) != os.path.abspath(cfg.cache_path(split)):
            raise ConfigError(
                f"{config}: cache_dir {cfg.cache_dir!r} puts the cache at {cfg.cache_path(split)}, but dvc.yaml "
                f"declares {declared} (params.yaml tasks entry {entry}); leave cache_dir at 'cache' under DVC")


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
    check_declared_output(args.config, cfg, args.split)
    result = extract_split(cfg, args.split, device=p.get("device"), replace_mismatched=True, progress=False)
    print(f"{result.path}: {result.extracted} of {result.num_samples} extracted in {result.seconds:.1f} s")


if __name__ == "__main__":
    run(main)
