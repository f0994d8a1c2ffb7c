"""The report of the grid params.yaml names: tasks x ``fit.fusers`` x ``fit.partitions`` x ``fit.seeds``.

Only the named runs are read (``experiments/<dataset>/<fuser>/<partition>/seed<seed>/``): a
``metrics.json`` elsewhere on disk, from an earlier grid, never enters the report, and a named run
that is missing stops it with one line. Files written to ``out_dir`` (``reports/``):

- ``summary.csv``: one row per result (task, kind, fuser or probe, seed, partition, metric,
  value, UNet passes spent and the reference's for the same work); ``summary.md``: the tables,
  the cost ledger and links to the plots; ``ledger.json``: the ledger totals.
- ``aggregate.csv``: per task x fuser x partition the mean, standard deviation and IQM with its
  bootstrap interval over seeds, raw and normalised; rows of task ``aggregated``: the IQM over
  tasks of normalised scores with the stratified bootstrap interval. ``aggregate.json``: the
  same IQMs as numbers for ``dvc metrics``; ``normalizer.json``: the ranges used, GEO-Bench's format.
- ``label_efficiency.png`` and ``label_efficiency.csv`` (for ``dvc plots``): metric vs training
  fraction per task, one line per fuser with its interval band, the probes beside them.

and to ``leaderboard_dir`` (``leaderboard/``) the GEO-Bench leaderboard's submission files,
``results_and_parameters.csv`` (one row per run) and ``additional_info.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.reader import open_cache
from ..cache.store import CacheError
from ..config import ConfigError
from ..errors import UserError
from ..partitions import PARTITION
from .aggregate import Bootstrap, normalise, read_normalizer, seed_summary, stratified_iqm

COLUMNS = ["task", "kind", "fuser", "seed", "partition", "metric", "value", "unet_passes", "reference_unet_passes"]
AGGREGATE_COLUMNS = ["task", "fuser", "partition", "fraction", "metric", "n", "mean", "std", "iqm", "iqm_low",
                     "iqm_high", "normalised_iqm", "normalised_low", "normalised_high"]
CURVE_COLUMNS = ["task", "method", "kind", "partition", "fraction", "value", "low", "high"]
LEADERBOARD_COLUMNS = ["dataset", "Metric", "experiment_name", "partition name", "backbone", "decoder",
                       "batch_size_selection", "early_stop_patience", "n_trials", "Seed", "data_percentages",
                       "batch_size", "weight_decay", "lr", "test metric", "frozen_or_full_ft"]
# The leaderboard's names of our selection metrics.
LEADERBOARD_METRIC = {"accuracy": "Overall_Accuracy", "micro_f1": "Multilabel_F1_Score", "miou": "Multiclass_Jaccard_Index"}
FUSERS = ("gw", "lw", "moe")
SPLITS = ("train", "val", "test")


# ---- the grid -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    dataset: str  # the cache and output folder name
    geobench: str  # the task folder under the GEO-Bench root, e.g. classification_v1.0/m-eurosat

    @property
    def name(self) -> str:
        """GEO-Bench's dataset name: the key of normalizer.json and the leaderboard's ``dataset``."""
        return Path(self.geobench).name

    @property
    def benchmark(self) -> str:
        return Path(self.geobench).parts[0]


@dataclass(frozen=True)
class Grid:
    tasks: tuple[Task, ...]
    fusers: tuple[str, ...]
    partitions: tuple[str, ...]
    seeds: tuple[int, ...]

    @classmethod
    def from_params(cls, params: dict, where: str = "params.yaml") -> Grid:
        """The grid of a params.yaml: ``tasks`` and the ``fit`` section's ``fusers``, ``partitions``
        (default ``[default]``) and ``seeds`` (default ``[42]``)."""
        fit = params.get("fit") or {}
        if not isinstance(fit, dict):
            raise ConfigError(f"{where} fit: expected a mapping (fusers, partitions, seeds, ...), found {fit!r}")
        tasks = params.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ConfigError(f"{where} tasks: expected a list of {{config, dataset, geobench}} entries, found {tasks!r}")
        for t in tasks:
            if not isinstance(t, dict) or not all(isinstance(t.get(k), str) and t.get(k) for k in ("dataset", "geobench")):
                raise ConfigError(f"{where} tasks: entry {t!r} lacks 'dataset' or 'geobench' (the task folder under "
                                  f"geobench_root, e.g. classification_v1.0/m-eurosat)")
        fusers = _names(fit.get("fusers", list(FUSERS)), f"{where} fit.fusers")
        for f in fusers:
            if f not in FUSERS:
                raise ConfigError(f"{where} fit.fusers: {f!r} is not a fuser; allowed: {', '.join(FUSERS)}")
        partitions = _names(fit.get("partitions", ["default"]), f"{where} fit.partitions")
        for p in partitions:
            if p != "default" and not PARTITION.match(p):
                raise ConfigError(f"{where} fit.partitions: {p!r} is not a GEO-Bench partition; write 'default' or "
                                  f"'<f>x_train', e.g. 0.10x_train")
        seeds = fit.get("seeds", [42])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where} fit.seeds: expected a non-empty list of integers, found {seeds!r}")
        return cls(tuple(Task(t["dataset"], t["geobench"]) for t in tasks), tuple(fusers), tuple(partitions), tuple(seeds))

    def runs(self) -> list[tuple[Task, str, str, int]]:
        return [(t, f, p, s) for t in self.tasks for f in self.fusers for p in self.partitions for s in self.seeds]


def _names(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of names, found {value!r}")
    return value


def fraction(partition: str) -> float:
    """The training fraction of a partition; ``default`` is the whole training split."""
    return 1.0 if partition == "default" else float(PARTITION.match(partition).group(1))


def run_dir(exp_root: Path, task: Task, fuser: str, partition: str, seed: int) -> Path:
    return Path(exp_root) / task.dataset / fuser / partition / f"seed{seed}"


# ---- reading the runs ---------------------------------------------------------------------------


def fit_rows(exp_root: Path, grid: Grid) -> list[dict]:
    """One row per run of the grid, in grid order; every run must exist."""
    missing = [key for key in grid.runs() if not (run_dir(exp_root, *key) / "metrics.json").is_file()]
    if missing:
        task, fuser, partition, seed = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{run_dir(exp_root, *missing[0])}: no metrics.json for the run {task.dataset} x {fuser} x "
                        f"{partition} x seed {seed} that params.yaml names{more}; make the runs with `dvc repro`")
    return [_fit_row(run_dir(exp_root, *key), *key) for key in grid.runs()]


def _fit_row(folder: Path, task: Task, fuser: str, partition: str, seed: int) -> dict:
    metrics = _json(folder / "metrics.json")
    if (folder / "run.json").is_file():
        meta, source = _json(folder / "run.json"), "run.json"
    elif isinstance(metrics.get("dataset"), str):  # written before the metadata moved to run.json
        meta, source = metrics, "metrics.json"
    else:
        raise UserError(f"{folder}: metrics.json without run.json; run the fit again (`dvc repro`)")
    found = (meta.get("dataset"), meta.get("fuser"), meta.get("partition", "default"), meta.get("seed"))
    if found != (task.dataset, fuser, partition, seed):
        raise UserError(f"{folder / source} records the run {' x '.join(map(str, found))}, not {task.dataset} x {fuser} x "
                        f"{partition} x {seed} its folder stands for; delete the folder and make it with `dvc repro`")
    metric = meta.get("selection_metric")
    value = metrics.get("test_score", (metrics.get("test") or {}).get(metric))
    if not isinstance(value, (int, float)):
        raise UserError(f"{folder / 'metrics.json'}: no test score (test_score, or test.{metric}); run the fit again")
    ledger = {**(metrics.get("ledger") or {}), **(meta.get("ledger") or {})}
    return {"task": task.dataset, "kind": "fit", "fuser": fuser, "seed": seed, "partition": partition, "metric": metric,
            "value": float(value), "unet_passes": int(ledger.get("unet_passes", metrics.get("unet_passes", 0)) or 0),
            "reference_unet_passes": ledger.get("reference_unet_passes"), "_epochs": metrics.get("epochs_run"),
            "_seconds": metrics.get("train_seconds"), "_dir": str(folder), "_meta": meta, "_metadata_from": source,
            "_parameters": metrics.get("parameters")}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}); run the stage that wrote it again (`dvc repro`)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def probe_rows(probe_root: Path, tasks) -> list[dict]:
    rows = []
    for task in tasks:
        path = Path(probe_root) / task.dataset / "metrics.json"
        if not path.is_file():
            raise UserError(f"{path}: no probe results for the task {task.dataset} that params.yaml names; make them "
                            f"with `dvc repro`")
        rows += _best_cell_rows(path, task.dataset)
        curve = path.parent / "label_efficiency.csv"
        if curve.exists():
            with open(curve) as f:
                for r in csv.DictReader(f):
                    if r["value"] == "":
                        continue
                    seed = r["draw"].removeprefix("seed ") if r["draw"] != "partition" else ""
                    rows.append({"task": task.dataset, "kind": "label_efficiency",
                                 "fuser": f"{r['probe'].replace(' ', '_')} ({r['timestep']}, {r['layer']})",
                                 "seed": seed, "partition": r["partition"], "metric": r["metric"],
                                 "value": float(r["value"]), "unet_passes": 0, "reference_unet_passes": ""})
    return rows


def _best_cell_rows(path: Path, dataset: str) -> list[dict]:
    """The probe's best cells: their scores from ``path`` (metrics.json, numbers only) and their
    timestep, layer and metric from the run.json beside it."""
    scores, run_path = _json(path), path.parent / "run.json"
    if not run_path.is_file():
        raise UserError(f"{run_path}: missing beside the probe's metrics.json, which names no cells; run the probe "
                        "again (`dvc repro`)")
    run, rows = _json(run_path), []
    for name in ("best_layer", "best_timestep", "all"):
        cell, where = scores.get(name), run.get(name)
        if not (isinstance(cell, dict) and isinstance(cell.get("test"), (int, float))):  # a skipped probe has none
            continue
        if not (isinstance(where, dict) and {"timestep", "layer"} <= set(where)):
            raise UserError(f"{run_path}: no timestep and layer of '{name}', which {path} scores; run the probe again "
                            "(`dvc repro`)")
        rows.append({"task": dataset, "kind": "probe", "fuser": f"{name} ({where['timestep']}, {where['layer']})",
                     "seed": "", "partition": "default", "metric": run.get("metric"), "value": cell["test"],
                     "unet_passes": 0, "reference_unet_passes": ""})
    return rows


def cache_ledgers(cache_root: Path, tasks) -> list[dict]:
    """One row per split cache of the named tasks: what its extraction spent (None where the cache
    is not on disk, e.g. kept only on a remote)."""
    rows = []
    for task in tasks:
        for split in SPLITS:
            path = Path(cache_root) / task.dataset / f"{split}.zarr"
            row = {"dataset": task.dataset, "split": split, "images": None, "unet_passes": 0, "vae_passes": 0,
                   "bytes_stored": None, "extract_seconds": None}
            try:
                cache = open_cache(str(path))
            except CacheError:
                rows.append(row)
                continue
            ledger = cache.attrs.get("ledger", {})
            if "bytes_stored" not in ledger:  # caches written before the ledger counted bytes
                from ..cache.audit import cache_info

                ledger = {**ledger, "bytes_stored": cache_info(cache)["bytes_on_disk"]}
            rows.append({**row, "images": len(cache), "unet_passes": int(ledger.get("unet_passes", 0)),
                         "vae_passes": int(ledger.get("vae_passes", 0)),
                         "bytes_stored": int(ledger.get("bytes_stored", 0)) or None,
                         "extract_seconds": ledger.get("extract_seconds")})
    return rows


def ledger_totals(caches: list[dict], fits: list[dict]) -> dict:
    extraction = sum(c["unet_passes"] for c in caches)
    spent = extraction + sum(int(f["unet_passes"] or 0) for f in fits)
    reference = sum(int(f["reference_unet_passes"] or 0) for f in fits)
    return {"extraction_unet_passes": extraction, "fit_unet_passes": spent - extraction, "unet_passes_spent": spent,
            "reference_unet_passes": reference, "ratio": round(reference / spent, 2) if spent else None,
            "extraction_vae_passes": sum(c["vae_passes"] for c in caches),
            "bytes_stored": sum(c["bytes_stored"] or 0 for c in caches), "fits": len(fits)}


# ---- statistics ---------------------------------------------------------------------------------


def normalisation_ranges(grid: Grid, fits: list[dict], geobench_root: Path | None) -> dict[str, dict]:
    """Per task the [min, max] its scores are normalised with: GEO-Bench's, from
    ``<geobench_root>/<benchmark>/normalizer.json`` when that file names the task; else the min and
    max of the task's fit scores in this report (every fuser, partition and seed), which is what
    GEO-Bench's ``make_normalizer`` computes from the results it is given. Tasks whose scores are
    all equal get no range (their normalised scores are NaN and they leave the aggregate)."""
    files: dict[Path, dict] = {}
    out = {}
    for task in grid.tasks:
        path = Path(geobench_root) / task.benchmark / "normalizer.json" if geobench_root else None
        if path is not None and path.is_file():
            files.setdefault(path, read_normalizer(path))
            if task.name in files[path]:
                low, high = files[path][task.name]
                out[task.dataset] = {"name": task.name, "min": low, "max": high, "source": str(path)}
                continue
        values = [f["value"] for f in fits if f["task"] == task.dataset]
        low, high = min(values), max(values)
        source = "min-max of this report's fits" if high > low else "none: all fit scores are equal"
        out[task.dataset] = {"name": task.name, "min": low, "max": high if high > low else None, "source": source}
    return out


def aggregate(grid: Grid, fits: list[dict], ranges: dict, boot: Bootstrap) -> list[dict]:
    """Rows of aggregate.csv: each task x fuser x partition over seeds, then the aggregate over tasks."""
    rows = []
    normalised: dict[tuple[str, str], list[np.ndarray]] = {}
    for task in grid.tasks:
        span = ranges[task.dataset]
        for fuser in grid.fusers:
            for partition in grid.partitions:
                mine = [f for f in fits if (f["task"], f["fuser"], f["partition"]) == (task.dataset, fuser, partition)]
                s = seed_summary([f["value"] for f in mine], boot)
                scaled = ([float(normalise(s[k], span["min"], span["max"])) for k in ("iqm", "iqm_low", "iqm_high")]
                          if span["max"] is not None else [math.nan] * 3)
                rows.append({"task": task.dataset, "fuser": fuser, "partition": partition, "fraction": fraction(partition),
                             "metric": mine[0]["metric"], **s, "normalised_iqm": scaled[0], "normalised_low": scaled[1],
                             "normalised_high": scaled[2]})
                if span["max"] is not None:
                    normalised.setdefault((fuser, partition), []).append(
                        normalise([f["value"] for f in mine], span["min"], span["max"]))
    for fuser in grid.fusers:
        for partition in grid.partitions:
            if (fuser, partition) in normalised:
                s = stratified_iqm(normalised[(fuser, partition)], boot)
                rows.append({"task": "aggregated", "fuser": fuser, "partition": partition, "fraction": fraction(partition),
                             "metric": "normalised", "n": s["n"], "mean": math.nan, "std": math.nan, "iqm": s["iqm"],
                             "iqm_low": s["iqm_low"], "iqm_high": s["iqm_high"], "normalised_iqm": s["iqm"],
                             "normalised_low": s["iqm_low"], "normalised_high": s["iqm_high"]})
    return rows


def curve_rows(stats_rows: list[dict], probes: list[dict]) -> list[dict]:
    """label_efficiency.csv: the fits' IQM per partition (aggregated: normalised), and each probe's
    partition value with the range of its random draws of the same size."""
    rows = [{"task": r["task"], "method": r["fuser"], "kind": "fit", "partition": r["partition"], "fraction": r["fraction"],
             "value": r["iqm"], "low": r["iqm_low"], "high": r["iqm_high"]} for r in stats_rows]
    curve = [p for p in probes if p["kind"] == "label_efficiency"]
    for key in dict.fromkeys((p["task"], p["fuser"], p["partition"]) for p in curve):
        draws = [p for p in curve if (p["task"], p["fuser"], p["partition"]) == key]
        official = [p["value"] for p in draws if p["seed"] == ""]
        if official:
            values = [p["value"] for p in draws]
            rows.append({"task": key[0], "method": key[1], "kind": "probe", "partition": key[2],
                         "fraction": fraction(key[2]), "value": official[0], "low": min(values), "high": max(values)})
    return rows


# ---- the leaderboard ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaderboard:
    """What the leaderboard files say beyond the runs (params.yaml ``report.leaderboard``)."""

    out: str = "leaderboard"
    backbone: str = "diffusionsat"
    frozen_or_full_ft: str = "frozen"  # the backbone is never trained: its features come from the cache
    batch_size_selection: str = "fixed"
    n_trials: int = 0  # no hyperparameter search: the experiment files' values
    paper_link: str = "N/A"
    code_link: str = "N/A"
    license: str = "N/A"

    @classmethod
    def from_dict(cls, values: dict, where: str) -> Leaderboard:
        allowed = list(cls.__dataclass_fields__)
        unknown = set(values) - set(allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(allowed)}")
        board = cls(**values)
        for key in allowed:
            if key != "n_trials" and not (isinstance(getattr(board, key), str) and getattr(board, key)):
                raise ConfigError(f"{where}.{key}: {getattr(board, key)!r} is not a non-empty string")
        if board.frozen_or_full_ft not in ("frozen", "full_ft"):
            raise ConfigError(f"{where}.frozen_or_full_ft: {board.frozen_or_full_ft!r}; allowed: frozen, full_ft")
        if board.batch_size_selection not in ("fixed", "optimized"):
            raise ConfigError(f"{where}.batch_size_selection: {board.batch_size_selection!r}; allowed: fixed, optimized")
        if not isinstance(board.n_trials, int) or isinstance(board.n_trials, bool) or board.n_trials < 0:
            raise ConfigError(f"{where}.n_trials: {board.n_trials!r} is not an integer >= 0")
        return board

    def backbone_key(self, fuser: str) -> str:
        return f"{self.backbone}_satdifuser_{fuser}"


# run.json's names of the hyperparameters the leaderboard asks for (the first one present is used)
HYPERPARAMETERS = {"early_stop_patience": ("early_stopping_patience",), "batch_size": ("batch_size",),
                   "weight_decay": ("op_weight_decay", "weight_decay"), "lr": ("lr",)}


def _hyperparameter(meta: dict, names: tuple) -> object:
    for scope in (meta, meta.get("config") or {}):
        for name in names:
            if name in scope:
                return scope[name]
    return ""


def leaderboard_rows(fits: list[dict], grid: Grid, board: Leaderboard) -> list[dict]:
    name = {t.dataset: t.name for t in grid.tasks}
    rows = []
    for f in fits:
        meta = f["_meta"]
        rows.append({"dataset": name[f["task"]], "Metric": LEADERBOARD_METRIC.get(f["metric"], f["metric"]),
                     "experiment_name": f"satdifuser_{f['fuser']}", "partition name": f["partition"],
                     "backbone": board.backbone_key(f["fuser"]), "decoder": "UPerNet" if f["metric"] == "miou" else "linear",
                     "batch_size_selection": board.batch_size_selection, "n_trials": board.n_trials, "Seed": f["seed"],
                     "data_percentages": round(100 * fraction(f["partition"])), "test metric": f["value"],
                     "frozen_or_full_ft": board.frozen_or_full_ft}
                    | {column: _hyperparameter(meta, names) for column, names in HYPERPARAMETERS.items()})
    return rows


def additional_info(fits: list[dict], grid: Grid, board: Leaderboard) -> dict:
    """The leaderboard's ``additional_info.json``, with its exact keys (one of them ends in a space)."""
    models = []
    for fuser in grid.fusers:
        sizes = sorted({f["_parameters"] for f in fits if f["fuser"] == fuser and f["_parameters"]})
        size = " to ".join(_millions(n) for n in dict.fromkeys([sizes[0], sizes[-1]])) if sizes else "N/A"
        models.append({"model_display_name": f"{board.backbone} + SatDiFuser {fuser.upper()}",
                       "model_size": f"{size} trainable (fuser and head; the backbone is frozen)",
                       "unique_backbone_key": board.backbone_key(fuser)})
    return {"Paper Link": board.paper_link, "Code Repository Link ": board.code_link, "License": board.license,
            "Number of HPO trials": str(board.n_trials),
            "Additional information about submission": (
                f"Features of the frozen {board.backbone} UNet (timesteps x layers) cached once per dataset; "
                f"fusers {', '.join(grid.fusers)} with a linear (classification) or UPerNet (segmentation) head trained "
                f"on them, seeds {', '.join(map(str, grid.seeds))}, partitions {', '.join(grid.partitions)}; "
                f"hyperparameters from the experiment files, not searched."),
            "Comments on new models in submission": "SatDiFuser (ICCV 2025): GW, LW and MoE fusion of DiffusionSat features.",
            "New model info": models}


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


