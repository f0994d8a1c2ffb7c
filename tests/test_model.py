import json
from pathlib import Path

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


def test_a_reloaded_moe_routes_as_it_did_when_saved(tmp_path, caplog):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = FusionModel(ModelConfig("moe", "linear", SHAPES, ["t47"], 3, projection_dim=128, num_experts=4, top_k=1,
                                    moe_warmup_steps=5))
    x = {"t47": {l: torch.randn(6, *s) for l, s in SHAPES.items()}}
    for _ in range(7):  # past the warm-up: top-k routing
        model(x)
    model.eval()
    model.save_pretrained(tmp_path)
    again = FusionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        routed, aux = again(x)
        torch.testing.assert_close(routed, model(x)[0])
    assert int(again.fuser.train_steps) == 7 and aux["dense"] is False
    # A model saved before the count was kept: dense, as it was then, and said so.
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["fuser.train_steps"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    old = FusionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert old(x)[1]["dense"] is True
    assert "holds no MoE step count (saved by an older version): it routes as in its warm-up" in caplog.text


def hub_cache(cache: Path, repo: str, files: Path) -> None:
    """``files`` laid out as the Hugging Face cache holds a downloaded repo's main revision."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "README.md"):
        (snapshot / name).write_bytes((files / name).read_bytes())
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)


def test_a_model_loads_by_hub_repo_id_and_its_folder_has_a_model_card(tmp_path, monkeypatch):
    from pipeline.model import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = FusionModel(ModelConfig("gw", "linear", SHAPES, ["t47"], 3, projection_dim=128)).eval()
    model.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "satdifuser-cache" in card
    hub_cache(tmp_path / "hub", "lab/gw-meurosat", tmp_path / "saved")
    again = FusionModel.from_pretrained("lab/gw-meurosat", cache_dir=tmp_path / "hub").eval()
    x = {"t47": {l: torch.randn(2, *s) for l, s in SHAPES.items()}}
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], model(x)[0])
    with pytest.raises(ModelError) as err:
        FusionModel.from_pretrained("lab/unknown", cache_dir=tmp_path / "hub")
    message = str(err.value)
    assert message.startswith("lab/unknown: no such model folder, and not a Hub model this machine can fetch (")
    assert "\n" not in message and message.endswith("or a repo id with network access (or already in the Hugging Face cache)")
