"""GEO-Bench's statistics of a grid of fits: over the seeds of one task x method x partition the
mean, the standard deviation and the interquartile mean (IQM) with a percentile-bootstrap interval;
scores min-max normalised per task; and the IQM over tasks with the stratified bootstrap of rliable
and GEO-Bench's ``plot_tools`` (each resample redraws the seeds within every task, so each task
keeps its number of runs).

The IQM is ``scipy.stats.trim_mean(scores, 0.25)``: the mean of the middle half (with 5 seeds, of
the middle 3). Intervals come from ``scipy.stats.bootstrap`` (percentile method, seeded); a cell
with one seed has no interval (NaN).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ..config import ConfigError
from ..errors import UserError

NAN = float("nan")


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals are drawn (params.yaml ``report.bootstrap``)."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict, where: str) -> Bootstrap:
        unknown = set(values) - {"resamples", "confidence", "seed"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: resamples, confidence, seed")
        b = cls(**values)
        if not isinstance(b.resamples, int) or isinstance(b.resamples, bool) or b.resamples < 100:
            raise ConfigError(f"{where}.resamples: {b.resamples!r} is not an integer >= 100")
        if isinstance(b.confidence, bool) or not isinstance(b.confidence, (int, float)) or not 0 < b.confidence < 1:
            raise ConfigError(f"{where}.confidence: {b.confidence!r} is not a number in (0, 1), e.g. 0.95")
        if not isinstance(b.seed, int) or isinstance(b.seed, bool):
            raise ConfigError(f"{where}.seed: {b.seed!r} is not an integer")
        return b


def iqm(scores, axis=-1):
    return stats.trim_mean(scores, 0.25, axis=axis)


def seed_summary(scores, boot: Bootstrap) -> dict:
    """Mean, sample standard deviation and IQM with its interval over one cell's seeds."""
    x = np.asarray(scores, dtype=float)
    low = high = NAN
    if len(x) > 1:
        ci = stats.bootstrap((x,), iqm, n_resamples=boot.resamples, confidence_level=boot.confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(boot.seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"n": len(x), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else NAN,
            "iqm": float(iqm(x)), "iqm_low": low, "iqm_high": high}


def stratified_iqm(per_task: list, boot: Bootstrap) -> dict:
    """IQM of the scores of all tasks pooled, and its interval from resampling seeds within each
    task. A task with one seed resamples to itself, so it enters every resample unchanged."""
    groups = [np.asarray(g, dtype=float) for g in per_task]
    pooled = np.concatenate(groups)
    varying = [g for g in groups if len(g) > 1]
    fixed = np.concatenate([g for g in groups if len(g) == 1] or [np.empty(0)])
    low = high = NAN
    if varying:
        def statistic(*samples, axis=-1):
            shape = samples[0].shape[:-1] + fixed.shape
            return iqm(np.concatenate([*samples, np.broadcast_to(fixed, shape)], axis=-1))

        ci = stats.bootstrap(tuple(varying), statistic, n_resamples=boot.resamples, confidence_level=boot.confidence,
                             method="percentile", vectorized=True, paired=False,
                             rng=np.random.default_rng(boot.seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"n": len(pooled), "tasks": len(groups), "iqm": float(iqm(pooled)), "iqm_low": low, "iqm_high": high}


# ---- normalisation ------------------------------------------------------------------------------


def read_normalizer(path: Path) -> dict[str, tuple[float, float]]:
    """GEO-Bench's ``normalizer.json`` (written by ``geobench.plot_tools.Normalizer.save``): for each
    dataset name, ``[min, max]`` of the test metric; a score x becomes (x - min) / (max - min)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable as JSON ({err}); expected GEO-Bench's normalizer.json, "
                        f'{{"<dataset>": [min, max], ...}}') from None
    if not isinstance(data, dict):
        raise UserError(f'{path}: expected an object {{"<dataset>": [min, max], ...}}, found {type(data).__name__}')
    ranges = {}
    for name, pair in data.items():
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair))
        if not ok or not pair[1] > pair[0]:
            raise UserError(f"{path}: {name!r} is {pair!r}; expected [min, max] with max > min")
        ranges[name] = (float(pair[0]), float(pair[1]))
    return ranges


def normalise(values, low: float, high: float) -> np.ndarray:
    """GEO-Bench's min-max normalisation; not clipped, so a score beyond the range leaves [0, 1]."""
    return (np.asarray(values, dtype=float) - low) / (high - low)
