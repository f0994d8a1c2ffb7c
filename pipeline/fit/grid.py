"""Fits over GEO-Bench partitions and seeds: the runs of one task and fuser that a grid names, each
in ``<root>/<partition>/seed<seed>/``, those already done skipped.

A run is done when its folder holds ``metrics.json`` and its ``run.json`` records the same digest
of inputs (``pipeline.fit.run.fit_inputs``) as the run asked now, so adding a seed or a partition runs
only the new fits, and a changed setting, cache or code runs them all again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ConfigError, load_config
from ..outputs import check_replaceable, output_folder
from .run import FIT_OUTPUTS, fit, plan_fit

log = logging.getLogger(__name__)


def run_dir(root: str | Path, partition: str, seed: int) -> Path:
    return Path(root) / partition / f"seed{seed}"


def done_score(out: Path, inputs: str) -> float | None:
    """The test score of the run in ``out`` when it was made from ``inputs``, else None."""
    try:
        run = json.loads((out / "run.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):  # absent, or cut short: not done
        return None
    return metrics.get("test_score") if run.get("inputs_sha256") == inputs else None


def check_grid(partitions, seeds, where: str = "params.yaml fit") -> None:
    if not isinstance(partitions, list) or not partitions or any(not isinstance(p, str) or not p for p in partitions):
        raise ConfigError(f"{where}.partitions is {partitions!r}; expected a non-empty list of GEO-Bench partition "
                          "names, e.g. [default, 0.10x_train]")
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"{where}.seeds is {seeds!r}; expected a non-empty list of integers >= 0, e.g. [42]")
    for name, values in (("partitions", partitions), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}.{name} is {values!r}; name each one once")


def fit_grid(config: str | Path, fuser: str, partitions: list[str], seeds: list[int], root: str | Path,
             overrides: dict | None = None, device: str | None = None) -> dict[str, float]:
    """Fit ``fuser`` for every partition x seed into ``root`` (skipping runs already done); returns
    each run's test score by ``<partition>/seed<seed>``. Every run is checked against its caches and
    partition before the first one trains, so a bad name stops the grid before hours are spent."""
    check_grid(partitions, seeds)
    plans = {}
    for partition in partitions:
        for seed in seeds:
            check_replaceable(output_folder(run_dir(root, partition, seed)), FIT_OUTPUTS)
            cfg = load_config(config, {**(overrides or {}), "fuser": fuser, "seed": seed, "train_partition": partition})
            plans[(partition, seed)] = plan_fit(cfg, device)
    scores = {}
    for (partition, seed), plan in plans.items():
        out = run_dir(root, partition, seed)
        score = done_score(out, plan.inputs)
        if score is None:
            score = fit(plan.cfg, out, progress=False, plan=plan)["test_score"]
            log.info("%s: test %s %.4f", out, plan.cfg.fuser, score)
        else:
            log.info("%s: done already with the same inputs, skipped", out)
        scores[f"{partition}/seed{seed}"] = score
    return scores
