import json

import pytest
import torch
from safetensors.torch import save_file

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


def test_lw_input_and_rescales_are_saved_and_older_models_load_as_paper(tmp_path):
    shapes = {"b_0": (16, 4, 4), "b_1": (8, 4, 4), "a_0": (8, 2, 2)}
    torch.manual_seed(0)
    model = FusionModel(ModelConfig("lw", "upernet", shapes, ["t47"], 3, projection_dim=128, channels=16,
                                    rescales=[2, 1], lw_input="reference")).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lw_input"] == "reference" and config["rescales"] == [2, 1]
    again = FusionModel.from_pretrained(tmp_path).eval()
    assert again.fuser.input_mode == "reference"
    x = {"t47": {l: torch.randn(2, *s) for l, s in shapes.items()}}
    with torch.no_grad():
        torch.testing.assert_close(model(x, (8, 8))[0], again(x, (8, 8))[0])
    # A model saved before either key existed: the paper's LW input, no resampling.
    del config["lw_input"], config["rescales"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.neck.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    old = FusionModel.from_pretrained(tmp_path)
    assert old.config.lw_input == "paper" and old.fuser.input_mode == "paper" and old.config.rescales == [1, 1, 1, 1]


@pytest.fixture
def saved_model(tmp_path):
    FusionModel(ModelConfig("gw", "linear", SHAPES, ["t47"], 3, projection_dim=128)).save_pretrained(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    path = folder / "config.json"
    values = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors is not a readable safetensors file ("),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x01" * 64), "model.safetensors is not a readable safetensors file ("),
    (lambda d: (d / "config.json").write_text('{"fuser": "gw",'), "config.json is not valid JSON ("),
    (lambda d: edit_config(d, fuser=None), "config.json is not a saved model's config (missing keys ['fuser'], unknown keys [])"),
    (lambda d: edit_config(d, dropout=0.1), "(missing keys [], unknown keys ['dropout'])"),
    (lambda d: edit_config(d, fuser="mlp"), "config.json does not describe a model that can be built (fuser 'mlp' is not one of"),
    (lambda d: edit_config(d, layer_shapes=[1, 2]), "config.json does not describe a model that can be built ("),
    (lambda d: edit_config(d, projection_dim=256), "model.safetensors does not hold the weights config.json describes ("),
])
def test_a_damaged_model_folder_is_refused_in_one_line(saved_model, damage, message):
    from pipeline.model import ModelError

    damage(saved_model)
    with pytest.raises(ModelError) as err:
        FusionModel.from_pretrained(saved_model)
    assert str(err.value).startswith(str(saved_model)) and message in str(err.value), str(err.value)
    assert str(err.value).endswith("re-run `satdifuser fit` or restore the folder from a copy") and "\n" not in str(err.value)
