import json

import pytest
import torch

from pipeline.model import FusionModel, ModelConfig

SHAPES = {"b_1_attn1_0": (16, 4, 4), "a_0_conv2_0": (8, 2, 2)}


@pytest.mark.parametrize("fuser, head", [("gw", "linear"), ("moe", "upernet")])
def test_saved_model_describes_itself_and_reloads_equal(tmp_path, fuser, head):
    torch.manual_seed(0)
    model = FusionModel(ModelConfig(fuser, head, SHAPES, ["t47", "t40"], 3, projection_dim=128, channels=16,
                                    moe_warmup_steps=0)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fuser"] == fuser and config["layer_shapes"]["a_0_conv2_0"] == [8, 2, 2]
    again = FusionModel.from_pretrained(tmp_path).eval()
    x = {t: {l: torch.randn(2, *s) for l, s in SHAPES.items()} for t in ("t47", "t40")}
    with torch.no_grad():
        torch.testing.assert_close(model(x, (8, 8))[0], again(x, (8, 8))[0])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        FusionModel.from_pretrained(tmp_path)
