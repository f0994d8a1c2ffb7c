import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.probe.map import ProbeError, ProbeSettings
from pipeline.probe.run import (
    PartitionError,
    TaskInfo,
    fraction,
    list_partitions,
    open_task_caches,
    partition_indices,
    random_draw,
    run_probe,
)

FAST = ProbeSettings(c_grid=(0.1, 1.0), n_jobs=2, max_iter=100, seg_pixels=8)


@pytest.fixture(scope="module")
def demo_caches(cached_demo, demo_root):
    """(cache folder, GEO-Bench task folder) of both tiny demo tasks."""
    out = {}
    for exp in ("demo_cls", "demo_seg"):
        cfg = cached_demo(exp)
        task = "classification_v1.0/demo-landcover" if exp == "demo_cls" else "segmentation_v1.0/demo-landcover-seg"
        out[exp] = (str(Path(cfg.cache_path("train")).parent), Path(demo_root) / task)
    return out


def partition_train_names(task_dir: Path, partition: str) -> list[str]:
    return json.loads((task_dir / f"{partition}_partition.json").read_text())["train"]


def test_partition_indices_select_exactly_the_partitions_samples(demo_caches):
    cache_dir, task_dir = demo_caches["demo_cls"]
    train = open_task_caches(cache_dir)["train"]
    assert list_partitions(task_dir)[0] == "0.01x_train" and list_partitions(task_dir)[-1] == "1.00x_train"
    for partition in ("0.20x_train", "0.50x_train", "1.00x_train"):
        idx = partition_indices(task_dir, partition, train)
        assert [train.sample_names[i] for i in idx] == partition_train_names(task_dir, partition)


def test_task_info_comes_from_the_cache(demo_caches):
    info = TaskInfo.of(open_task_caches(demo_caches["demo_seg"][0]))
    assert info == TaskInfo("segmentation", 4, "demo-landcover-seg", "segmentation_v1.0/demo-landcover-seg")


def test_random_draw_keeps_size_and_class_counts():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    official = np.array([0, 1, 2, 50, 51, 80])
    a, b = random_draw(official, labels, 1, True), random_draw(official, labels, 2, True)
    for draw in (a, b):
        assert len(set(draw)) == 6 and np.bincount(labels[draw], minlength=3).tolist() == [3, 2, 1]
    assert not np.array_equal(a, b)
    assert len(random_draw(official, labels, 1, False)) == 6