# ---- writing ------------------------------------------------------------------------------------


def write_report(grid: Grid, out_dir: str | Path = "reports", exp_root: str | Path = "experiments",
                 probe_root: str | Path = "probes", cache_root: str | Path = "cache",
                 geobench_root: str | Path | None = None, boot: Bootstrap = Bootstrap(),
                 board: Leaderboard = Leaderboard(), leaderboard_dir: str | Path | None = None) -> dict:
    """Read the grid's runs and probes and write the report; returns the ledger totals. Everything is
    read (and checked) before the first file is written."""
    out_dir = Path(out_dir)
    leaderboard_dir = Path(leaderboard_dir if leaderboard_dir is not None else board.out)
    fits, probes = fit_rows(Path(exp_root), grid), probe_rows(Path(probe_root), grid.tasks)
    caches = cache_ledgers(Path(cache_root), grid.tasks)
    ranges = normalisation_ranges(grid, fits, Path(geobench_root) if geobench_root else None)
    stats_rows = aggregate(grid, fits, ranges, boot)
    curve = curve_rows(stats_rows, probes)
    totals = ledger_totals(caches, fits)

    out_dir.mkdir(parents=True, exist_ok=True)
    _csv(out_dir / "summary.csv", COLUMNS, fits + probes)
    _csv(out_dir / "aggregate.csv", AGGREGATE_COLUMNS, [_rounded(r) for r in stats_rows])
    _csv(out_dir / "label_efficiency.csv", CURVE_COLUMNS, [_rounded(r) for r in curve])
    (out_dir / "aggregate.json").write_text(json.dumps(_aggregate_metrics(stats_rows), indent=2) + "\n")
    (out_dir / "normalizer.json").write_text(json.dumps(
        {r["name"]: [r["min"], r["max"]] for r in ranges.values() if r["max"] is not None}, indent=2) + "\n")
    (out_dir / "ledger.json").write_text(json.dumps(totals, indent=2) + "\n")
    from ..plots import grid_label_efficiency_plot

    grid_label_efficiency_plot(out_dir / "label_efficiency.png", curve, {r["task"]: r["metric"] for r in stats_rows})
    leaderboard_dir.mkdir(parents=True, exist_ok=True)
    _csv(leaderboard_dir / "results_and_parameters.csv", LEADERBOARD_COLUMNS, leaderboard_rows(fits, grid, board))
    (leaderboard_dir / "additional_info.json").write_text(json.dumps(additional_info(fits, grid, board), indent=2) + "\n")
    (out_dir / "summary.md").write_text(_markdown(out_dir, leaderboard_dir, Path(probe_root), grid, caches, fits, probes,
                                                  stats_rows, ranges, boot, totals))
    return totals


