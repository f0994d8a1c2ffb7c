import json

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.data.geobench_task import KNOWN_TASKS
from pipeline.data.inspect import inspect_task
from tests.data.v1_fakes import FAKES, write_fake

runner = CliRunner()


def test_demo_tasks_inspect(demo_root):
    report = inspect_task(demo_root / "classification_v1.0" / "demo-landcover", samples=8,
                          config="configs/demo_cls_exp.yaml")
    assert report["label"]["kind"] == "classification" and report["label"]["n_classes"] == 4
    assert report["label"]["class_names"][0] == "water"
    assert report["partitions"]["default"] == {"train": 20, "valid": 8, "test": 8}
    assert report["bands"]["04 - Red"]["dtype"] == "int16" and report["sampled"] == 8
    assert report["scaling"]["band_scale"] == 4095 and not report["warnings"]
    seg = runner.invoke(app, ["task", "inspect", str(demo_root / "segmentation_v1.0" / "demo-landcover-seg"),
                              "--samples", "4", "--json"])
    assert seg.exit_code == 0, seg.output
    out = json.loads(seg.output)
    assert out["label"]["kind"] == "segmentation" and sum(out["label"]["values"].values()) == 4 * 64 * 64
    assert out["scaling"] is None  # not a known folder and no --config


@pytest.mark.parametrize("fake", FAKES, ids=[f.dataset for f in FAKES])
def test_v1_fakes_inspect_with_the_known_scaling(fake, tmp_path):
    task_dir = write_fake(tmp_path, fake)
    known = KNOWN_TASKS[fake.dataset]
    report = inspect_task(task_dir, samples=8)
    assert report["scaling"]["from"] == f"known task {known.geobench_task}"
    assert report["label"]["kind"] == known.task and report["label"]["n_classes"] == known.num_classes
    assert report["partitions"]["original"] == report["partitions"]["default"] == {"train": 4, "valid": 2, "test": 2}
    assert report["patch_size"] == [known.original_img_size] * 2
    stored = {b["dtype"] for name, b in report["bands"].items() if name not in ("Neon", "Canopy Height Model")}
    assert stored == {fake.dtype}
    assert report["warnings"] == [], report["warnings"]


def test_scaling_that_clips_is_warned(tmp_path):
    """8-bit values read with m-chesapeake's clip-only scaling lose nearly every pixel."""
    fake = next(f for f in FAKES if f.dataset == "mchesapeake")
    task_dir = write_fake(tmp_path, type(fake)(fake.dataset, fake.exp, fake.bands, "float32", 256, 0))
    result = runner.invoke(app, ["task", "inspect", str(task_dir), "--samples", "4"])
    assert result.exit_code == 0
    warning = [line for line in result.output.splitlines() if line.startswith("warning") and "Red:" in line][0]
    assert "x / 1 clips 99." in warning and "set band_scale (the values reach 255" in warning
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"base: [{(__import__('pathlib').Path('configs/chesa_exp.yaml').resolve())}]\nband_scale: 255\n")
    fixed = runner.invoke(app, ["task", "inspect", str(task_dir), "--samples", "4", "--config", str(cfg)])
    assert fixed.exit_code == 0 and "warning" not in fixed.output


def test_too_large_divisor_is_warned(tmp_path):
    """Reflectance read as digital numbers: m-so2sat's values divided by 4095."""
    fake = next(f for f in FAKES if f.dataset == "mso2sat")
    task_dir = write_fake(tmp_path, fake)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"base: [{(__import__('pathlib').Path('configs/so2sat_exp.yaml').resolve())}]\nband_scale: 4095\n")
    report = inspect_task(task_dir, samples=4, config=str(cfg))
    assert any("99 % of the sampled values below 0.000" in w for w in report["warnings"])


def test_label_values_outside_the_classes_are_warned(tmp_path):
    fake = next(f for f in FAKES if f.dataset == "meurosat")
    report = inspect_task(write_fake(tmp_path, fake, labels={7: 12}), samples=8)
    assert report["label"]["values"]["12"] == 1
    assert any("label value 12 outside classes 0..9" in w for w in report["warnings"])


def test_dangling_partition_is_reported_and_not_a_folder_is_one_line(tmp_path):
    fake = next(f for f in FAKES if f.dataset == "meurosat")
    task_dir = write_fake(tmp_path, fake)
    (task_dir / "0.01x_train_partition.json").symlink_to(tmp_path / "gone.json")
    report = inspect_task(task_dir, samples=2)
    assert report["partitions"]["0.01x_train"]["error"].endswith("gone.json, which does not exist; restore it from "
                                                                 "the GEO-Bench download")
    result = runner.invoke(app, ["task", "inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
