import dataclasses
import json

import pytest
import torch

from pipeline.fit.resume import STATE_NAME, ResumeError, load_state
from pipeline.fit.run import fit
from pipeline.model import FusionModel

NO_1X1 = {"up_blocks": {"attn1": "all", "conv2": []}}  # GroupNorm cannot normalise one routed 1 x 1 map


def same_run(a: dict, b: dict) -> None:
    for key in ("val", "test", "best_step", "epochs_run", "train_images_seen", "ledger"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("exp, fuser", [("demo_cls", "gw"), ("demo_seg", "moe")])
def test_a_resumed_run_equals_an_uninterrupted_one(cached_demo, tmp_path, exp, fuser):
    # The demo warms up for one epoch, so the first epoch's learning rate does not depend on the
    # number of epochs: a one-epoch fit is the first epoch of a two-epoch one. MoE leaves its
    # dense warm-up (2 steps) in the first epoch and UPerNet draws dropout masks: both must resume.
    cfg = cached_demo(exp, fuser=fuser, max_train_epochs=2, layer_idxs=NO_1X1)
    fit(dataclasses.replace(cfg, max_train_epochs=1), tmp_path / "first", progress=False)
    resumed = fit(dataclasses.replace(cfg, resume_from=str(tmp_path / "first")), tmp_path / "resumed", progress=False)
    whole = fit(cfg, tmp_path / "whole", progress=False)
    same_run(resumed, whole)
    for name in ("history.csv", "model/model.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_state_saved_after_early_stopping_trains_no_further(cached_demo, tmp_path):
    cfg = cached_demo(fuser="gw", eval_every_n_steps=1, early_stopping_patience=2, max_train_epochs=50, lr=0.0)
    first = fit(cfg, tmp_path / "first", progress=False)
    assert first["epochs_run"] == 1
    state = torch.load(tmp_path / "first" / STATE_NAME, weights_only=True)
    # The best was the first validation, not the last step: the state holds the best weights too.
    assert (state["best_step"], state["step"], state["stale"]) == (1, 3, 2) and state["best_model"] is not None
    again = fit(dataclasses.replace(cfg, resume_from=str(tmp_path / "first" / STATE_NAME)), tmp_path / "again",
                progress=False)
    same_run(again, first)
    assert (tmp_path / "again" / "history.csv").read_bytes() == (tmp_path / "first" / "history.csv").read_bytes()


@pytest.fixture
def saved(cached_demo, tmp_path):
    """A one-epoch GW fit and its config."""
    cfg = cached_demo(fuser="gw", max_train_epochs=1)
    fit(cfg, tmp_path / "run", progress=False)
    return cfg, tmp_path / "run"


@pytest.mark.parametrize("overrides, message", [
    ({"fuser": "lw"}, "fuser: state 'gw', this config 'lw'"),
    ({"save_timesteps": [47, 45]}, "timesteps: state ['t47', 't45', 't40'], this config ['t47', 't45']"),
    ({"layer_idxs": {"up_blocks": {"attn1": "all", "conv2": [[3, 2]]}}}, "layers: only the state has ['up_blocks_0_conv2_0', "),
    ({"limited_label": 0.5}, "limited_label: state None, this config 0.5"),
])
def test_a_state_of_another_experiment_is_refused_in_one_line(saved, tmp_path, overrides, message):
    cfg, run = saved
    with pytest.raises(ResumeError) as err:
        fit(dataclasses.replace(cfg, resume_from=str(run), **overrides), tmp_path / "other", progress=False)
    text = str(err.value)
    assert text.startswith(f"resume_from {run / STATE_NAME}: the state belongs to another experiment (")
    assert message in text and "\n" not in text
    assert not (tmp_path / ".other.partial").exists()  # refused before any output


def test_other_layer_shapes_and_tasks_are_named(saved):
    cfg, run = saved
    model = FusionModel(json_config(run))
    layer = next(iter(model.config.layer_shapes))
    shapes = {**model.config.layer_shapes, layer: (7, 1, 1)}
    other = FusionModel(dataclasses.replace(model.config, layer_shapes=shapes))
    with pytest.raises(ResumeError, match=rf"shape of {layer}: state \[\d+, 1, 1\], this config \[7, 1, 1\]"):
        load_state(str(run), other, cfg, torch.device("cpu"))
    with pytest.raises(ResumeError, match="task: state 'classification', this config 'segmentation'"):
        load_state(str(run), model, dataclasses.replace(cfg, task="segmentation"), torch.device("cpu"))


def json_config(run):
    from pipeline.model import ModelConfig

    return ModelConfig.from_dict(json.loads((run / "model" / "config.json").read_text()))


def test_missing_truncated_and_foreign_states_are_refused_in_one_line(saved, tmp_path):
    cfg, run = saved
    model, cpu = FusionModel(json_config(run)), torch.device("cpu")
    with pytest.raises(ResumeError, match=rf"resume_from {tmp_path / 'none'}: no training state there \(expected the "
                                          "output folder of a fit, holding training_state.pt, or that file\\)$"):
        load_state(str(tmp_path / "none"), model, cfg, cpu)
    stopped = tmp_path / ".none.partial"
    stopped.mkdir()
    (stopped / STATE_NAME).write_bytes((run / STATE_NAME).read_bytes())
    with pytest.raises(ResumeError, match=f"the state of a fit into it that did not finish is {stopped / STATE_NAME}"):
        load_state(str(tmp_path / "none"), model, cfg, cpu)

    state = (run / STATE_NAME).read_bytes()
    bad = tmp_path / "bad.pt"
    for content in (state[: len(state) // 2], b"garbage" * 100):
        bad.write_bytes(content)
        with pytest.raises(ResumeError) as err:
            load_state(str(bad), model, cfg, cpu)
        assert str(err.value).startswith(f"resume_from {bad}: not a readable training state (")
        assert "\n" not in str(err.value)
    torch.save({"epoch": 3, "global_step": 90, "decoder_net": {}, "optimizer_state_dict": {}, "lr_scheduler": {}}, bad)
    with pytest.raises(ResumeError, match="not a training state of `satdifuser fit`"):  # the reference's checkpoint
        load_state(str(bad), model, cfg, cpu)


def test_changed_training_settings_are_allowed_and_logged(saved, tmp_path, caplog):
    import logging

    cfg, run = saved
    caplog.set_level(logging.WARNING, logger="pipeline.fit.resume")
    metrics = fit(dataclasses.replace(cfg, resume_from=str(run), max_train_epochs=2), tmp_path / "more", progress=False)
    assert metrics["epochs_run"] == 2
    assert "resuming with changed settings: max_train_epochs: state 1, this config 2" in caplog.text