def _csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _rounded(row: dict) -> dict:
    """Floats to 6 significant digits, NaN as an empty cell."""
    return {k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else v)
            for k, v in row.items()}


def _aggregate_metrics(stats_rows: list[dict]) -> dict:
    """aggregate.json for ``dvc metrics``: numbers only, ``task/fuser/partition`` -> IQM and interval."""
    out = {}
    for r in stats_rows:
        cell = {k: round(r[k], 6) for k in ("iqm", "iqm_low", "iqm_high") if not math.isnan(r[k])}
        if r["task"] != "aggregated" and not math.isnan(r["normalised_iqm"]):
            cell["normalised_iqm"] = round(r["normalised_iqm"], 6)
        out[f"{r['task']}/{r['fuser']}/{r['partition']}"] = cell
    return out


def _interval(value: float, low: float, high: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "–"
    if math.isnan(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _markdown(out_dir: Path, leaderboard_dir: Path, probe_root: Path, grid: Grid, caches, fits, probes, stats_rows,
              ranges, boot: Bootstrap, totals) -> str:
    def link(path: Path) -> str:
        return os.path.relpath(path, out_dir)

    ci = f"{boot.confidence:.0%}"
    lines = ["# Summary", "",
             f"Grid: {len(grid.tasks)} tasks x {len(grid.fusers)} fusers ({', '.join(grid.fusers)}) x {len(grid.partitions)} "
             f"partitions ({', '.join(grid.partitions)}) x {len(grid.seeds)} seeds ({', '.join(map(str, grid.seeds))}) = "
             f"{len(fits)} fits. IQM: interquartile mean over seeds; [{ci} percentile-bootstrap interval, "
             f"{boot.resamples} resamples, seed {boot.seed}].", "",
             "## Fits over seeds (test split)", "",
             "| task | fuser | partition | metric | seeds | mean ± std | IQM [interval] | normalised IQM [interval] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in stats_rows:
        if r["task"] != "aggregated":
            spread = f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if not math.isnan(r["std"]) else "")
            lines.append(f"| {r['task']} | {r['fuser']} | {r['partition']} | {r['metric']} | {r['n']} | {spread} | "
                         f"{_interval(r['iqm'], r['iqm_low'], r['iqm_high'])} | "
                         f"{_interval(r['normalised_iqm'], r['normalised_low'], r['normalised_high'])} |")
    lines += ["", "## Aggregated over tasks (normalised scores; seeds resampled within each task)", "",
              "| fuser | partition | tasks | runs | IQM [interval] |", "|---|---|---|---|---|"]
    tasks_in = sum(1 for r in ranges.values() if r["max"] is not None)
    for r in stats_rows:
        if r["task"] == "aggregated":
            lines.append(f"| {r['fuser']} | {r['partition']} | {tasks_in} | {r['n']} | "
                         f"{_interval(r['iqm'], r['iqm_low'], r['iqm_high'])} |")
    lines += ["", "## Normalisation (x -> (x - min) / (max - min) per task)", "",
              "| task | GEO-Bench name | min | max | from |", "|---|---|---|---|---|"]
    for dataset, r in ranges.items():
        high = f"{r['max']:.4f}" if r["max"] is not None else "–"
        lines.append(f"| {dataset} | {r['name']} | {r['min']:.4f} | {high} | {r['source']} |")
    lines += ["", "## Runs (test split)", "",
              "| task | fuser | partition | seed | metric | value | epochs | train s | UNet passes | reference's |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        lines.append(f"| {f['task']} | {f['fuser']} | {f['partition']} | {f['seed']} | {f['metric']} | {f['value']:.4f} | "
                     f"{f['_epochs']} | {f['_seconds']} | {f['unet_passes']:,} | {int(f['reference_unet_passes'] or 0):,} |")
    old = [f["_dir"] for f in fits if f["_metadata_from"] == "metrics.json"]
    if old:
        lines += ["", f"{len(old)} runs were written before run.json: their metadata is read from metrics.json and the "
                      f"leaderboard's hyperparameter columns are empty for them (e.g. {old[0]})."]
    lines += ["", "## Probes (test split; cells chosen on val)", "", "| task | probe | metric | value |", "|---|---|---|---|"]
    lines += [f"| {p['task']} | {p['fuser']} | {p['metric']} | {p['value']:.4f} |" for p in probes if p["kind"] == "probe"]
    curve = [p for p in probes if p["kind"] == "label_efficiency" and p["seed"] == ""]
    if curve:
        parts = list(dict.fromkeys(p["partition"] for p in curve))
        names = list(dict.fromkeys((p["task"], p["fuser"]) for p in curve))
        lines += ["", "## Probe label efficiency (GEO-Bench partitions; random draws in summary.csv)", "",
                  "| task | probe | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
        value = {(p["task"], p["fuser"], p["partition"]): p["value"] for p in curve}
        for task, name in names:
            cells = [f"{value[(task, name, part)]:.3f}" if (task, name, part) in value else "–" for part in parts]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost ledger", "", "| cache | images | UNet passes | VAE passes | MiB stored | extract s |",
              "|---|---|---|---|---|---|"]
    for c in caches:
        if c["images"] is None:
            lines.append(f"| {c['dataset']}/{c['split']} | not on disk | – | – | – | – |")
            continue
        mib = f"{c['bytes_stored'] / 2**20:.1f}" if c["bytes_stored"] else "–"
        lines.append(f"| {c['dataset']}/{c['split']} | {c['images']} | {c['unet_passes']:,} | {c['vae_passes']:,} | {mib} | "
                     f"{c['extract_seconds'] if c['extract_seconds'] is not None else '–'} |")
    lines += ["", f"- UNet passes spent: **{totals['unet_passes_spent']:,}** ({totals['extraction_unet_passes']:,} in "
              f"extraction, {totals['fit_unet_passes']:,} in {totals['fits']} fits)",
              f"- UNet passes the reference runs for the same {totals['fits']} fits (features recomputed for every "
              f"training batch, validation and test evaluation): **{totals['reference_unet_passes']:,}**",
              f"- ratio: **{totals['ratio']}×**" if totals["ratio"] else "- ratio: –", "", "## Plots and files", "",
              f"- label efficiency of the fits and probes: [label_efficiency]({link(out_dir / 'label_efficiency.png')})",
              f"- GEO-Bench leaderboard submission: [results_and_parameters.csv]"
              f"({link(leaderboard_dir / 'results_and_parameters.csv')}), "
              f"[additional_info.json]({link(leaderboard_dir / 'additional_info.json')})"]
    for f in fits:
        for png in sorted(Path(f["_dir"], "plots").glob("*.png")):
            lines.append(f"- {f['task']} / {f['fuser']} / {f['partition']} / seed {f['seed']}: [{png.stem}]({link(png)})")
    for task in grid.tasks:
        for png in (probe_root / task.dataset / "heatmap.png", probe_root / task.dataset / "label_efficiency.png"):
            if png.exists():
                lines.append(f"- {task.dataset} / probes: [{png.stem}]({link(png)})")
    return "\n".join(lines) + "\n"
