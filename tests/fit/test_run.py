import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli import app
from pipeline.cache.store import CacheError
from pipeline.fit.loop import criterion, feature_selection, model_config, prepare_labels
from pipeline.fit.run import (
    FIT_CODE,
    cached_splits,
    code_digest,
    evaluate_saved,
    fit,
    live_splits,
    open_split_caches,
    training_rows,
    trajectory_splits,
)
from pipeline.model import FusionModel

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("exp, fuser, metric", [("demo_cls", "lw", "accuracy"), ("demo_seg", "moe", "miou")])
def test_fit_writes_metrics_model_and_plots(cached_demo, tmp_path, exp, fuser, metric):
    # Without up_blocks_0's 1 x 1 maps (at 64 px), where GroupNorm cannot normalise one routed image.
    cfg = cached_demo(exp, fuser=fuser, max_train_epochs=1, layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}})
    metrics = fit(cfg, tmp_path, progress=False)
    assert metrics["selection_metric"] == metric and 0 <= metrics["test"][metric] <= 1
    assert metrics["train_images"] == 20 and metrics["limited_label"] is None
    assert json.loads((tmp_path / "metrics.json").read_text())["test"][metric] == metrics["test"][metric]
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "history.csv").is_file()
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"curves.png", "fusion.png", "fusion.csv"} <= plots
    assert ({"iou.png", "iou.csv"} if metric == "miou" else {"confusion.png", "confusion.csv"}) <= plots
    again = evaluate_saved(cfg, tmp_path / "model", "test")
    assert again[metric] == pytest.approx(metrics["test"][metric])
    # 20 training images once, one validation of 8 during training and one of the best model, test's 8:
    # the reference runs the 10 UNet passes of the inversion for each; a cached fit runs none.
    assert metrics["ledger"] == {"epochs": 1, "val_evaluations": 1, "images_through_backbone": 0, "unet_passes": 0,
                                 "vae_passes": 0, "reference_unet_passes": 10 * (20 + 2 * 8 + 8),
                                 "reference_vae_passes": 20 + 2 * 8 + 8, "unet_passes_per_image": 10}


def test_the_reference_ledger_counts_the_passes_of_the_fits_own_timesteps(cached_demo, tmp_path):
    # The cache holds t47, t45 and t40 (10 inversion steps); the reference, asked for t47 and t45
    # only, stops its inversion after 5 steps.
    cfg = cached_demo(fuser="gw", max_train_epochs=1, save_timesteps=[47, 45],
                      layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}})
    ledger = fit(cfg, tmp_path, progress=False)["ledger"]
    assert ledger["unet_passes_per_image"] == 5
    assert ledger["reference_unet_passes"] == 5 * (20 + 2 * 8 + 8) and ledger["unet_passes"] == 0


def test_live_ledger_counts_every_image_through_the_backbone(cached_demo, tmp_path, monkeypatch):
    from pipeline.extract.extractor import FeatureExtractor

    seen = []
    original = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__",
                        lambda self, images, names: seen.append(len(names)) or original(self, images, names))
    cfg = cached_demo(fuser="lw", max_train_epochs=1, layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}})
    ledger = fit(cfg, tmp_path, source="live", progress=False)["ledger"]
    # 20 training images, val twice (in training and for the best model), test, and val for LW's gate summary.
    assert sum(seen) == ledger["images_through_backbone"] == ledger["vae_passes"] == 20 + 2 * 8 + 8 + 8
    assert ledger["unet_passes"] == 10 * sum(seen)
    assert ledger["reference_vae_passes"] == 20 + 2 * 8 + 8  # the summary is ours, not the reference's


def test_cli_fit_and_evaluate(cached_demo, tmp_path):
    cfg = cached_demo()
    common = ["--set", f"geobench_dir={cfg.geobench_dir}", "--set", f"cache_dir={cfg.cache_dir}", "--set", "img_size=64",
              "--set", "projection_dim=128", "--set", "batch_size=8", "--set", "max_train_epochs=1"]
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--fuser", "gw", "--out", str(out),
                                 "--device", "cpu", "--no-progress", *common])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    shown = runner.invoke(app, ["evaluate", str(out / "model"), "--config", "configs/demo_cls_exp.yaml",
                                "--device", "cpu", *common])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["accuracy"] == json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    bad = runner.invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--device", "cpu", "--out", str(tmp_path / "bad"),
                              *common, "--set", "save_timesteps=[30]"])
    assert bad.exit_code == 2 and "no timesteps ['t30']" in bad.output


