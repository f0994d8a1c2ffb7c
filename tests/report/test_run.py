import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import trim_mean
from typer.testing import CliRunner

from cli import app
from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.report.aggregate import Bootstrap
from pipeline.report.run import Grid, Leaderboard, write_report
from pipeline.synthetic import write_synthetic_cache

ROOT = Path(__file__).resolve().parents[2]
BOOT = Bootstrap(resamples=200, seed=0)


def params(tasks=("toy",), fusers=("gw", "lw"), partitions=("default", "0.10x_train"), seeds=(1, 2, 3)) -> dict:
    return {"geobench_root": "data/geobench",
            "tasks": [{"config": t, "dataset": t, "geobench": f"classification_v1.0/m-{t}"} for t in tasks],
            "fit": {"fusers": list(fusers), "partitions": list(partitions), "seeds": list(seeds)}}


def score(task: str, fuser: str, partition: str, seed: int) -> float:
    """A made-up test accuracy that differs per run."""
    return round(0.5 + 0.1 * (fuser == "lw") + 0.2 * (partition == "default") + 0.01 * seed + 0.05 * (task == "toy2"), 4)


def write_run(root: Path, task: str, fuser: str, partition: str, seed: int, value: float | None = None,
              run_json: bool = True) -> Path:
    folder = root / "experiments" / task / fuser / partition / f"seed{seed}"
    folder.mkdir(parents=True)
    value = score(task, fuser, partition, seed) if value is None else value
    meta = {"dataset": task, "fuser": fuser, "partition": partition, "seed": seed, "selection_metric": "accuracy",
            "lr": 0.01, "op_weight_decay": 0.0, "batch_size": 32, "early_stopping_patience": 5,
            "ledger": {"unet_passes": 0, "reference_unet_passes": 800}}
    metrics = {"test_score": value, "test": {"accuracy": value}, "val": {"accuracy": value}, "epochs_run": 3,
               "train_seconds": 1.5, "parameters": 385731}
    if run_json:
        (folder / "run.json").write_text(json.dumps(meta))
    else:  # the layout before run.json: the metadata inside metrics.json
        metrics = {**metrics, **meta}
        del metrics["test_score"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def write_probe(root: Path, task: str) -> None:
    folder = root / "probes" / task
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"seconds": 1.0, "best_layer": {"val": 0.9, "test": 0.8}}))
    (folder / "run.json").write_text(json.dumps({"task": "classification", "metric": "accuracy",
                                                 "best_layer": {"timestep": "t47", "layer": "a"}}))
    with open(folder / "label_efficiency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["partition", "fraction", "draw", "probe", "timestep", "layer", "n_train", "metric", "value"])
        w.writeheader()
        for draw, value in (("partition", 0.7), ("seed 1", 0.6), ("seed 2", 0.65)):
            w.writerow({"partition": "0.10x_train", "fraction": 0.1, "draw": draw, "probe": "best layer",
                        "timestep": "t47", "layer": "a", "n_train": 6, "metric": "accuracy", "value": value})


def make_grid(root: Path, p: dict) -> Grid:
    grid = Grid.from_params(p)
    for task, fuser, partition, seed in grid.runs():
        write_run(root, task.dataset, fuser, partition, seed)
    for task in grid.tasks:
        write_probe(root, task.dataset)
    return grid


def report(root: Path, grid: Grid, **kw) -> dict:
    return write_report(grid, root / "reports", root / "experiments", root / "probes", root / "cache",
                        root / "data" / "geobench", BOOT, leaderboard_dir=root / "leaderboard", **kw)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_reads_exactly_the_named_runs_and_no_stale_one(tmp_path):
    grid = make_grid(tmp_path, params())
    write_run(tmp_path, "toy", "gw", "default", 7, value=0.999)  # a seed of an earlier grid
    write_run(tmp_path, "toy", "moe", "default", 1, value=0.998)  # a fuser no longer named
    old = tmp_path / "experiments" / "toy" / "gw" / "seed42"  # the layout before partitions
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"dataset": "toy", "fuser": "gw", "seed": 42, "partition": "default",
                                                  "selection_metric": "accuracy", "test": {"accuracy": 0.997}}))
    report(tmp_path, grid)
    fits = [r for r in read_csv(tmp_path / "reports" / "summary.csv") if r["kind"] == "fit"]
    assert [(r["fuser"], r["partition"], r["seed"]) for r in fits] == [
        (f, p, str(s)) for f in ("gw", "lw") for p in ("default", "0.10x_train") for s in (1, 2, 3)]
    assert [float(r["value"]) for r in fits] == [score("toy", f, p, s) for f in ("gw", "lw")
                                                 for p in ("default", "0.10x_train") for s in (1, 2, 3)]
    for name in ("summary.csv", "summary.md", "aggregate.csv", "label_efficiency.csv"):
        text = (tmp_path / "reports" / name).read_text()
        assert "0.999" not in text and "0.998" not in text and "0.997" not in text and "moe" not in text
    board = read_csv(tmp_path / "leaderboard" / "results_and_parameters.csv")
    assert len(board) == 12 and {r["Seed"] for r in board} == {"1", "2", "3"}


