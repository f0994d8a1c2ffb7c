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
    assert bad.exit_code == 1
    assert f"is marked done but 1 of its stored objects are missing: {shard.relative_to(cache)}" in bad.output
    assert "--repair` re-extracts the shards named" in bad.output
    info = runner.invoke(app, ["cache", "info", str(cache)])
    assert info.exit_code == 0 and "problem      1 shard(s) marked done lack stored objects ([1])" in info.output
    fixed = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--device", "cpu", "--no-progress"])
    assert f"{cache}: 8 samples, 4 extracted" in fixed.output
    assert runner.invoke(app, ["cache", "verify", str(cache)]).exit_code == 0


def test_cache_plan_prints_bytes_per_tier_and_passes_per_source(exp_file):
    result = runner.invoke(app, ["cache", "plan", str(exp_file)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("demo-landcover at 64 px, 21 layers x 3 timesteps, codec blosc-lz4, shards of 4")
    assert lines[1].startswith("images       train 20, val 8, test 8 (from GEO-Bench task ")
    assert lines[2].split() == ["tier", "encoding", "per", "image", "train", "val", "test", "total"]
    assert [line.split()[:2] for line in lines[3:10]] == [
        ["maps", "float16"], ["maps", "bitround-5"], ["maps", "bitround-7"], ["maps", "uint8"], ["pooled", "-"],
        ["trajectory", "-"], ["labels", "etc."]]
    assert lines[10].startswith("store        [maps, pooled, trajectory], map_encoding float16 (the config's): train ")
    assert lines[11] == "fit cost     UNet passes per training image and epoch: source maps 0, trajectory 3, live 10 (+1 VAE)"
    as_json = json.loads(runner.invoke(app, ["cache", "plan", str(exp_file), "--json", "--images", "500",
                                             "--set", "store=[pooled]"]).output)
    assert as_json["images"] == {"train": 500, "val": 500, "test": 500}
    assert as_json["store"]["tiers"] == ["pooled"] and as_json["unet_passes_per_image_and_epoch"]["live"] == 10


def test_cache_plan_user_errors_are_one_line(exp_file, tmp_path, tiny_backbone):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone.root, broken)
    unet_config = broken / "resolution64" / "checkpoint-150000" / "unet" / "config.json"
    unet_config.unlink()
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_backbone.root, garbled)
    (garbled / "resolution64" / "checkpoint-150000" / "unet" / "config.json").write_text("{not json")
    cases = [
        (["--set", "pretrained_model_name_or_path=" + str(tmp_path / "nowhere")],
         f"DiffusionSat checkpoint folder {tmp_path / 'nowhere' / 'resolution64'} does not exist"),
        (["--set", f"pretrained_model_name_or_path={broken}"], f"{unet_config} is missing"),
        (["--set", f"pretrained_model_name_or_path={garbled}"], "config.json is not valid JSON"),
        (["--set", "geobench_dir=" + str(tmp_path / "nodata")], "(no task_specs.pkl), so its split sizes are unknown; "
                                                                 "pass --images N to plan N images per split"),
        (["--images", "0"], "--images 0: expected a number of images per split >= 1"),
        (["--set", "store=[maps,maps]"], "store is ['maps', 'maps']; expected a non-empty list of distinct tiers"),
        (["--set", "map_encoding=bitround-12"], "map_encoding is 'bitround-12'; expected float16 (exact), bitround-K"),
        (["--set", "layer_idxs={up_blocks: {attn9: all}}"], "attn9"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["cache", "plan", str(exp_file), *extra])
        assert result.exit_code == 2, (extra, result.output, result.exception)
        assert isinstance(result.exception, SystemExit)
        assert message in result.output and result.output.count("\n") == 1, (extra, result.output)


def test_extract_without_room_is_one_line(exp_file, tmp_path, monkeypatch):
    from pipeline.cache import planning

    monkeypatch.setattr(planning, "free_bytes", lambda path: (50_000, str(tmp_path)))
    result = runner.invoke(app, ["extract", str(exp_file), "--split", "val", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: cache {tmp_path / 'cache' / 'demo-landcover' / 'val.zarr'}: store "
                                    "[maps, pooled, trajectory], map_encoding float16 needs ")
    assert f"but {tmp_path} has 48.8 KiB free; " in result.output
    assert not (tmp_path / "cache" / "demo-landcover" / "val.zarr").exists()


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
    config = ModelConfig("gw", "linear", {"up_blocks_1_attn1_0": (8, 2, 2)}, ["t47"], 4, projection_dim=128)
    FusionModel(config).save_pretrained(model)
    weights = (model / "model.safetensors").read_bytes()
    evaluate = ["evaluate", str(model), "--config", str(exp_file), "--device", "cpu"]
    cases = [
        (["fit", str(exp_file), "--out", str(taken), "--device", "cpu"], f"--out {taken} is an existing file"),
        (["probe", "--cache-dir", str(tmp_path), "--dataset", "cache", "--out", str(taken)],
         f"--out {taken} is an existing file"),
        (["demo", "data", "--out", str(taken)], f"--out {taken} is an existing file"),
        (["demo", "backbone", "--out", str(taken)], f"--out {taken} is an existing file"),
        (["demo", "backbone", "--out", str(tmp_path / "bb"), "--img-size", "-8"],
         "img_size (--img-size) must be a positive multiple of 8 (the VAE downsamples by 8), not -8"),
        (evaluate, lambda: (model / "model.safetensors").write_bytes(weights[: len(weights) // 2]),
         "model.safetensors is not a readable safetensors file"),
        (evaluate, lambda: (model / "config.json").write_text("{"), "config.json is not valid JSON"),
        (evaluate, lambda: (model / "config.json").write_text('{"fuser": "gw"}'), "config.json is not a saved model's config "
                                                                                  "(missing keys"),
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
    result = runner.invoke(app, ["probe", "--cache-dir", str(synthetic_task.parent), "--dataset", "task", "--out", str(out),
                                 "--jobs", "1", "--set", "c_grid=[0.1,10]"])
    assert result.exit_code == 0, result.output
    assert "best_layer: t40 up_blocks_2_conv2_0: val 1.0000, test accuracy 1.0000" in result.output
    assert {p.name for p in out.iterdir()} == {"probe_map.json", "probe_map.csv", "heatmap.png", "metrics.json",
                                               "run.json"}
    assert json.loads((out / "probe_map.json").read_text())["settings"]["c_grid"] == [0.1, 10.0]
    assert result.output.splitlines()[-1].startswith(f"wrote {out}/probe_map.json, probe_map.csv, heatmap.png, "
                                                     "metrics.json and run.json (")


@pytest.mark.parametrize("args, message", [
    (["--set", "c_grid=[]"], "error: --set: c_grid [] must be a list of positive numbers"),
    (["--partition", "0.10x_train"], "error: --partition needs the task's GEO-Bench folder"),
])
def test_probe_user_errors_are_one_line(synthetic_task, tmp_path, args, message, monkeypatch):
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    result = runner.invoke(app, ["probe", "--cache-dir", str(synthetic_task.parent), "--dataset", "task",
                                 "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 2 and result.output.strip() == result.output.strip().splitlines()[0]
    assert result.output.startswith(message), result.output


def test_probe_of_a_dataset_not_under_the_cache_dir_is_one_line_naming_the_path(synthetic_task, tmp_path):
    (tmp_path / "other").mkdir()  # holds no train.zarr: not a task's caches
    result = runner.invoke(app, ["probe", "--cache-dir", str(tmp_path), "--dataset", "none", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and result.output == (f"error: --dataset none: {tmp_path / 'none'} does not exist; "
                                                       f"--cache-dir {tmp_path} holds task\n")
    result = runner.invoke(app, ["probe", "--cache-dir", str(tmp_path / "gone"), "--dataset", "task",
                                 "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and result.output.startswith(f"error: --cache-dir {tmp_path / 'gone'} does not exist; ")
    assert result.output.count("\n") == 1
    empty = runner.invoke(app, ["probe", "--cache-dir", str(tmp_path / "other"), "--dataset", "task",
                                "--out", str(tmp_path / "p")])
    assert empty.output == f"error: --dataset task: {tmp_path / 'other' / 'task'} does not exist; " \
        f"--cache-dir {tmp_path / 'other'} holds no task caches\n"
    assert not (tmp_path / "p").exists()


def test_probe_no_longer_takes_cache(synthetic_task, tmp_path):
    result = runner.invoke(app, ["probe", "--cache", str(synthetic_task), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "No such option: --cache" in result.output


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


# ---- one command line: help, version, logging, --params ---------------------------------------------

def command_paths(group, prefix=()):
    """Every command and sub-command of the app, as the words that call it."""
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from command_paths(command, (*prefix, name))


def test_help_names_every_command_and_every_help_shows_its_options():
    import typer.main

    root = typer.main.get_command(app)
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0
    for name in ("extract", "fit", "evaluate", "import-reference", "probe", "report", "cache", "task", "demo"):
        assert f" {name} " in listing.output, name
    paths = list(command_paths(root))
    assert {" ".join(p) for p in paths} >= {"cache info", "cache plan", "cache verify", "task inspect", "demo data",
                                             "demo backbone"}
    for path in paths:
        command = root
        for word in path:
            command = command.commands[word]
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.opts[0] in result.output, (path, param.opts[0])


def test_one_spelling_per_concept_on_every_command_that_takes_it():
    import typer.main

    root = typer.main.get_command(app)

    def options(*path):
        command = root
        for word in path:
            command = command.commands[word]
        return {opt for param in command.params for opt in param.opts}

    for path in (("extract",), ("fit",), ("evaluate",), ("import-reference",), ("cache", "plan")):
        assert {"--cache-dir", "--geobench-dir", "--backbone"} <= options(*path), path
    for path in (("extract",), ("fit",), ("evaluate",)):
        assert "--device" in options(*path), path
    for path in (("fit",), ("demo", "data"), ("demo", "backbone")):
        assert "--seed" in options(*path), path
    for path in (("fit",), ("import-reference",), ("probe",), ("report",), ("demo", "data"), ("demo", "backbone")):
        assert "--out" in options(*path), path
    for path in (("extract",), ("fit",), ("probe",), ("report",), ("demo", "data"), ("demo", "backbone")):
        assert "--params" in options(*path), path
    assert "--cache-dir" in options("probe") and "--cache" not in options("probe")


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"satdifuser {version('satdifuser-cache')}\n"


@pytest.fixture
def root_level():
    """The root logger's level as it was: the app's callback sets it for the process."""
    import logging

    before = logging.getLogger().level
    yield
    logging.getLogger().setLevel(before)


def test_info_lines_show_by_default_and_quiet_silences_them(synthetic_task, tmp_path, root_level):
    base = ["probe", "--cache-dir", str(synthetic_task.parent), "--dataset", "task", "--jobs", "1",
            "--set", "c_grid=[1.0]"]
    loud = runner.invoke(app, [*base, "--out", str(tmp_path / "loud")])
    assert loud.exit_code == 0, loud.output
    assert f"INFO pipeline.probe.run: probe map of {synthetic_task.parent / 'task'}: " in loud.stderr
    quiet = runner.invoke(app, ["-q", *base, "--out", str(tmp_path / "quiet")])
    assert quiet.exit_code == 0 and "INFO" not in quiet.output and quiet.stderr == ""
    assert "best_layer: t40 up_blocks_2_conv2_0" in quiet.stdout  # results still print
    both = runner.invoke(app, ["-q", "-v", *base, "--out", str(tmp_path / "both")])
    assert both.exit_code == 2 and both.output == "error: -v (--verbose) and -q (--quiet) contradict; give one of them\n"


def test_verbose_logs_debug_lines(synthetic_task, tmp_path, root_level):
    result = runner.invoke(app, ["-v", "probe", "--cache-dir", str(synthetic_task.parent), "--dataset", "task", "--jobs",
                                 "1", "--set", "c_grid=[1.0]", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("DEBUG zarr.") for line in result.stderr.splitlines())


def test_evaluate_offers_one_split_only(tmp_path, exp_file):
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--config", str(exp_file), "--split", "all"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "'all' is not one of 'train', 'val', 'test'" in result.output, result.output


def test_fit_seed_sets_the_runs_seed(exp_file, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    result = runner.invoke(app, ["fit", str(exp_file), "--seed", "7", "--fuser", "lw", "--device", "cpu",
                                 "--set", f"exp_folder={taken}"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --out {taken / 'demo-landcover' / 'lw' / 'default' / 'seed7'} "), result.output


@pytest.mark.parametrize("text, message", [
    (None, "error: --params {path}: no such file; give the params.yaml the DVC stages read\n"),
    ("extract: {device: cpu", "error: --params {path} is not valid YAML ("),
    ("[1, 2]", "error: --params {path}: expected a mapping of sections, found list\n"),
    ("extract: [cpu]", "error: {path} extract: expected a mapping, found ['cpu']\n"),
    ("extract: {devic: cpu}", "error: {path} extract: unknown key 'devic'; allowed: device, overrides\n"),
    ("extract: {overrides: [lr]}", "error: {path} extract.overrides: expected a mapping, found ['lr']\n"),
])
def test_a_bad_params_file_or_section_is_one_line_naming_the_file_and_key(exp_file, tmp_path, text, message):
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    result = runner.invoke(app, ["extract", str(exp_file), "--split", "test", "--params", str(path)])
    assert result.exit_code == 2 and result.output.startswith(message.format(path=path)), result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command, section, allowed", [
    (["fit", "{exp}", "--out", "{tmp}/runs"], "fit", "device, fusers, overrides, partitions, seeds"),
    (["probe", "--cache-dir", "{tmp}", "--dataset", "task", "--out", "{tmp}/p"], "probe",
     "partitions, scheduler, scheduler_timeout, seeds, settings"),
    (["report"], "report", "bootstrap, leaderboard, out"),
    (["demo", "data", "--out", "{tmp}/d"], "demo_data", "block_patches, max_grid, patch_size, root, seed"),
    (["demo", "backbone", "--out", "{tmp}/b"], "demo_backbone", "img_size, root, seed"),
])
def test_every_command_with_params_refuses_an_unknown_key_of_its_section(exp_file, tmp_path, command, section,
                                                                         allowed):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({section: {"typo": 1}}))
    args = [a.format(exp=exp_file, tmp=tmp_path) for a in command]
    result = runner.invoke(app, [*args, "--params", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {path} {section}: unknown key 'typo'; allowed: {allowed}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml", "params.yaml"]


def test_fit_with_params_needs_out(exp_file, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"fit": {"seeds": [1, 2]}}))
    result = runner.invoke(app, ["fit", str(exp_file), "--params", str(path)])
    assert result.exit_code == 2 and result.output == (
        f"error: --params {path} fits every partition x seed into --out/<partition>/seed<seed>; give --out, "
        "e.g. --out experiments/<dataset>/<fuser>\n")


def test_every_dvc_stage_runs_a_satdifuser_command_with_options_it_has():
    from pathlib import Path

    import typer.main

    root = typer.main.get_command(app)
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        words = stage["cmd"].split()
        assert words[0] == "satdifuser" and words[-2:] == ["--params", "params.yaml"], (name, words)
        command = root
        for word in words[1:]:
            if word.startswith("-") or not hasattr(command, "commands"):
                break
            command = command.commands[word]
        known = {opt for param in command.params for opt in param.opts}
        assert {w for w in words if w.startswith("--")} <= known, name
        assert "cli.py" in stage["deps"] and "pipeline/params.py" in stage["deps"], name
        assert not any(str(dep).startswith("stages") for dep in stage["deps"]), name


def test_the_top_level_plots_read_the_runs_params_yaml_names():
    """Each top-level plot reads files of the first fit.partitions x fit.seeds run of tasks x fit.fusers,
    the validation curves each task's own val_<metric> column, through a template that exists."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.metrics import SELECTION

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    run = f"{params['fit']['partitions'][0]}/seed{params['fit']['seeds'][0]}"
    kinds = {t["dataset"]: load_config(str(repo / "configs" / f"{t['config']}_exp.yaml")).task for t in params["tasks"]}
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    seen = set()
    for plot in plots:
        (title, spec), = plot.items()
        template = spec["template"]
        assert template in {"confusion", "bar_horizontal"} or (repo / ".dvc" / "plots" / f"{template}.json").is_file()
        for path, field in spec["y"].items():
            path = path.replace("${fit.partitions[0]}/seed${fit.seeds[0]}", run)
            _, dataset, fuser, rest = path.split("/", 3)
            assert dataset in kinds and fuser in params["fit"]["fusers"] and rest.startswith(f"{run}/"), (title, path)
            if template == "validation":
                assert rest == f"{run}/history.csv" and field == f"val_{SELECTION[kinds[dataset]]}", (title, path)
                seen.add((dataset, fuser))
    assert seen == {(d, f) for d in kinds for f in params["fit"]["fusers"]}  # every task's fusers overlaid