def test_multi_label_fit_uses_bce_and_micro_f1(cached_demo, multilabel_root, tmp_path):
    from pipeline.extract.run import Extraction

    root, _ = multilabel_root
    cfg = cached_demo(geobench_dir=str(root), dataset_name="toy-multilabel", task="multi_label_classification",
                      num_classes=5, geobench_task="classification_v1.0/toy-multilabel", class_list=None,
                      cache_dir=str(tmp_path / "cache"), batch_size=4, val_batch_size=4,
                      layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}})
    extraction = Extraction(cfg)
    for split in ("train", "val", "test"):
        extraction.run(split, progress=False)
    metrics = fit(cfg, tmp_path / "run", progress=False)
    assert metrics["selection_metric"] == "micro_f1"
    assert set(metrics["test"]) == {"micro_precision", "micro_recall", "micro_f1"}


def test_training_rows_depend_on_the_names_and_the_seed_only():
    names = [f"sample_{i:03d}" for i in range(100)]
    rows = training_rows(names, 0.1, 42)
    assert len(rows) == 10 and list(rows) == sorted(rows)
    # The same images whatever the rows' order.
    perm = np.random.default_rng(0).permutation(100)
    shuffled = [names[i] for i in perm]
    assert {shuffled[i] for i in training_rows(shuffled, 0.1, 42)} == {names[i] for i in rows}
    assert set(rows) < set(training_rows(names, 0.3, 42))  # a smaller fraction keeps a subset
    assert set(training_rows(names, 0.1, 43)) != set(rows)
    assert list(training_rows(names, None, 42)) == list(training_rows(names, 1, 42)) == list(range(100))
    assert len(training_rows(names, 0.001, 42)) == 1  # at least one image


def test_limited_label_trains_cached_and_live_fits_on_the_same_subset(cached_demo, tmp_path):
    cfg = cached_demo(fuser="gw", limited_label=0.25, max_train_epochs=1)
    caches = open_split_caches(cfg)
    rows = training_rows(caches["train"].sample_names, 0.25, cfg.seed)
    assert len(rows) == 5  # of the 20 training images
    timesteps, layers = feature_selection(cfg, caches["train"])
    cached = cached_splits(cfg, caches, timesteps, layers, rows)
    live = live_splits(cfg, timesteps, layers, torch.device("cpu"), caches["train"].plan.shard_size, rows)
    assert cached.train_size == live.train_size == 5
    (_, cached_labels, cached_idx), = list(cached.train(0))  # batch_size 8: one batch of all five
    _, live_labels, live_idx = next(live.train(0))
    assert np.array_equal(cached_idx, rows) and np.array_equal(live_idx, rows)
    assert torch.equal(cached_labels, live_labels)
    metrics = fit(cfg, tmp_path, progress=False)
    assert metrics["train_images"] == metrics["train_images_seen"] == 5 and metrics["limited_label"] == 0.25
    assert metrics["ledger"]["reference_vae_passes"] == 5 + 2 * 8 + 8
    assert json.loads((tmp_path / "run.json").read_text())["train_images"] == 5


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli_fit(cfg, out):
    """``satdifuser fit`` of ``cfg`` into ``out`` in a process of its own."""
    import dataclasses
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    import yaml

    def flow(v):
        return yaml.safe_dump(v, default_flow_style=True, width=10**6).removesuffix("...\n").strip()

    values = [f"{k}={flow(v)}" for k, v in dataclasses.asdict(cfg).items() if k != "config_file"]
    args = [sys.executable, "-m", "cli", "fit", cfg.config_file, "--out", str(out), "--no-progress"]
    return subprocess.Popen(args + [a for v in values for a in ("--set", v)], cwd=repo, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_interruptible)


