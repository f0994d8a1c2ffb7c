"""A probe run: the map over every cell of a task's caches, label efficiency, and their files.

Files in ``out_dir``: ``probe_map.json`` (settings, task, rows, best cells) and ``probe_map.csv``
(one row per probe), ``heatmap.png``, ``metrics.json`` (the scores of the three best cells, numbers
only, for ``dvc metrics``) with ``run.json`` (the task, the metric and which cells those are), and
with partitions ``label_efficiency.csv`` and ``label_efficiency.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.reader import FeatureCache, open_cache
from ..cache.store import CacheError
from ..cluster import CONNECT_TIMEOUT, SchedulerError, connect, scheduler_problem
from ..metrics import SELECTION
from ..outputs import output_folder
from ..partitions import PartitionError, fraction, list_partitions, partition_indices
from .map import ALL, Cell, Probe, ProbeError, ProbeSettings, best_cells, settings_dict

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def open_task_caches(cache_dir: str | Path, storage_options: dict | None = None) -> dict[str, FeatureCache]:
    """The train, val and test caches in ``cache_dir``; they must come from one backbone and extraction."""
    caches = {}
    for split in SPLITS:
        path = f"{str(cache_dir).rstrip('/')}/{split}.zarr"
        try:
            caches[split] = open_cache(path, storage_options)
        except CacheError as err:
            raise ProbeError(f"{cache_dir}: {err}") from None
        if not caches[split].complete:
            raise ProbeError(f"{cache_dir}: {split}.zarr is incomplete; finish it with `satdifuser extract`")
    first = caches["train"].request
    for split in ("val", "test"):
        other = caches[split].request
        for key in ("backbone", "extraction"):
            if other[key] != first[key]:
                raise ProbeError(f"{cache_dir}: {split}.zarr was extracted with another {key} than train.zarr; "
                                 "extract all three splits with one config")
        if caches[split].layer_shapes != caches["train"].layer_shapes:
            raise ProbeError(f"{cache_dir}: {split}.zarr holds other layers than train.zarr")
    return caches


@dataclass(frozen=True)
class TaskInfo:
    kind: str  # classification | multi_label_classification | segmentation
    num_classes: int
    name: str
    geobench_task: str | None = None

    @classmethod
    def of(cls, caches: dict) -> TaskInfo:
        data = caches["train"].request.get("dataset", {})
        shape = caches["train"].plan.label_shape
        kind = data.get("task") or {0: "classification", 1: "multi_label_classification", 2: "segmentation"}[len(shape)]
        num_classes = data.get("num_classes")
        if not num_classes:
            num_classes = shape[0] if len(shape) == 1 else 1 + max(int(c.labels(range(len(c))).max()) for c in caches.values())
        return cls(kind, int(num_classes), data.get("name", "?"), data.get("geobench_task"))


# ---- partitions ---------------------------------------------------------------------------------


def random_draw(official: np.ndarray, labels: np.ndarray, seed: int, stratify: bool) -> np.ndarray:
    """Train indices of the same size as ``official`` drawn at random; for single-label tasks with
    the same number of samples of each class, so a draw differs from the partition only by chance."""
    rng = np.random.default_rng(seed)
    if not stratify:
        return np.sort(rng.choice(len(labels), len(official), replace=False))
    picks = []
    for cls, count in zip(*np.unique(labels[official], return_counts=True)):
        pool = np.flatnonzero(labels == cls)
        picks.append(rng.choice(pool, count, replace=False))
    return np.sort(np.concatenate(picks))


# ---- the run ------------------------------------------------------------------------------------


def run_probe(cache_dir: str | Path, out_dir: str | Path, settings: ProbeSettings = ProbeSettings(),
              task_dir: str | Path | None = None, partitions: list[str] | None = None, seeds: int = 0,
              storage_options: dict | None = None, scheduler: str | None = None,
              scheduler_timeout: float = CONNECT_TIMEOUT) -> dict:
    """Probe map of the full train split, then (with ``partitions``) label efficiency; returns the
    summary that ``metrics.json`` (its numbers) and ``run.json`` (the rest) hold between them.

    ``partitions`` names ``<f>x_train`` partitions of the GEO-Bench task in ``task_dir``; ``["all"]``
    takes every one the task has. ``seeds`` adds that many random draws of each partition's size.
    ``scheduler`` (``cluster.connect``) runs the probes on a Dask cluster; None runs them here.
    """
    problem = scheduler and scheduler_problem(scheduler)
    if problem:  # before any work
        raise SchedulerError(problem)
    with ExitStack() as stack:
        # The cluster is started (or reached) once the caches and partitions have been checked.
        def client():
            return stack.enter_context(connect(scheduler, settings.n_jobs, scheduler_timeout)) if scheduler else None

        return _run(cache_dir, out_dir, settings, task_dir, partitions, seeds, storage_options, client)


def _run(cache_dir, out_dir, settings, task_dir, partitions, seeds, storage_options, client) -> dict:
    output_folder(out_dir)  # before any work
    caches = open_task_caches(cache_dir, storage_options)
    info = TaskInfo.of(caches)
    if partitions and task_dir is None:
        raise ProbeError("--partition needs the task's GEO-Bench folder; pass --geobench-dir or set GEO_BENCH_DIR")
    no_curve = None
    if partitions == ["all"]:
        partitions = list_partitions(Path(task_dir))
        if not partitions:  # the map is still worth having; the curve's files say why they are empty
            no_curve = f"{task_dir} has no '<f>x_train' partitions: no label-efficiency curve"
            log.warning("%s; probing the map only", no_curve)
    # Every partition is resolved to train-cache rows before any probe runs, so a bad name fails early.
    resolved = {}
    for p in partitions or []:
        fraction(p)
        resolved[p] = partition_indices(Path(task_dir), p, caches["train"])
    out_dir = Path(out_dir)
    cluster = client()
    start = time.perf_counter()
    probe = Probe(caches, info.kind, info.num_classes, settings, cluster)
    classes = _train_classes(probe)
    if classes is not None and len(classes) < 2:
        raise ProbeError(f"{cache_dir}: every training {'pixel' if info.kind == 'segmentation' else 'image'} "
                         f"probed is of class {int(classes[0])}, and a probe needs at least 2 classes to learn from; "
                         "extract a training split (or partition) that holds more than one class")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = probe.run()
    seconds = time.perf_counter() - start
    best = best_cells(rows)
    log.info("probe map of %s: %d probes in %.1f s", cache_dir, len(rows), seconds)
    record = {"task": info.kind, "dataset": info.name, "num_classes": info.num_classes,
              "cache": str(cache_dir), "backbone": caches["train"].request["backbone"]["id"],
              "settings": settings_dict(settings, probe.grid or None), "seconds": round(seconds, 1),
              "split_sizes": {s: len(c) for s, c in caches.items()},
              "best": {k: _find(rows, c) for k, c in best.items()}, "rows": rows}
    if no_curve:
        record["label_efficiency"] = no_curve
    _write_map(out_dir, record)

    from ..plots import probe_heatmap

    probe_heatmap(out_dir / "heatmap.png", rows, caches["train"].timesteps, caches["train"].layers,
                  rows[0]["metric"], best["best layer"] if "best layer" in best else None)
    summary = {"task": info.kind, "metric": rows[0]["metric"], "seconds": record["seconds"],
               **{k.replace(" ", "_"): _brief(r) for k, r in record["best"].items()}}
    if partitions:
        curve = label_efficiency(probe, caches["train"], resolved, best, seeds, rows)
        _write_curve(out_dir, curve, rows[0]["metric"])
        summary["label_efficiency"] = {f"{r['partition']}/{r['probe'].replace(' ', '_')}": round(r["value"], 4)
                                      for r in curve if r["draw"] == "partition" and r["value"] is not None}
    elif no_curve:
        _write_curve(out_dir, [], rows[0]["metric"], no_curve)
    _write_summary(out_dir, summary)
    return summary


def label_efficiency(probe: Probe, train: FeatureCache, partitions: dict[str, np.ndarray], best: dict,
                     seeds: int = 0, map_rows: list[dict] | None = None) -> list[dict]:
    """The best cells probed on each partition (name -> its train-cache rows) and on ``seeds`` random
    draws of its size. A partition of the whole train split takes its rows from ``map_rows`` (the
    map's probes on the same samples)."""
    single_label = probe.task == "classification"
    train_labels = train.labels(range(len(train))).numpy() if single_label else np.zeros(len(train))
    out = []
    for partition, official in partitions.items():
        draws = [("partition", official)]
        if len(official) < len(train):  # a draw of every sample is the partition again
            draws += [(f"seed {s}", random_draw(official, train_labels, s, single_label)) for s in range(1, seeds + 1)]
        for draw, indices in draws:
            if map_rows and len(indices) == len(train) and np.array_equal(np.sort(indices), np.arange(len(train))):
                rows = [_find(map_rows, cell) for cell in best.values()]
            else:
                rows = _probe_subset(probe, indices, list(best.values()))
            for name, row in zip(best, rows):
                out.append({"partition": partition, "fraction": fraction(partition), "draw": draw, "probe": name,
                            "timestep": row["timestep"], "layer": row["layer"], "n_train": len(indices),
                            "metric": row["metric"], "value": row.get("value"), "C": row.get("C"),
                            "skipped": row.get("skipped", "")})
        log.info("label efficiency: %s done (%d samples)", partition, len(official))
    return out


def _train_classes(probe: Probe, indices: np.ndarray | None = None) -> np.ndarray | None:
    """The classes among the labels a probe trains on (for segmentation the sampled grid pixels, not
    the masks); None for multi-label tasks, whose probes are one per class."""
    if probe.task == "multi_label_classification":
        return None
    return np.unique(probe.train_labels(indices))


def _probe_subset(probe: Probe, indices: np.ndarray, cells: list[Cell]) -> list[dict]:
    classes = _train_classes(probe, indices)
    if classes is not None and len(classes) < 2:
        log.warning("label efficiency: a training set of %d samples holds class %d only: skipped", len(indices),
                    int(classes[0]))
        return [{"timestep": c.timestep, "layer": c.layer, "metric": SELECTION[probe.task], "value": None,
                 "skipped": "fewer than 2 classes in this training set"} for c in cells]
    return probe.run(cells, train_indices=indices)


def _find(rows, cell: Cell) -> dict:
    return next(r for r in rows if r["timestep"] == cell.timestep and r["layer"] == cell.layer)


def _brief(row: dict) -> dict:
    return {"timestep": row["timestep"], "layer": row["layer"], "val": round(row["val"], 4), "test": round(row["value"], 4)}


def _split_numbers(record: dict) -> tuple[dict, dict]:
    """(numbers, the rest) of a nested record, each keeping the record's nesting: ``dvc metrics show``
    makes a column of every key, so names in metrics.json would only widen its table."""
    numbers, rest = {}, {}
    for key, value in record.items():
        if isinstance(value, dict):
            value_numbers, value_rest = _split_numbers(value)
            if value_numbers:
                numbers[key] = value_numbers
            if value_rest:
                rest[key] = value_rest
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = value
        else:
            rest[key] = value
    return numbers, rest


def _write_summary(out_dir: Path, summary: dict) -> None:
    metrics, run = _split_numbers(summary)
    (out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _write_map(out_dir: Path, record: dict) -> None:
    (out_dir / "probe_map.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = record["rows"]
    columns = ["timestep", "layer", "metric", "value", "val", "n_train", "C", "dims"]
    columns += [k for k in rows[0] if k not in columns]
    with open(out_dir / "probe_map.csv", "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


CURVE_COLUMNS = ["partition", "fraction", "draw", "probe", "timestep", "layer", "n_train", "metric", "value", "C",
                 "skipped"]


def _write_curve(out_dir: Path, curve: list[dict], metric: str, note: str | None = None) -> None:
    with open(out_dir / "label_efficiency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CURVE_COLUMNS)
        w.writeheader()
        w.writerows(curve)
    from ..plots import label_efficiency_plot

    label_efficiency_plot(out_dir / "label_efficiency.png", curve, metric, note)


__all__ = ["ALL", "PartitionError", "ProbeError", "TaskInfo", "fraction", "list_partitions", "open_task_caches",
           "partition_indices", "run_probe"]
