import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.fit import cached_splits, evaluate_saved, fit, live_splits, open_split_caches, training_rows
from pipeline.train import feature_selection


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


def test_live_ledger_counts_every_image_through_the_backbone(cached_demo, tmp_path, monkeypatch):
    from pipeline.backbone.extractor import FeatureExtractor

    seen = []
    original = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, images, names: seen.append(len(names)) or original(self, images, names))
    cfg = cached_demo(fuser="lw", max_train_epochs=1, layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}})
    ledger = fit(cfg, tmp_path, live=True, progress=False)["ledger"]
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
    bad = runner.invoke(app, ["fit", "configs/demo_cls_exp.yaml", "--device", "cpu", *common, "--set", "save_timesteps=[30]"])
    assert bad.exit_code == 2 and "no timesteps ['t30']" in bad.output


def test_multi_label_fit_uses_bce_and_micro_f1(cached_demo, multilabel_root, tmp_path):
    from pipeline.extract import Extraction

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
    assert json.loads((tmp_path / "metrics.json").read_text())["train_images"] == 5