def test_a_named_run_that_is_missing_is_one_line_naming_it_and_nothing_is_written(tmp_path):
    grid = make_grid(tmp_path, params())
    missing = tmp_path / "experiments" / "toy" / "lw" / "0.10x_train" / "seed2"
    (missing / "metrics.json").unlink()
    with pytest.raises(UserError) as err:
        report(tmp_path, grid)
    assert str(err.value) == (f"{missing}: no metrics.json for the run toy x lw x 0.10x_train x seed 2 that params.yaml "
                              f"names; make the runs with `dvc repro`")
    assert not (tmp_path / "reports").exists() and not (tmp_path / "leaderboard").exists()
    (missing.parent / "seed3" / "metrics.json").unlink()
    with pytest.raises(UserError, match=r"seed 2 that params.yaml names and 1 more; make the runs"):
        report(tmp_path, grid)


def test_the_stage_reads_params_yaml_and_prints_one_line_for_a_missing_run(tmp_path, monkeypatch):
    p = params(seeds=[1, 2])
    make_grid(tmp_path, p)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**p, "report": {"bootstrap": {"resamples": 100}}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "--params", "params.yaml"])
    assert result.exit_code == 0 and result.stdout.startswith("reports: 8 fits;"), result.output
    assert (tmp_path / "leaderboard" / "results_and_parameters.csv").is_file()
    p["fit"]["seeds"] = [1, 2, 5]  # a seed added to params.yaml and not yet run
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "report", "--params", "params.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == ("error: experiments/toy/gw/default/seed5: no metrics.json for the run toy x gw x default x "
                           "seed 5 that params.yaml names and 3 more; make the runs with `dvc repro`\n")


def test_the_leaderboard_csv_has_exactly_geobench_columns_and_additional_info_its_keys(tmp_path):
    grid = make_grid(tmp_path, params())
    report(tmp_path, grid, board=Leaderboard(backbone="diffusionsat", license="MIT"))
    path = tmp_path / "leaderboard" / "results_and_parameters.csv"
    with open(path) as f:
        header = next(csv.reader(f))
    assert header == ["dataset", "Metric", "experiment_name", "partition name", "backbone", "decoder",
                      "batch_size_selection", "early_stop_patience", "n_trials", "Seed", "data_percentages",
                      "batch_size", "weight_decay", "lr", "test metric", "frozen_or_full_ft"]
    rows = read_csv(path)
    first = rows[0]
    assert first == {"dataset": "m-toy", "Metric": "Overall_Accuracy", "experiment_name": "satdifuser_gw",
                     "partition name": "default", "backbone": "diffusionsat_satdifuser_gw", "decoder": "linear",
                     "batch_size_selection": "fixed", "early_stop_patience": "5", "n_trials": "0", "Seed": "1",
                     "data_percentages": "100", "batch_size": "32", "weight_decay": "0.0", "lr": "0.01",
                     "test metric": str(score("toy", "gw", "default", 1)), "frozen_or_full_ft": "frozen"}
    assert {r["data_percentages"] for r in rows if r["partition name"] == "0.10x_train"} == {"10"}
    info = json.loads((tmp_path / "leaderboard" / "additional_info.json").read_text())
    assert list(info) == ["Paper Link", "Code Repository Link ", "License", "Number of HPO trials",
                          "Additional information about submission", "Comments on new models in submission",
                          "New model info"]
    assert info["License"] == "MIT" and info["Number of HPO trials"] == "0"
    assert [m["unique_backbone_key"] for m in info["New model info"]] == ["diffusionsat_satdifuser_gw",
                                                                          "diffusionsat_satdifuser_lw"]
    assert info["New model info"][0]["model_size"].startswith("0.39M trainable")


