import json
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.fixture
def exp_file(tmp_path, demo_root, tiny_backbone):
    """An experiment file for the tiny demo, as a user would write it."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "base": [str((__import__("pathlib").Path("configs") / "demo_cls_exp.yaml").resolve())],
        "geobench_dir": str(demo_root), "pretrained_model_name_or_path": str(tiny_backbone.root),
        "img_size": 64, "cache_dir": str(tmp_path / "cache"), "shard_size": 4, "num_workers": 0,
    }))
    return path


def test_extract_info_verify(exp_file, tmp_path):
    result = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / "demo-landcover" / "test.zarr"
    assert f"{cache}: 8 samples, 8 extracted" in result.output

    info = runner.invoke(app, ["cache", "info", str(cache)])
    assert info.exit_code == 0, info.output
    assert "8 of 8 done" in info.output and "t47 (UNet t=21), t45 (UNet t=61), t40 (UNet t=161)" in info.output
    assert "layers       21 (layer_idxs {'up_blocks': {'attn1': 'all', 'conv2': 'all'}}):" in info.output
    assert "10 UNet passes per image" in info.output
    as_json = json.loads(runner.invoke(app, ["cache", "info", str(cache), "--json"]).output)
    assert as_json["num_samples"] == 8 and len(as_json["layers"]) == 21

    ok = runner.invoke(app, ["cache", "verify", str(cache)])
    assert ok.exit_code == 0 and ok.output.strip().endswith(": ok")

    again = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", "--no-progress"])
    assert "(already complete)" in again.output

    shard = next((cache / "features" / "t40").glob("*/c/1/0/0/0"))
    shard.unlink()
    bad = runner.invoke(app, ["cache", "verify", str(cache)])
    assert bad.exit_code == 1 and f"is marked done but 1 of its stored objects are missing: {shard.relative_to(cache)}" in bad.output
    assert "--repair` re-extracts the shards named" in bad.output
    info = runner.invoke(app, ["cache", "info", str(cache)])
    assert info.exit_code == 0 and "problem      1 shard(s) marked done lack stored objects ([1])" in info.output
    fixed = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", "--no-progress"])
    assert f"{cache}: 8 samples, 4 extracted" in fixed.output
    assert runner.invoke(app, ["cache", "verify", str(cache)]).exit_code == 0


def test_user_errors_are_one_line_with_exit_status_2(exp_file, tmp_path, tiny_backbone):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone.root, broken)
    (broken / "resolution64" / "vae" / "config.json").unlink()
    cases = [
        (["--set", "fusr=gw"], "unknown key 'fusr'"),
        (["--set", "pretrained_model_name_or_path=" + str(tmp_path / "nowhere")], "does not exist"),
        (["--set", "save_timesteps=[47,60]"], "save_timesteps [47, 60] has labels >= num_timesteps 50"),
        (["--set", "geobench_dir=" + str(tmp_path / "nodata")], "GEO-Bench task not found"),
        (["--set", "noequals"], "is not key=value"),
        (["--device", "gpu"], "device 'gpu' is not auto, cpu, cuda, cuda:N or mps"),
        (["--set", f"pretrained_model_name_or_path={broken}"], "vae/config.json is missing"),
        (["--cache-dir", "/proc/no/such"], "cannot create the cache folder"),
        (["--set", "save_timesteps=[47,"], "--set 'save_timesteps=[47,': the value '[47,' is not valid YAML ("),
        (["--set", "band_scale=-1"], "band_scale is -1; expected a number > 0"),
    ]
    if not torch.backends.mps.is_available():
        cases.append((["--device", "mps"], "device 'mps' was asked for but MPS (Apple silicon) is not available here"))
    for extra, message in cases:
        result = runner.invoke(app, ["extract", str(exp_file), "--split", "val", "--device", "cpu", *extra])
        assert result.exit_code == 2, (extra, result.output, result.exception)
        assert isinstance(result.exception, SystemExit)  # handled, not a crash
        assert message in result.output and result.output.count("\n") == 1


@pytest.mark.parametrize("name, damage, message", [
    ("checkpoint-150000/unet/diffusion_pytorch_model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]),
     "is not a readable safetensors file"),
    ("scheduler/scheduler_config.json", lambda p: p.write_text('{"beta_start": 0.00085,'), "is not valid JSON"),
    ("tokenizer/merges.txt", lambda p: p.write_bytes(bytes(range(128, 256))), "is not UTF-8 text"),
])
def test_a_damaged_checkpoint_file_is_one_line(name, damage, message, exp_file, tmp_path, tiny_backbone):
    import shutil

    broken = tmp_path / "damaged"
    shutil.copytree(tiny_backbone.root, broken)
    file = broken / tiny_backbone.path.name / name
    damage(file)
    result = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", "--no-progress",
                                 "--set", f"pretrained_model_name_or_path={broken}"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert result.output.startswith(f"error: {file} ") and result.output.count("\n") == 1, result.output
    assert message in result.output


def test_outputs_and_saved_models_that_cannot_be_used_are_one_line_with_exit_status_2(exp_file, tmp_path):
    from pipeline.model import FusionModel, ModelConfig

    taken = tmp_path / "taken"
    taken.write_text("a file")
    model = tmp_path / "model"
    FusionModel(ModelConfig("gw", "linear", {"up_blocks_1_attn1_0": (8, 2, 2)}, ["t47"], 4, projection_dim=128)).save_pretrained(model)
    weights = (model / "model.safetensors").read_bytes()
    evaluate = ["evaluate", str(model), "--config", str(exp_file), "--device", "cpu"]
    cases = [
        (["fit", str(exp_file), "--out", str(taken), "--device", "cpu"], f"--out {taken} is an existing file"),
        (["probe", "--cache", str(tmp_path / "cache"), "--out", str(taken)], f"--out {taken} is an existing file"),
        (["demo", "data", "--out", str(taken)], f"--out {taken} is an existing file"),
        (["demo", "backbone", "--out", str(taken)], f"--out {taken} is an existing file"),
        (["demo", "backbone", "--out", str(tmp_path / "bb"), "--img-size", "-8"],
         "img_size (--img-size) must be a positive multiple of 8 (the VAE downsamples by 8), not -8"),
        (evaluate, lambda: (model / "model.safetensors").write_bytes(weights[: len(weights) // 2]),
         "model.safetensors is not a readable safetensors file"),
        (evaluate, lambda: (model / "config.json").write_text("{"), "config.json is not valid JSON"),
        (evaluate, lambda: (model / "config.json").write_text('{"fuser": "gw"}'), "config.json is not a saved model's config (missing keys"),
    ]
    for case in cases:
        args, *damage, message = case
        for step in damage:
            step()
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1, result.output
    assert taken.read_text() == "a file" and not (tmp_path / "bb").exists()


def test_mismatched_cache_is_refused_then_overwritten(exp_file):
    base = ["extract", str(exp_file), "--split", "val", "--device", "cpu", "--no-progress"]
    assert runner.invoke(app, base).exit_code == 0
    refused = runner.invoke(app, base + ["--set", "latent=mean"])
    assert refused.exit_code == 2 and "extraction.latent: cache 'sample', requested 'mean'" in refused.output
    assert runner.invoke(app, base + ["--set", "latent=mean", "--overwrite"]).exit_code == 0


def test_missing_cache_and_missing_config():
    assert runner.invoke(app, ["cache", "info", "/nonexistent/x.zarr"]).exit_code == 2
    result = runner.invoke(app, ["extract", "/nonexistent.yaml"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, cli; cli.app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


@pytest.fixture
def synthetic_task(tmp_path):
    """A tiny synthetic classification task cache folder (train/val/test.zarr) with one signal layer."""
    import numpy as np

    from pipeline.synthetic import write_synthetic_cache

    rng = np.random.default_rng(0)
    shapes = {"up_blocks_1_attn1_0": (6, 2, 2), "up_blocks_2_conv2_0": (4, 4, 4)}
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        write_synthetic_cache(str(tmp_path / "task" / f"{split}.zarr"), rng.integers(0, 3, n), ("t47", "t40"), shapes,
                              {("t40", "up_blocks_2_conv2_0"): 3.0}, num_classes=3, shard_size=8, split=split)
    return tmp_path / "task"


def test_probe_prints_best_cells_and_writes_files(synthetic_task, tmp_path):
    out = tmp_path / "probe"
    result = runner.invoke(app, ["probe", "--cache", str(synthetic_task), "--out", str(out), "--jobs", "1",
                                 "--set", "c_grid=[0.1,10]"])
    assert result.exit_code == 0, result.output
    assert "best_layer: t40 up_blocks_2_conv2_0: val 1.0000, test accuracy 1.0000" in result.output
    assert {p.name for p in out.iterdir()} == {"probe_map.json", "probe_map.csv", "heatmap.png", "metrics.json"}
    assert json.loads((out / "probe_map.json").read_text())["settings"]["c_grid"] == [0.1, 10.0]


@pytest.mark.parametrize("args, message", [
    (["--set", "c_grid=[]"], "error: --set: c_grid [] must be a list of positive numbers"),
    (["--partition", "0.10x_train"], "error: --partition needs the task's GEO-Bench folder"),
])
def test_probe_user_errors_are_one_line(synthetic_task, tmp_path, args, message, monkeypatch):
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    result = runner.invoke(app, ["probe", "--cache", str(synthetic_task), "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 2 and result.output.strip() == result.output.strip().splitlines()[0]
    assert result.output.startswith(message), result.output


def test_probe_of_a_missing_cache(tmp_path):
    result = runner.invoke(app, ["probe", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and result.output.startswith(f"error: --cache {tmp_path / 'none'}: ")
    assert len(result.output.strip().splitlines()) == 1


def test_store_and_map_encoding_reach_the_extraction_and_bad_values_are_one_line(exp_file, tmp_path):
    cases = [
        (["--store", "maps,pooeld"], "--store 'maps,pooeld': store ['maps', 'pooeld'] is not a non-empty list of "
         "distinct tiers from ['maps', 'pooled', 'trajectory']; write e.g. --store maps,pooled"),
        (["--store", "maps,maps"], "is not a non-empty list of distinct tiers"),
        (["--map-encoding", "bitround-12"], "--map-encoding: map_encoding 'bitround-12' is not float16 (exact), "
         "bitround-K (K = 1..9 mantissa bits kept) or uint8"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", *extra])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (extra, result.output)
        assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "cache").exists()

    result = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", "--no-progress",
                                 "--store", "maps,pooled", "--map-encoding", "bitround-5",
                                 "--set", "layer_idxs={up_blocks: {attn1: [[1, 0]], conv2: []}}"])
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / "demo-landcover" / "test.zarr"
    info = runner.invoke(app, ["cache", "info", str(cache)])
    assert "tiers        maps, pooled; maps bitround-5" in info.output
    assert "map error    worst relative L2 " in info.output and "(t4" in info.output
    assert " relative L2 " in info.output.splitlines()[-1]  # the layer's own line
    as_json = json.loads(runner.invoke(app, ["cache", "info", str(cache), "--json"]).output)
    assert as_json["tiers"] == ["maps", "pooled"] and set(as_json["bytes_per_image_by_tier"]) == {"maps", "pooled", "labels"}
    assert as_json["extraction"]["map_encoding"] == "bitround-5"
    assert runner.invoke(app, ["cache", "verify", str(cache)]).exit_code == 0