def _interruptible() -> None:
    """In the child before it starts: SIGINT as a terminal delivers it (Python then raises
    KeyboardInterrupt), whatever the test process inherited or set. A child inherits ignored
    signals and the signal mask, and in a full test run the fit was seen to ignore SIGINT."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def stop_after_first_epoch(proc, partial, sig):
    import time

    deadline = time.monotonic() + 300
    while not (partial / "training_state.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fit wrote no training state"
        time.sleep(0.02)
    assert proc.poll() is None, "the fit finished before it could be stopped; make it slower"
    proc.send_signal(sig)
    return proc.communicate(timeout=120)[1]


def test_a_killed_fit_leaves_the_old_output_and_resumes_to_equal_an_uninterrupted_fit(cached_demo, tmp_path):
    import dataclasses
    import signal

    out, partial = tmp_path / "run", tmp_path / ".run.partial"
    old_cfg = cached_demo(fuser="gw", max_train_epochs=1)
    old = fit(old_cfg, out, progress=False)
    (out / ".gitignore").write_text("/model\n/plots\n")  # as DVC leaves it, tracked by git
    before = tree(out)
    # A slow fit: two images per step, a validation after each, and epochs enough that it is still
    # training when the signal comes, also on a loaded machine where the test sees the state late.
    slow = cached_demo(fuser="gw", seed=1, batch_size=2, eval_every_n_steps=1, early_stopping_patience=1000,
                       max_train_epochs=6)

    stderr = stop_after_first_epoch(cli_fit(slow, out), partial, signal.SIGINT)
    assert (f"fit stopped (KeyboardInterrupt): nothing at {out} was changed; the partial output is in {partial} "
            f"(resume_from: {partial} continues it)") in stderr
    assert tree(out) == before
    (partial / "junk").write_text("left by the stopped fit")
    (partial / "training_state.pt").unlink()  # to see the next fit's own
    stop_after_first_epoch(cli_fit(slow, out), partial, signal.SIGKILL)
    assert tree(out) == before and not (partial / "junk").exists()  # the second fit cleared the first's
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial", "run"]
    again = evaluate_saved(old_cfg, out / "model", "test")
    assert again == old["test"]
    assert json.loads((out / "metrics.json").read_text())["test"] == {k: v for k, v in again.items()
                                                                        if k != "confusion_matrix"}

    import torch

    assert 1 <= torch.load(partial / "training_state.pt", weights_only=True)["epoch"] < 6  # stopped mid-fit
    resumed = fit(dataclasses.replace(slow, resume_from=str(partial)), out, progress=False)
    whole = fit(slow, tmp_path / "whole", progress=False)
    for key in ("val", "test", "best_step", "epochs_run", "train_images_seen", "ledger"):
        assert resumed[key] == whole[key], key
    new, reference = tree(out), tree(tmp_path / "whole")
    for name in ("history.csv", "model/model.safetensors", "model/config.json", "plots/fusion.csv", "plots/confusion.csv"):
        assert new[name] == reference[name], name
    assert new[".gitignore"] == before[".gitignore"] and not partial.exists()


def test_an_error_in_the_first_epoch_leaves_the_old_output_and_no_partial_folder(cached_demo, tmp_path, caplog):
    import shutil

    from pipeline.cache.store import CacheError

    source = cached_demo()
    shutil.copytree(f"{source.cache_dir}/demo-landcover", tmp_path / "cache" / "demo-landcover")
    cfg = cached_demo(fuser="gw", cache_dir=str(tmp_path / "cache"), max_train_epochs=1)
    out = tmp_path / "run"
    fit(cfg, out, progress=False)
    before = tree(out)
    shard = next((tmp_path / "cache" / "demo-landcover" / "train.zarr" / "features" / "t47").glob("*/c/0/0/0/0"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum|corrupt"):
        fit(cfg, out, progress=False)
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit stopped")]
    assert stopped == []  # the error's own line says it all: nothing at --out is touched, nothing to resume
    assert tree(out) == before and not (tmp_path / ".run.partial").exists()


def test_out_that_is_a_file_is_refused_before_training(cached_demo, tmp_path):
    from pipeline.errors import UserError

    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match=r"--out .*taken is an existing file; an output is a folder"):
        fit(cached_demo(), tmp_path / "taken", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_dvc_stage_fits_into_its_declared_outputs_and_a_new_seed_runs_only_the_new_fit(cached_demo, tmp_path,
                                                                                             monkeypatch):
    import shutil

    import yaml

    from pipeline.config import load_config
    from pipeline.fit.grid import done_score
    from pipeline.fit.run import plan_fit

    cfg = cached_demo()
    shutil.copytree("configs", tmp_path / "configs")
    keys = ("geobench_dir", "pretrained_model_name_or_path", "img_size", "cache_dir", "projection_dim", "batch_size")
    overrides = {k: getattr(cfg, k) for k in keys} | {"max_train_epochs": 1}

    def stage_run(seeds):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fit": {"device": "cpu", "overrides": overrides,
                                                                      "partitions": ["default"], "seeds": seeds}}))
        result = CliRunner().invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--fuser", "gw", "--out",
                                          "experiments/demo-landcover/gw", "--scores",
                                          "experiments/demo-landcover/gw-scores.json", "--params", "params.yaml"])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / "experiments/demo-landcover/gw-scores.json").read_text())

    monkeypatch.chdir(tmp_path)
    first = stage_run([42])
    declared = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "dvc.yaml"))["stages"]["fit"]
    names = [next(iter(o)) if isinstance(o, dict) else o for o in declared["outs"] + declared["metrics"]]
    for name in names:
        assert Path(name.replace("${item.task.dataset}/${item.fuser}", "demo-landcover/gw")).exists(), name
    run42 = tmp_path / "experiments/demo-landcover/gw/default/seed42"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run42.iterdir()}
    both = stage_run([42, 43])
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run42.iterdir()} == before  # not fitted again
    assert (tmp_path / "experiments/demo-landcover/gw/default/seed43/metrics.json").is_file()
    assert list(both) == ["default/seed42", "default/seed43"] and both["default/seed42"] == first["default/seed42"]
    run = json.loads((run42 / "run.json").read_text())
    assert (run["partition"], run["seed"], run["fuser"], run["train_images"]) == ("default", 42, "gw", 20)
    # Another setting is another run: the one on disk is no longer done.
    for changed in ({"lr": 0.02}, {"seed": 43}):
        again = load_config("configs/demo_cls_exp.yaml", {**overrides, "fuser": "gw", "seed": 42, **changed})
        assert done_score(run42, plan_fit(again, "cpu").inputs) is None
    same = load_config("configs/demo_cls_exp.yaml", {**overrides, "fuser": "gw", "seed": 42})
    assert done_score(run42, plan_fit(same, "cpu").inputs) == first["default/seed42"]


def test_the_dvc_stage_refuses_an_out_that_is_a_file_in_one_line(tmp_path, monkeypatch):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fit": {"device": "cpu"}}))
    (tmp_path / "taken").write_text("x")
    config = str(Path("configs/demo_cls_exp.yaml").resolve())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["fit", config, "--fuser", "gw", "--out", "taken", "--scores", "s.json",
                                      "--params", "params.yaml"])
    err = result.stderr
    assert result.exit_code == 2 and err.count("\n") == 1 and not (tmp_path / "s.json").exists()
    assert err.startswith(f"error: --out {tmp_path / 'taken/default/seed42'} would be inside {tmp_path / 'taken'}, "
                          "which is a file")


def test_an_attn1_ablation_of_a_full_cache_trains_and_reports_the_nine_attn1_layers(cached_demo, tmp_path):
    cfg = cached_demo(fuser="gw", max_train_epochs=1, layer_idxs={"up_blocks": {"attn1": "all"}})
    metrics = fit(cfg, tmp_path / "attn1", progress=False)
    nine = [f"up_blocks_{i}_attn1_{j}" for i in (1, 2, 3) for j in range(3)]
    assert metrics["layers"] == nine and json.loads((tmp_path / "attn1" / "run.json").read_text())["layers"] == nine
    assert list(FusionModel.from_pretrained(tmp_path / "attn1" / "model").config.layer_shapes) == nine


def test_a_fit_does_not_replace_a_folder_it_did_not_write(cached_demo, tmp_path):
    from pipeline.errors import UserError

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*project holds notes.txt, which this run does not write"):
        fit(cached_demo(max_train_epochs=1), project, progress=False)
    assert (project / "notes.txt").read_text() == "mine"


def test_evaluate_refuses_a_config_the_model_was_not_trained_for(cached_demo, tmp_path):
    from pipeline.errors import UserError

    cfg = cached_demo(fuser="gw", max_train_epochs=1)
    fit(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match=r"run/model was not trained for .* \(head: model 'linear', config 'upernet'"):
        evaluate_saved(cached_demo("demo_seg"), tmp_path / "run" / "model", "test")


# Without up_blocks_0's 1 x 1 maps (at 64 px), where GroupNorm cannot normalise one routed image.
NO_1X1 = {"up_blocks": {"attn1": "all", "conv2": []}}


def assert_within_float16_rounding(actual, expected):
    # The stored maps come from the extraction's batches, the recomputed ones from the fit's: CPU
    # kernels round float32 by batch shape, which moves a few float16 values by one rounding step.
    torch.testing.assert_close(actual, expected, rtol=2**-10, atol=1e-5)


def test_trajectory_batches_are_the_cached_batches_recomputed(cached_demo):
    from pipeline.fit.run import trajectory_splits

    # Shard buffers and limited_label rows: the cached batches' order is the least obvious there.
    cfg = cached_demo(fuser="gw", shuffle_buffer_shards=2, limited_label=0.5, batch_size=3)
    caches = open_split_caches(cfg)
    rows = training_rows(caches["train"].sample_names, 0.5, cfg.seed)
    timesteps, layers = feature_selection(cfg, caches["train"])
    layers = layers[1::5]  # a subset, in the fit's order
    cached = cached_splits(cfg, caches, timesteps, layers, rows)
    recomputed = trajectory_splits(cfg, caches, timesteps, layers, torch.device("cpu"), rows)
    assert recomputed.train_size == cached.train_size == len(rows)
    for split, epochs in (("train", (0, 1)), ("val", (0,))):
        for epoch in epochs:
            ours, theirs = list(getattr(recomputed, split)(epoch)), list(getattr(cached, split)(epoch))
            assert [idx.tolist() for *_, idx in ours] == [idx.tolist() for *_, idx in theirs]
            for (feats, labels, _), (stored, stored_labels, _) in zip(ours, theirs):
                assert torch.equal(labels, stored_labels)
                assert list(feats) == timesteps and all(list(feats[t]) == layers for t in timesteps)
                for t in timesteps:
                    for layer in layers:
                        assert feats[t][layer].dtype == torch.float16
                        assert_within_float16_rounding(feats[t][layer], stored[t][layer])


@pytest.mark.parametrize("exp, fuser", [(exp, fuser) for exp in ("demo_cls", "demo_seg") for fuser in ("gw", "lw", "moe")])
def test_a_fit_from_the_trajectory_equals_a_fit_from_the_maps(cached_demo, tmp_path, monkeypatch, exp, fuser):
    from pipeline.extract.extractor import FeatureExtractor

    cfg = cached_demo(exp, fuser=fuser, max_train_epochs=1, layer_idxs=NO_1X1)
    maps = fit(cfg, tmp_path / "maps", progress=False)  # the default source of a cache holding maps
    passes = []
    original = FeatureExtractor._stopped_pass
    monkeypatch.setattr(FeatureExtractor, "_stopped_pass",
                        lambda self, x, t, layers: passes.append(len(x)) or original(self, x, t, layers))
    traj = fit(cfg, tmp_path / "traj", source="trajectory", progress=False)
    assert (maps["source"], traj["source"]) == ("maps", "trajectory")
    assert json.loads((tmp_path / "traj" / "run.json").read_text())["source"] == "trajectory"
    history = lambda out: [float(row["train_loss"]) for row in csv.DictReader(open(out / "history.csv"))]  # noqa: E731
    assert history(tmp_path / "traj") == pytest.approx(history(tmp_path / "maps"), rel=1e-4)
    for split in ("val", "test"):
        # Within float tolerance: fp16 rounding steps move a few segmentation pixels, never a whole image.
        assert set(traj[split]) == set(maps[split])
        for key, value in maps[split].items():
            np.testing.assert_allclose(np.asarray(traj[split][key], float), np.asarray(value, float), rtol=1e-3, atol=1e-4,
                                       err_msg=f"{split} {key}")
    # 20 training images, val in training and for the best model, test, and val again for the LW/MoE
    # summary: 3 timesteps each, one UNet pass per image and timestep, no VAE.
    images = 20 + 2 * 8 + 8 + (8 if fuser != "gw" else 0)
    ledger = traj["ledger"]
    assert ledger["images_through_backbone"] == images and ledger["vae_passes"] == 0
    assert ledger["unet_passes"] == sum(passes) == 3 * images
    assert ledger["reference_unet_passes"] == maps["ledger"]["reference_unet_passes"] == 10 * (20 + 2 * 8 + 8)
    assert maps["ledger"]["unet_passes"] == maps["ledger"]["images_through_backbone"] == 0


def test_a_fit_from_the_trajectory_refuses_a_cache_of_another_backbone(cached_demo, tmp_path):
    from pipeline.backbone.demo import build_demo_backbone
    from pipeline.cache.store import CacheError

    build_demo_backbone(tmp_path / "other", img_size=64, seed=1)  # the same architecture, other weights
    cfg = cached_demo(pretrained_model_name_or_path=str(tmp_path / "other"), max_train_epochs=1)
    built = open_split_caches(cfg)["train"].request["backbone"]["id"]
    with pytest.raises(CacheError, match=rf"^cache \S+/train.zarr was built from backbone {built}, but "
                       rf"\S+ names {tmp_path / 'other'} \(backbone [0-9a-f]{{16}}\); set pretrained_model_name_or_path "
                       r"to the backbone the cache was built from, or re-extract with `satdifuser extract CONFIG "
                       r"--overwrite`$"):
        fit(cfg, tmp_path / "out", source="trajectory", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_fit_from_the_trajectory_refuses_other_extraction_settings(cached_demo, tmp_path):
    from pipeline.cache.store import CacheMismatch

    for key, value in (("prompt", "A map"), ("num_timesteps", 60), ("diffusion_mode", "generation")):
        with pytest.raises(CacheMismatch, match=rf"extraction\.{key.replace('diffusion_', '')}"):
            fit(cached_demo(**{key: value}), tmp_path / "out", source="trajectory", progress=False)
    assert not (tmp_path / "out").exists()


def extract_tiers(cached_demo, tmp_path, store, **overrides):
    """Train, val and test caches holding ``store``."""
    from pipeline.cache.reader import open_cache
    from pipeline.extract.run import Extraction

    cfg = cached_demo(cache_dir=str(tmp_path / "cache"), store=store, max_train_epochs=1, layer_idxs=NO_1X1,
                      **overrides)
    extraction = Extraction(cfg)
    extraction.run("train", progress=False)
    assert open_cache(cfg.cache_path("train")).tiers == tuple(store)
    for split in ("val", "test"):
        extraction.run(split, progress=False)
    return cfg


def test_a_trajectory_only_cache_fits_from_the_trajectory_by_default(cached_demo, tmp_path):
    from pipeline.cache.store import CacheError

    cfg = extract_tiers(cached_demo, tmp_path, ["trajectory"])
    assert fit(cfg, tmp_path / "run", progress=False)["source"] == "trajectory"
    with pytest.raises(CacheError, match=r"holds the tiers \['trajectory'\], not maps, which a fit with source maps "
                       r"needs; add it from the stored trajectory with `satdifuser extract CONFIG --from-trajectory "
                       r"--store maps`$"):
        fit(cfg, tmp_path / "maps", source="maps", progress=False)


def test_a_fit_from_the_trajectory_of_a_cache_without_one_is_refused(cached_demo, tmp_path):
    from pipeline.cache.store import CacheError

    cfg = extract_tiers(cached_demo, tmp_path, ["maps", "pooled"])
    with pytest.raises(CacheError, match=r"holds the tiers \['maps', 'pooled'\], not trajectory, which a fit with "
                       r"source trajectory needs; re-extract with `satdifuser extract CONFIG --overwrite --store "
                       r"maps,pooled,trajectory`$"):
        fit(cfg, tmp_path / "run", source="trajectory", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_fit_reads_lossy_maps_only_when_its_config_names_their_encoding(cached_demo, tmp_path):
    import dataclasses

    from pipeline.cache.store import CacheError

    lossy = extract_tiers(cached_demo, tmp_path, ["maps", "trajectory"], map_encoding="bitround-5")
    exact = dataclasses.replace(lossy, map_encoding="float16")
    with pytest.raises(CacheError, match=r"train.zarr stores its maps as bitround-5, but .* has map_encoding float16; "
                       r"set map_encoding: bitround-5 to use these maps"):
        fit(exact, tmp_path / "exact", progress=False)
    assert not (tmp_path / "exact").exists()
    assert fit(lossy, tmp_path / "lossy", progress=False)["map_encoding"] == "bitround-5"
    # The trajectory is exact whatever the maps' encoding: no refusal, no encoding recorded.
    assert fit(exact, tmp_path / "traj", source="trajectory", progress=False)["map_encoding"] is None


def test_cli_fit_source(cached_demo, tmp_path):
    cfg = cached_demo()
    common = ["configs/demo_cls_exp.yaml", "--device", "cpu", "--no-progress", "--set", f"geobench_dir={cfg.geobench_dir}",
              "--set", f"cache_dir={cfg.cache_dir}", "--set", "img_size=64", "--set", "projection_dim=128",
              "--set", "batch_size=8", "--set", "max_train_epochs=1",
              "--set", f"pretrained_model_name_or_path={cfg.pretrained_model_name_or_path}"]
    runner = CliRunner()
    result = runner.invoke(app, ["fit", *common, "--source", "trajectory", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["source"] == "trajectory"
    both = runner.invoke(app, ["fit", *common, "--source", "maps", "--live", "--out", str(tmp_path / "both")])
    assert both.exit_code == 2 and "error: --live and --source maps disagree; give one of them" in both.output
    bad = runner.invoke(app, ["fit", *common, "--source", "pooled", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "'pooled' is not one of" in bad.output


def numbers_only(value) -> bool:
    if isinstance(value, dict):
        return all(numbers_only(v) for v in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_a_partition_fit_trains_on_exactly_its_samples_and_writes_numbers_and_metadata_apart(cached_demo, demo_root,
                                                                                           tmp_path):
    from pipeline.fit.run import plan_fit

    task_dir = Path(demo_root) / "classification_v1.0" / "demo-landcover"
    wanted = json.loads((task_dir / "0.20x_train_partition.json").read_text())["train"]
    cfg = cached_demo(fuser="gw", max_train_epochs=1, train_partition="0.20x_train")
    plan = plan_fit(cfg, "cpu")
    names = plan.caches["train"].sample_names
    assert sorted(names[i] for i in plan.rows) == sorted(wanted) and 0 < len(wanted) < len(names)
    # Every source serves exactly those rows.
    for source in ("live", "trajectory"):
        splits = (live_splits(cfg, plan.timesteps, plan.layers, torch.device("cpu"), 8, plan.rows) if source == "live"
                  else trajectory_splits(cfg, plan.caches, plan.timesteps, plan.layers, torch.device("cpu"), plan.rows))
        assert sorted(int(i) for _, _, idx in splits.train(0) for i in idx) == sorted(plan.rows), source
    metrics = fit(cfg, tmp_path / "run", progress=False)
    assert metrics["train_images"] == metrics["train_images_seen"] == len(wanted)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert numbers_only(saved) and saved["test_score"] == saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert (run["partition"], run["cache_partition"], run["train_images"], run["seed"]) == ("0.20x_train", "default",
                                                                                            len(wanted), 42)
    assert run["selection_metric"] == "accuracy" and run["source"] == "maps" and run["config"]["train_partition"] == "0.20x_train"
    assert run["per_class"]["test"]["confusion_matrix"] == metrics["test"]["confusion_matrix"]
    assert run["lr"] == cfg.lr and run["inputs_sha256"] == plan.inputs


def test_partition_errors_are_one_line(cached_demo, demo_root, tmp_path):
    import shutil

    cfg = cached_demo()
    copy = tmp_path / "geobench"
    shutil.copytree(demo_root, copy)
    task_dir = copy / "classification_v1.0" / "demo-landcover"
    names = json.loads((task_dir / "0.20x_train_partition.json").read_text())
    (task_dir / "odd_partition.json").write_text(json.dumps({**names, "train": names["train"] + ["nowhere_0"]}))
    common = ["--set", f"geobench_dir={copy}", "--set", f"cache_dir={cfg.cache_dir}", "--set", "img_size=64",
              "--set", "projection_dim=128", "--device", "cpu", "--no-progress"]
    cases = {
        "0.3x_train": r"error: train_partition '0.3x_train': .*demo-landcover has partitions \['0.01x_train', ",
        "odd": r"error: train_partition odd: 1 of its training samples \(e.g. 'nowhere_0'\) are not in the train cache "
               r".*train.zarr; extract train from a partition that contains them",
    }
    runner = CliRunner()
    for partition, message in cases.items():
        result = CliRunner().invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--partition", partition,
                                     "--out", str(tmp_path / partition), *common])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert re.match(message, result.output), result.output
        assert not (tmp_path / partition).exists()
    shutil.rmtree(task_dir)
    gone = runner.invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--partition", "0.20x_train",
                               "--out", str(tmp_path / "gone"), *common])
    assert gone.exit_code == 2 and gone.output.count("\n") == 1
    assert gone.output.startswith(f"error: {task_dir} is not a GEO-Bench task folder (") and \
        gone.output.rstrip().endswith("set geobench_dir (or GEO_BENCH_DIR) to the GEO-Bench root that holds the task")
    both = runner.invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--partition", "0.20x_train", "--set",
                               "limited_label=0.5", *common])
    assert both.exit_code == 2 and both.output == ("error: --set override: limited_label 0.5 and train_partition "
                                                   "'0.20x_train' both choose the training images; set one of them "
                                                   "(train_partition for GEO-Bench's fixed subsets)\n")


def test_caches_built_for_other_settings_are_refused(cached_demo):
    with pytest.raises(CacheError, match="extraction.prompt"):
        open_split_caches(cached_demo(prompt="A map"))
    with pytest.raises(CacheError, match="dataset.partition: cache 'default', requested '0.50x_train'"):
        open_split_caches(cached_demo(partition="0.50x_train"))
    with pytest.raises(CacheError, match=r"dataset.scaling: cache 'x / 4095, .*requested 'x / 255, "):
        open_split_caches(cached_demo(band_scale=255))
    with pytest.raises(CacheError, match="dataset.num_classes: cache 4, requested 5"):
        open_split_caches(cached_demo(num_classes=5))


@pytest.mark.parametrize("buffer_shards", [0, 2])
def test_cached_and_live_features_give_the_same_first_batch_loss(cached_demo, buffer_shards):
    cfg = cached_demo(fuser="gw", shuffle_buffer_shards=buffer_shards)
    caches = open_split_caches(cfg)
    timesteps, layers = feature_selection(cfg, caches["train"])
    torch.manual_seed(0)
    model = FusionModel(model_config(cfg, {l: caches["train"].layer_shapes[l] for l in layers}, timesteps))
    losses = []
    for splits in (cached_splits(cfg, caches, timesteps, layers), live_splits(cfg, timesteps, layers, torch.device("cpu")),
                   trajectory_splits(cfg, caches, timesteps, layers, torch.device("cpu"))):
        feats, labels, idx = next(splits.train(0))
        with torch.no_grad():
            logits, _ = model(feats)
        losses.append((criterion(cfg.task, cfg.ignore_index)(logits, prepare_labels(cfg.task, labels, "cpu")).item(), idx))
    assert np.array_equal(losses[0][1], losses[1][1])  # the same images in the same order
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-3)  # both are fp16 features of the same pass
    # The extraction's own pass again, on other batches (CPU kernels round by batch): within fp16 rounding.
    assert np.array_equal(losses[0][1], losses[2][1]) and losses[2][0] == pytest.approx(losses[0][0], rel=1e-5)


def test_the_fit_stage_depends_on_the_code_whose_digest_decides_a_run_and_on_its_own_params_only():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["fit"]
    code = {d for d in stage["deps"] if d.startswith("pipeline/")}
    # grid.py skips runs and params.py reads the section: they decide nothing of a run
    assert code - set(FIT_CODE) == {"pipeline/fit/grid.py", "pipeline/params.py"} and set(FIT_CODE) <= code
    assert {"cli.py", "pipeline/params.py"} <= set(stage["deps"]) and not any("stages" in d for d in stage["deps"])
    assert stage["params"] == ["fit.partitions", "fit.seeds", "fit.overrides", "fit.device"]
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["fit"]
    assert (defaults["partitions"], defaults["seeds"]) == (["default"], [42])  # the demo's repro stays one run per stage


def test_the_code_digest_changes_with_a_file_it_covers(tmp_path, monkeypatch):
    import pipeline.fit.run as fit_module

    first = code_digest()
    assert first == code_digest()
    for entry in FIT_CODE:
        src = REPO / entry
        dst = tmp_path / entry
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.write_bytes(src.read_bytes())
    monkeypatch.setattr(fit_module, "__file__", str(tmp_path / "pipeline" / "fit" / "run.py"))
    assert code_digest() == first
    loop = tmp_path / "pipeline" / "fit" / "loop.py"
    loop.write_text(loop.read_text() + "\n# changed\n")
    assert code_digest() != first