def test_iqm_and_intervals_per_cell_and_the_grid_rule_of_normalisation(tmp_path):
    grid = make_grid(tmp_path, params())
    report(tmp_path, grid)
    rows = {(r["task"], r["fuser"], r["partition"]): r for r in read_csv(tmp_path / "reports" / "aggregate.csv")}
    cell = rows[("toy", "lw", "default")]
    seeds = [score("toy", "lw", "default", s) for s in (1, 2, 3)]
    assert float(cell["iqm"]) == pytest.approx(trim_mean(seeds, 0.25)) and cell["n"] == "3"
    assert float(cell["mean"]) == pytest.approx(np.mean(seeds)) and float(cell["std"]) == pytest.approx(np.std(seeds, ddof=1))
    assert float(cell["iqm_low"]) <= float(cell["iqm"]) <= float(cell["iqm_high"])
    everything = [score("toy", f, p, s) for f in ("gw", "lw") for p in ("default", "0.10x_train") for s in (1, 2, 3)]
    low, high = min(everything), max(everything)  # no normalizer.json: the min and max of the task's fits
    assert float(cell["normalised_iqm"]) == pytest.approx((trim_mean(seeds, 0.25) - low) / (high - low), abs=1e-5)
    assert json.loads((tmp_path / "reports" / "normalizer.json").read_text()) == {"m-toy": [low, high]}
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "| toy | m-toy | 0.5100 | 0.8300 | min-max of this report's fits |" in summary
    metrics = json.loads((tmp_path / "reports" / "aggregate.json").read_text())
    assert metrics["toy/lw/default"]["iqm"] == pytest.approx(trim_mean(seeds, 0.25), abs=1e-6)
    assert all(isinstance(v, (int, float)) for cell in metrics.values() for v in cell.values())


def test_normalizer_json_of_the_geobench_benchmark_is_read_and_tasks_aggregate_stratified(tmp_path):
    grid = make_grid(tmp_path, params(tasks=("toy", "toy2"), seeds=(1, 2, 3, 4)))
    bench = tmp_path / "data" / "geobench" / "classification_v1.0"
    bench.mkdir(parents=True)
    (bench / "normalizer.json").write_text(json.dumps({"m-toy": [0.5, 1.0], "m-other": [0.1, 0.2]}))
    report(tmp_path, grid)
    rows = {(r["task"], r["fuser"], r["partition"]): r for r in read_csv(tmp_path / "reports" / "aggregate.csv")}
    seeds = [score("toy", "gw", "default", s) for s in (1, 2, 3, 4)]
    assert float(rows[("toy", "gw", "default")]["normalised_iqm"]) == pytest.approx((trim_mean(seeds, 0.25) - 0.5) / 0.5)
    md = (tmp_path / "reports" / "summary.md").read_text()
    assert f"| toy | m-toy | 0.5000 | 1.0000 | {bench / 'normalizer.json'} |" in md
    assert "| toy2 | m-toy2 | 0.5600 | 0.8900 | min-max of this report's fits |" in md  # not in the file
    pooled = ([(score("toy", "gw", "default", s) - 0.5) / 0.5 for s in (1, 2, 3, 4)]
              + [(score("toy2", "gw", "default", s) - 0.56) / 0.33 for s in (1, 2, 3, 4)])
    agg = rows[("aggregated", "gw", "default")]
    assert float(agg["iqm"]) == pytest.approx(trim_mean(pooled, 0.25), abs=1e-5) and agg["n"] == "8"
    assert float(agg["iqm_low"]) <= float(agg["iqm"]) <= float(agg["iqm_high"])
    (bench / "normalizer.json").write_text(json.dumps({"m-toy": [0.5]}))
    with pytest.raises(UserError, match=r"normalizer.json: 'm-toy' is \[0.5\]; expected \[min, max\]"):
        report(tmp_path, grid)


