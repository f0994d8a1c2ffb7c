"""Heads saved by the reference's run.py, imported as our model folders."""

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from pipeline.model import FusionModel
from pipeline.reference_checkpoint import ReferenceCheckpointError, import_reference, read_checkpoint

# Written by torch.save in the reference's checkpoint layout with a real OmegaConf DictConfig
# (omegaconf 2.4.0) as its config, and an empty decoder.
FIXTURE = Path(__file__).parent / "fixtures" / "reference_checkpoint_config.pth"


def reference_state(model: FusionModel) -> dict:
    """Our model's weights under the reference's names: its decoder inherits fuser and head, so
    names carry no prefix, and LW's gate conv is a ``gate_conv`` of a per-scale module."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "fuser.train_steps":  # the reference's counter is not saved
            continue
        key = key.split(".", 1)[1]
        state[re.sub(r"^gate_modules\.(\d+)\.", r"gate_modules.\1.gate_conv.", key)] = value.clone()
    return state


def save_reference(path, model: FusionModel, cfg, **config_changes) -> None:
    config = {"task": cfg.task, "fuser": cfg.fuser, "num_classes": cfg.num_classes, "projection_dim": cfg.projection_dim,
              "save_timesteps": list(cfg.save_timesteps), "num_experts": cfg.num_experts, "top_k": cfg.top_k,
              **config_changes}
    torch.save({"epoch": 3, "global_step": 40, "config": config, "decoder_net": reference_state(model),
                "optimizer_state_dict": {}, "lr_scheduler": {}}, path)


def trained_like(cfg) -> FusionModel:
    from pipeline.cache.reader import open_cache
    from pipeline.fit.loop import feature_selection, model_config

    cache = open_cache(cfg.cache_path("train"))
    timesteps, layers = feature_selection(cfg, cache)
    config = model_config(dataclasses.replace(cfg, lw_input="reference"), {l: cache.layer_shapes[l] for l in layers},
                          timesteps)
    torch.manual_seed(3)
    model = FusionModel(config)
    with torch.no_grad():  # BatchNorm statistics as a trained head would have them
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return model


def test_the_config_of_a_real_omegaconf_checkpoint_is_read_without_omegaconf():
    weights, settings = read_checkpoint(FIXTURE)
    assert weights == {}
    assert settings["fuser"] == "lw" and settings["save_timesteps"] == [47, 45, 40] and settings["num_classes"] == 10
    assert settings["layer_idxs"] == {"up_blocks": {"attn1": "all", "conv2": "all"}} and settings["limited_label"] is None


@pytest.mark.parametrize("exp, fuser", [("demo_cls", "lw"), ("demo_seg", "moe"), ("demo_cls", "gw")])
def test_an_imported_head_is_the_reference_decoder_and_evaluates(cached_demo, tmp_path, exp, fuser):
    from pipeline.fit.run import evaluate_saved

    # Two experts, both chosen: top-k routing never sends a single image to an expert, which the
    # GroupNorm of the tiny backbone's 1 x 1 maps could not normalise.
    cfg = cached_demo(exp, fuser=fuser, **({"num_experts": 2, "top_k": 2} if fuser == "moe" else {}))
    model = trained_like(cfg)
    names = set(reference_state(model))
    # Names as the reference's modules make them.
    if fuser != "moe":
        assert "bottleneck_layers.0.0.conv1.weight" in names and "bottleneck_layers.0.0.conv1.norm.weight" in names
    if fuser == "lw":
        assert "gate_modules.0.gate_conv.weight" in names and "decoder_head.2.weight" in names
    if fuser == "moe":
        assert "scale_moes.0.experts.0.0.conv3.weight" in names and "scale_moes.0.temperature" in names
        assert "psp_modules.0.1.weight" in names and "fpn_bottleneck.1.running_var" in names and "conv_seg.bias" in names
    save_reference(tmp_path / "best_ckpt_step_40.pth", model, cfg)

    out = import_reference(tmp_path / "best_ckpt_step_40.pth", cfg, tmp_path / "imported")
    again = FusionModel.from_pretrained(out)
    for key, value in model.state_dict().items():
        if key != "fuser.train_steps":
            assert torch.equal(again.state_dict()[key], value), key
    assert again.config.lw_input == "reference"
    if fuser == "moe":  # routed top-k, as the reference tests it after its warm-up
        assert int(again.fuser.train_steps) >= again.config.moe_warmup_steps
    model.save_pretrained(tmp_path / "ours")
    if fuser == "moe":
        model.fuser.train_steps.fill_(again.config.moe_warmup_steps)
        model.save_pretrained(tmp_path / "ours")
    assert evaluate_saved(cfg, out, "test") == evaluate_saved(cfg, tmp_path / "ours", "test")


def test_a_checkpoint_of_another_experiment_is_refused_naming_what_differs(cached_demo, tmp_path):
    cfg = cached_demo("demo_cls", fuser="gw")
    model = trained_like(cfg)
    save_reference(tmp_path / "c.pth", model, cfg, num_classes=7, save_timesteps=[49, 45, 40])
    with pytest.raises(ReferenceCheckpointError) as err:
        import_reference(tmp_path / "c.pth", cfg, tmp_path / "out")
    message = str(err.value)
    assert "num_classes: checkpoint 7, config 4" in message and "save_timesteps: checkpoint [49, 45, 40]" in message
    assert message.endswith("import it with the experiment config it was trained with") and "\n" not in message
    assert not (tmp_path / "out").exists()

    weights = reference_state(model)
    weights["mixing_weights"] = torch.ones(5)
    torch.save({"decoder_net": weights, "config": None}, tmp_path / "w.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"w.pth: its weights do not fit the model .*mixing_weights"):
        import_reference(tmp_path / "w.pth", cfg, tmp_path / "out")
    torch.save({"decoder_net": {**reference_state(model), "classifier.weight": torch.ones(1)}}, tmp_path / "x.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"weights \['classifier.weight'\] belong to no fuser or head"):
        import_reference(tmp_path / "x.pth", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_files_that_are_no_reference_checkpoint_get_one_line(tmp_path):
    with pytest.raises(ReferenceCheckpointError, match=r"none.pth: no such file \(expected a .pth checkpoint"):
        read_checkpoint(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ReferenceCheckpointError) as err:
        read_checkpoint(tmp_path / "junk.pth")
    assert str(err.value).startswith(f"{tmp_path / 'junk.pth'}: not a readable checkpoint (") and "\n" not in str(err.value)
    torch.save({"epoch": 1, "model": {"w": torch.ones(1)}, "note": "x"}, tmp_path / "other.pth")
    with pytest.raises(ReferenceCheckpointError,
                       match=r"other.pth: holds no 'decoder_net' \(keys \['epoch', 'model', 'note'\]\)"):
        read_checkpoint(tmp_path / "other.pth")
    # A pickled object of any other class is not run.
    torch.save({"decoder_net": {}, "config": argparse.Namespace(fuser="gw")}, tmp_path / "code.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"code.pth: not a readable checkpoint \(.*argparse.Namespace"):
        read_checkpoint(tmp_path / "code.pth")


def test_import_reference_on_the_command_line(cached_demo, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    cfg = cached_demo("demo_cls", fuser="lw")
    save_reference(tmp_path / "best.pth", trained_like(cfg), cfg)
    keys = ("cache_dir", "geobench_dir", "pretrained_model_name_or_path", "img_size", "shard_size", "num_workers",
            "device", "projection_dim", "fuser")
    sets = [arg for key in keys for arg in ("--set", f"{key}={getattr(cfg, key)}")]
    result = CliRunner().invoke(app, ["import-reference", str(tmp_path / "best.pth"), "--config", "configs/demo_cls_exp.yaml",
                                      "--out", str(tmp_path / "m"), *sets])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'm'}: lw head from {tmp_path / 'best.pth'}; evaluate it with `satdifuser evaluate" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "README.md").is_file()
    result = CliRunner().invoke(app, ["import-reference", str(tmp_path / "none.pth"), "--config", "configs/demo_cls_exp.yaml",
                                      "--out", str(tmp_path / "n"), *sets])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "none.pth: no such file" in result.output