def test_run_probe_writes_map_heatmap_metrics_and_curve(demo_caches, tmp_path):
    cache_dir, task_dir = demo_caches["demo_cls"]
    metrics = run_probe(cache_dir, tmp_path, FAST, task_dir, ["all"], seeds=1)
    record = json.loads((tmp_path / "probe_map.json").read_text())
    assert record["task"] == "classification" and len(record["rows"]) == 63 + 3 + 1
    assert record["settings"]["c_grid"] == [0.1, 1.0] and record["split_sizes"] == {"train": 20, "val": 8, "test": 8}
    with open(tmp_path / "probe_map.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 67 and {"timestep", "layer", "metric", "value", "n_train", "C"} <= set(table[0])
    assert all(table[i]["C"] in ("0.1", "1.0") for i in range(67))
    assert (tmp_path / "heatmap.png").stat().st_size > 10_000
    assert metrics["best_layer"]["test"] == pytest.approx(record["best"]["best layer"]["value"], abs=1e-4)
    # metrics.json holds the numbers of the summary, run.json the rest; together they are the summary
    numbers = json.loads((tmp_path / "metrics.json").read_text())
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(numbers) == {"seconds", "best_layer", "best_timestep", "all", "label_efficiency"}
    assert numbers["seconds"] == metrics["seconds"] and numbers["label_efficiency"] == metrics["label_efficiency"]
    for name in ("best_layer", "best_timestep", "all"):
        assert numbers[name] == {"val": metrics[name]["val"], "test": metrics[name]["test"]}
        assert run[name] == {"timestep": metrics[name]["timestep"], "layer": metrics[name]["layer"]}
    assert run == {"task": "classification", "metric": "accuracy",
                   **{name: run[name] for name in ("best_layer", "best_timestep", "all")}}
    assert run["best_layer"] == {k: record["best"]["best layer"][k] for k in ("timestep", "layer")}
    assert run["all"] == {"timestep": "all", "layer": "all"}

    with open(tmp_path / "label_efficiency.csv") as f:
        curve = list(csv.DictReader(f))
    partitions = list_partitions(task_dir)
    sizes = {p: len(partition_train_names(task_dir, p)) for p in partitions}
    # every partition, plus one random draw of each that is smaller than train, for 3 probes each
    assert len(curve) == 3 * sum(1 + (sizes[p] < 20) for p in partitions)
    for row in curve:
        assert int(row["n_train"]) == sizes[row["partition"]] and float(row["fraction"]) == fraction(row["partition"])
    one_sample = [r for r in curve if r["n_train"] == "1"]
    assert one_sample and all(r["value"] == "" and "fewer than 2 classes" in r["skipped"] for r in one_sample)
    full = [r for r in curve if r["partition"] == "1.00x_train"]
    assert [float(r["value"]) for r in full] == pytest.approx(
        [metrics["best_layer"]["test"], metrics["best_timestep"]["test"], metrics["all"]["test"]], abs=1e-4)
    assert (tmp_path / "label_efficiency.png").exists()


def test_segmentation_run_states_grid_and_pixels(demo_caches, tmp_path):
    cache_dir, task_dir = demo_caches["demo_seg"]
    metrics = run_probe(cache_dir, tmp_path, FAST)
    record = json.loads((tmp_path / "probe_map.json").read_text())
    assert metrics["metric"] == "miou" and record["settings"]["seg_grid"] == 8 and record["settings"]["seg_pixels"] == 8
    assert json.loads((tmp_path / "run.json").read_text())["metric"] == "miou"
    assert record["rows"][0]["n_train_pixels"] == 20 * 8
    assert not (tmp_path / "label_efficiency.csv").exists()


def test_errors_name_the_input_and_the_fix(demo_caches, tmp_path):
    cache_dir, task_dir = demo_caches["demo_cls"]
    with pytest.raises(ProbeError, match=r"nothing: .*"):
        open_task_caches(tmp_path / "nothing")
    with pytest.raises(ProbeError, match="needs the task's GEO-Bench folder; pass --geobench-dir"):
        run_probe(cache_dir, tmp_path / "out", FAST, None, ["0.10x_train"])
    with pytest.raises(PartitionError, match=r"'0.3x_train': .* has partitions \['0.01x_train'"):
        partition_indices(task_dir, "0.3x_train", open_task_caches(cache_dir)["train"])
    with pytest.raises(PartitionError, match="not a training-fraction partition like '0.10x_train'"):
        run_probe(cache_dir, tmp_path / "out", FAST, task_dir, ["default"])
    with pytest.raises(PartitionError, match=r"'0.3x_train': .* has partitions"):  # before any probe is fitted
        run_probe(cache_dir, tmp_path / "out", FAST, task_dir, ["0.10x_train", "0.3x_train"])
    with pytest.raises(PartitionError, match=r"is not a GEO-Bench task folder .*; check --geobench-dir"):
        run_probe(cache_dir, tmp_path / "out", FAST, tmp_path / "nowhere", ["all"])
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_a_probe_run_never_loads_the_backbone(demo_caches, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipeline.probe.map import ProbeSettings\n"
        "from pipeline.probe.run import run_probe\n"
        f"run_probe({demo_caches['demo_cls'][0]!r}, {str(tmp_path)!r}, ProbeSettings(c_grid=(1.0,), n_jobs=1))\n"
        "backbone = ('diffusers', 'transformers', 'pipeline.backbone', 'pipeline.extract.extractor')\n"
        "print(sorted(m for m in sys.modules if m.startswith(backbone)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "metrics.json").exists()


def test_a_probe_on_a_cache_with_a_missing_or_corrupt_pooled_chunk_stops_with_one_line(demo_caches, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from cli import app

    cache_dir = tmp_path / "cache"
    shutil.copytree(demo_caches["demo_cls"][0], cache_dir)
    chunk = cache_dir / "train.zarr" / "pooled" / "t45" / "up_blocks_2_attn1_1" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "out"
    corrupt = CliRunner().invoke(app, ["probe", "--cache-dir", str(tmp_path), "--dataset", "cache", "--out", str(out),
                                       "--set", "c_grid=[1.0]"])
    assert corrupt.exit_code == 2 and corrupt.output.count("\n") == 1, corrupt.output
    assert "array pooled/t45/up_blocks_2_attn1_1, rows 8-15: cannot be read" in corrupt.output
    chunk.unlink()
    missing = CliRunner().invoke(app, ["probe", "--cache-dir", str(tmp_path), "--dataset", "cache", "--out", str(out),
                                       "--set", "c_grid=[1.0]"])
    assert missing.exit_code == 2 and "rows 8-15: its stored object pooled/t45/up_blocks_2_attn1_1/c/1/0 is " \
        "missing; run `satdifuser cache verify" in missing.output
    assert not (out / "metrics.json").exists()


def test_a_pooled_only_cache_is_probed_end_to_end_and_a_segmentation_probe_asks_for_maps(make_config, tmp_path):
    from pipeline.cache.store import CacheError
    from pipeline.extract.run import Extraction

    for exp in ("demo_cls", "demo_seg"):
        extraction = Extraction(make_config(exp, store=["pooled"], layer_idxs={"up_blocks": {"attn1": [[1, 0]],
                                                                                              "conv2": [[3, 2]]}}))
        for split in ("train", "val", "test"):
            extraction.run(split, progress=False)
    cls = Path(make_config("demo_cls").cache_path("train")).parent
    metrics = run_probe(cls, tmp_path / "cls", FAST)
    assert metrics["task"] == "classification" and 0 <= metrics["all"]["test"] <= 1
    assert (tmp_path / "cls" / "probe_map.csv").exists()
    seg = Path(make_config("demo_seg").cache_path("train")).parent
    with pytest.raises(CacheError) as err:
        run_probe(seg, tmp_path / "seg", FAST)
    assert str(err.value) == (f"cache {seg}/train.zarr holds the tiers ['pooled'], not maps, which a segmentation probe "
                              "needs; re-extract with `satdifuser extract CONFIG --overwrite --store maps,pooled`")
    assert not (tmp_path / "seg" / "metrics.json").exists() and not (tmp_path / "seg" / "run.json").exists()


def test_a_single_class_training_split_stops_the_map_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from pipeline.synthetic import write_synthetic_cache

    for split, labels in (("train", np.ones(8, dtype=int)), ("val", np.arange(4) % 2), ("test", np.arange(4) % 2)):
        write_synthetic_cache(str(tmp_path / "cache" / f"{split}.zarr"), labels, ("t47",), {"a": (4, 2, 2)},
                              num_classes=2, shard_size=4, split=split)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["probe", "--cache-dir", str(tmp_path), "--dataset", "cache", "--out", str(out)])
    assert result.exit_code == 2 and result.output == (
        f"error: {tmp_path / 'cache'}: every training image probed is of class 1, and a probe needs at least "
        "2 classes to learn from; extract a training split (or partition) that holds more than one class\n")
    assert not out.exists()


def test_the_probe_stage_on_a_task_without_fraction_partitions_writes_the_map_and_an_empty_curve(
        demo_caches, demo_root, tmp_path, monkeypatch, caplog):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from cli import app

    cache_dir, task_dir = demo_caches["demo_cls"]
    root = tmp_path / "geobench"
    shutil.copytree(demo_root, root)
    copy = root / task_dir.relative_to(demo_root)
    for path in copy.glob("*x_train_partition.json"):
        path.unlink()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"probe": {"partitions": "all", "seeds": 1, "settings": {
        "c_grid": [0.1, 1.0], "n_jobs": 2, "max_iter": 100}}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["probe", "--cache-dir", str(Path(cache_dir).parent), "--dataset",
                                      Path(cache_dir).name, "--out", "probes", "--geobench-dir", str(root),
                                      "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    note = f"{copy} has no '<f>x_train' partitions: no label-efficiency curve"
    assert f"{note}; probing the map only" in caplog.text
    with open(tmp_path / "probes" / "label_efficiency.csv") as f:
        assert f.read().splitlines() == ["partition,fraction,draw,probe,timestep,layer,n_train,metric,value,C,skipped"]
    assert (tmp_path / "probes" / "label_efficiency.png").stat().st_size > 0
    assert json.loads((tmp_path / "probes" / "probe_map.json").read_text())["label_efficiency"] == note
    metrics = json.loads((tmp_path / "probes" / "metrics.json").read_text())
    assert "label_efficiency" not in metrics and 0 <= metrics["all"]["test"] <= 1