def test_label_efficiency_plot_and_its_dvc_csv(tmp_path):
    grid = make_grid(tmp_path, params(seeds=(1,)))
    report(tmp_path, grid)
    curve = read_csv(tmp_path / "reports" / "label_efficiency.csv")
    fits = [(r["task"], r["method"], r["fraction"], r["low"]) for r in curve if r["kind"] == "fit"]
    assert ("toy", "gw", "0.1", "") in fits and ("toy", "lw", "1", "") in fits  # one seed: no interval
    assert ("aggregated", "gw", "1", "") in fits
    probe = [r for r in curve if r["kind"] == "probe"]
    assert [(r["method"], r["fraction"], r["value"], r["low"], r["high"]) for r in probe] == [
        ("best_layer (t47, a)", "0.1", "0.7", "0.6", "0.7")]
    png = tmp_path / "reports" / "label_efficiency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_run_whose_record_disagrees_with_its_folder_is_refused(tmp_path):
    grid = make_grid(tmp_path, params(partitions=("default",), seeds=(1,)))
    folder = tmp_path / "experiments" / "toy" / "gw" / "default" / "seed1"
    meta = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**meta, "seed": 9}))
    with pytest.raises(UserError, match=r"run.json records the run toy x gw x default x 9, not toy x gw x default x 1"):
        report(tmp_path, grid)
    (folder / "run.json").unlink()
    with pytest.raises(UserError, match=r"seed1: metrics.json without run.json; run the fit again"):
        report(tmp_path, grid)


def test_runs_written_before_run_json_are_read_from_metrics_json_and_said_so(tmp_path):
    grid = Grid.from_params(params(partitions=("default",), seeds=(1,)))
    for task, fuser, partition, seed in grid.runs():
        write_run(tmp_path, task.dataset, fuser, partition, seed, run_json=False)
    write_probe(tmp_path, "toy")
    report(tmp_path, grid)
    assert "2 runs were written before run.json" in (tmp_path / "reports" / "summary.md").read_text()
    board = read_csv(tmp_path / "leaderboard" / "results_and_parameters.csv")
    assert board[0]["test metric"] == str(score("toy", "gw", "default", 1)) and board[0]["lr"] == "0.01"


def test_the_grid_comes_from_params_with_defaults_and_checks():
    grid = Grid.from_params({"tasks": [{"dataset": "a", "geobench": "segmentation_v1.0/m-a"}], "fit": {"fusers": ["moe"]}})
    assert grid.partitions == ("default",) and grid.seeds == (42,) and grid.tasks[0].name == "m-a"
    with pytest.raises(ConfigError, match=r"^params.yaml fit.partitions: '10%' is not a GEO-Bench partition; write "
                                          r"'default' or '<f>x_train', e.g. 0.10x_train$"):
        Grid.from_params({**params(), "fit": {"partitions": ["10%"]}})
    with pytest.raises(ConfigError, match="fit.fusers: 'xw' is not a fuser; allowed: gw, lw, moe"):
        Grid.from_params({**params(), "fit": {"fusers": ["xw"]}})
    with pytest.raises(ConfigError, match=r"fit.seeds: expected a non-empty list of integers, found \['1'\]"):
        Grid.from_params({**params(), "fit": {"seeds": ["1"]}})
    with pytest.raises(ConfigError, match="n_trials: -1 is not an integer >= 0"):
        Leaderboard.from_dict({"n_trials": -1}, "params.yaml report.leaderboard")
    with pytest.raises(ConfigError, match="frozen_or_full_ft: 'fine'; allowed: frozen, full_ft"):
        Leaderboard.from_dict({"frozen_or_full_ft": "fine"}, "params.yaml report.leaderboard")


