import math

import pytest
import torch

from pipeline.backbone.layer_spec import LayerSpecError
from pipeline.cache.batches import CacheBatches
from pipeline.cache.store import CacheError
from pipeline.fit.loop import (
    INIT_LR,
    WarmupCosine,
    criterion,
    feature_selection,
    model_config,
    prepare_labels,
    to_device,
    train,
)
from pipeline.fit.run import cached_splits, open_split_caches
from pipeline.model import FusionModel


def test_schedule_is_the_references_per_epoch_warmup_then_cosine():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = WarmupCosine(opt, warmup_epochs=5, max_lr=0.01, min_lr=1e-5, total_epochs=40)
    lrs = []
    for _ in range(42):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == INIT_LR == 2e-5
    assert lrs[1] == pytest.approx(2e-5 + (0.01 - 2e-5) / 5)
    assert lrs[5] == pytest.approx(0.01)
    assert lrs[20] == pytest.approx(1e-5 + (0.01 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 15 / 35)))
    assert lrs[40] == lrs[41] == pytest.approx(1e-5)


def test_an_attn1_ablation_trains_on_the_nine_attn1_layers_and_nothing_else(cached_demo):
    caches = open_split_caches(cached_demo())
    assert len(caches["train"].layers) == 21
    cfg = cached_demo(layer_idxs={"up_blocks": {"attn1": "all"}})
    timesteps, layers = feature_selection(cfg, caches["train"])
    assert timesteps == ["t47", "t45", "t40"]
    assert layers == [f"up_blocks_{i}_attn1_{j}" for i in (1, 2, 3) for j in range(3)]


def test_a_subset_of_the_cache_is_selected_and_missing_timesteps_are_named(cached_demo):
    cfg = cached_demo(save_timesteps=[45], layer_idxs={"up_blocks": {"conv2": [[1, 0], [3, 2]]}})
    caches = open_split_caches(cfg)
    assert feature_selection(cfg, caches["train"]) == (["t45"], ["up_blocks_1_conv2_0", "up_blocks_3_conv2_2"])
    with pytest.raises(CacheError, match=r"no timesteps \['t30'\]; it holds \['t47', 't45', 't40'\]"):
        feature_selection(cached_demo(save_timesteps=[30]), caches["train"])
    with pytest.raises(LayerSpecError, match=r"pair \[0, 0\] matches nothing in cache .*attn1 modules are in up_blocks 1"):
        feature_selection(cached_demo(layer_idxs={"up_blocks": {"attn1": [[0, 0]]}}), caches["train"])


@pytest.mark.parametrize("fuser", ["gw", "lw", "moe"])
def test_each_fuser_overfits_a_small_batch(cached_demo, fuser):
    # Without up_blocks_0, whose maps are 1 x 1 at 64 px: GroupNorm cannot normalise a single
    # routed image there (at 256 px they are 4 x 4).
    cfg = cached_demo(fuser=fuser, layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}})
    caches = open_split_caches(cfg)
    timesteps, layers = feature_selection(cfg, caches["train"])
    torch.manual_seed(0)
    model = FusionModel(model_config(cfg, {l: caches["train"].layer_shapes[l] for l in layers}, timesteps))
    feats, labels, _ = next(CacheBatches(caches["train"], 16, timesteps, layers).epoch(0))
    feats, labels = to_device(feats, "cpu"), prepare_labels(cfg.task, labels, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = criterion(cfg.task, cfg.ignore_index)
    for _ in range(60):
        opt.zero_grad()
        logits, _ = model(feats)
        loss_fn(logits, labels).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(feats)[0].argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95


def test_training_validates_mid_epoch_returns_to_train_mode_and_stops_early(cached_demo, tmp_path):
    cfg = cached_demo(fuser="gw", eval_every_n_steps=1, early_stopping_patience=2, max_train_epochs=50, lr=0.0)
    caches = open_split_caches(cfg)
    timesteps, layers = feature_selection(cfg, caches["train"])
    torch.manual_seed(0)
    model = FusionModel(model_config(cfg, {l: caches["train"].layer_shapes[l] for l in layers}, timesteps))
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training) if torch.is_grad_enabled() else None)
    result = train(cfg, model, cached_splits(cfg, caches, timesteps, layers), tmp_path, "cpu", progress=False)
    # lr 0 never improves on the first validation: stop after 1 + patience validations.
    assert result.metrics["best_step"] == 1 and len(result.history) == 3
    assert modes == [True, True, True]  # every training step ran in train mode
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert set(result.metrics["test"]) >= {"accuracy", "macro_f1", "confusion_matrix"}


def test_model_config_carries_lw_input_and_one_rescale_factor_per_scale():
    from pipeline.config import ConfigError, load_config

    shapes = {"a": (16, 8, 8), "b": (16, 4, 4), "c": (16, 2, 2)}
    cfg = load_config("configs/demo_seg_exp.yaml", {"fuser": "lw", "lw_input": "reference", "rescales": [2, 1, 0.5]})
    config = model_config(cfg, shapes, ["t47"])
    assert config.lw_input == "reference" and config.rescales == [2, 1, 0.5]
    assert FusionModel(config).fuser.input_mode == "reference"
    # The default factors of 1 fit any number of scales.
    assert model_config(load_config("configs/demo_seg_exp.yaml"), shapes, ["t47"]).rescales == [1, 1, 1]
    with pytest.raises(ConfigError, match=r"demo_seg_exp.yaml: rescales \[4, 2, 1, 0.5\] has 4 factors but the selected "
                                          r"layers make 3 scales \(widths \[8, 4, 2\]\); give one factor per scale"):
        model_config(load_config("configs/demo_seg_exp.yaml", {"rescales": [4, 2, 1, 0.5]}), shapes, ["t47"])