def test_the_ledger_totals_the_named_tasks_caches_and_fits(tmp_path):
    for task in ("toy", "stale"):
        for split, n in (("train", 12), ("val", 4), ("test", 4)):
            writer = write_synthetic_cache(str(tmp_path / "cache" / task / f"{split}.zarr"), np.arange(n) % 2, ("t47",),
                                           {"a": (4, 2, 2)}, shard_size=4, split=split)
            writer.update_info(ledger={"unet_passes": 10 * n, "vae_passes": n, "bytes_stored": 1000 * n})
    grid = make_grid(tmp_path, params(partitions=("default",), seeds=(1,)))
    totals = report(tmp_path, grid)
    assert totals == {"extraction_unet_passes": 200, "fit_unet_passes": 0, "unet_passes_spent": 200,
                      "reference_unet_passes": 1600, "ratio": 8.0, "extraction_vae_passes": 20, "bytes_stored": 20000,
                      "fits": 2}
    md = (tmp_path / "reports" / "summary.md").read_text()
    assert "| toy | gw | default | 1 | accuracy | 0.7100 | 3 | 1.5 | 0 | 800 |" in md
    assert "UNet passes spent: **200**" in md and "ratio: **8.0×**" in md and "stale" not in md
    assert json.loads((tmp_path / "reports" / "ledger.json").read_text()) == totals


def test_probe_rows_take_their_scores_from_metrics_json_and_their_cells_from_run_json(tmp_path):
    grid = make_grid(tmp_path, params(partitions=("default",), seeds=(1,)))
    folder = tmp_path / "probes" / "toy"
    (folder / "metrics.json").write_text(json.dumps({"best_layer": {"val": 0.9, "test": 0.8},
                                                     "all": {"val": 0.95, "test": 0.85}}))
    (folder / "run.json").write_text(json.dumps({"metric": "accuracy", "best_layer": {"timestep": "t40", "layer": "b"},
                                                 "all": {"timestep": "all", "layer": "all"}}))
    report(tmp_path, grid)
    probes = [(r["fuser"], r["metric"], r["value"]) for r in read_csv(tmp_path / "reports" / "summary.csv")
              if r["kind"] == "probe"]
    assert probes == [("best_layer (t40, b)", "accuracy", "0.8"), ("all (all, all)", "accuracy", "0.85")]
    assert "| toy | best_layer (t40, b) | accuracy | 0.8000 |" in (tmp_path / "reports" / "summary.md").read_text()

    (folder / "run.json").write_text(json.dumps({"metric": "accuracy", "best_layer": {"timestep": "t40", "layer": "b"}}))
    with pytest.raises(UserError) as err:
        report(tmp_path, grid)
    assert str(err.value) == (f"{folder / 'run.json'}: no timestep and layer of 'all', which {folder / 'metrics.json'} "
                              "scores; run the probe again (`dvc repro`)")
    (folder / "run.json").unlink()
    with pytest.raises(UserError) as err:
        report(tmp_path, grid)
    assert str(err.value) == (f"{folder / 'run.json'}: missing beside the probe's metrics.json, which names no cells; "
                              "run the probe again (`dvc repro`)")
    (folder / "run.json").write_text('{"metric": "accuracy", "best_layer": {"timestep": "t40"')  # cut short
    with pytest.raises(UserError, match=r"run\.json: not valid JSON \(.*\); run the stage that wrote it again \(`dvc repro`\)$"):
        report(tmp_path, grid)


def test_a_skipped_probe_and_an_empty_curve_leave_only_the_fits(tmp_path):
    grid = make_grid(tmp_path, params(partitions=("default",), seeds=(1, 2)))
    folder = tmp_path / "probes" / "toy"
    (folder / "metrics.json").write_text(json.dumps({"seconds": 1.0}))
    (folder / "run.json").write_text(json.dumps({"task": "classification", "skipped": "one class in train"}))
    (folder / "label_efficiency.csv").write_text("partition,fraction,draw,probe,timestep,layer,n_train,metric,value\n")
    report(tmp_path, grid)
    kinds = {r["kind"] for r in read_csv(tmp_path / "reports" / "summary.csv")}
    assert kinds == {"fit"}
    assert {r["kind"] for r in read_csv(tmp_path / "reports" / "label_efficiency.csv")} == {"fit"}
