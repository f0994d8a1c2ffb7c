"""Loading DiffusionSat checkpoints in the published layout, on tiny random models."""

import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.backbone.demo import build_demo_backbone
from pipeline.backbone.loader import (
    BackboneError,
    BackboneSpec,
    check_layout,
    fingerprint,
    load_diffusionsat,
    read_scheduler_config,
)
from pipeline.backbone.sat_unet import SatUNet
from pipeline.backbone.schedule import Schedule
from pipeline.extract.extractor import ExtractionSettings, FeatureExtractor
from tests.backbone.unet_inputs import IMG, run_unet, unet_inputs

UNET_DIR = "checkpoint-150000/unet"


@pytest.fixture(scope="module")
def bin_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bin")
    build_demo_backbone(root, img_size=IMG, weights="bin")
    return root


@pytest.fixture(scope="module")
def plain_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    build_demo_backbone(root, img_size=IMG, with_metadata=False)
    return root


def _file_state(spec):
    folder = spec.path / UNET_DIR
    st = folder / "diffusion_pytorch_model.safetensors"
    if st.is_file():
        return load_file(str(st))
    return torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_published_layout_loads(weights, tiny_backbone, bin_root):
    root = tiny_backbone.root if weights == "safetensors" else bin_root
    spec = BackboneSpec(root, img_size=IMG, use_metadata=True)
    model = load_diffusionsat(spec)
    assert isinstance(model.unet, SatUNet) and model.unet.metadata_embedding is not None
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"
    file_state = _file_state(spec)
    assert file_state.keys() == model.unet.state_dict().keys()
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, file_state[key]), key
    latent, t, text = unet_inputs(model)
    assert model.vae.encode(torch.zeros(1, 3, IMG, IMG)).latent_dist.mean.shape == (1, 4, IMG // 8, IMG // 8)
    assert run_unet(model.unet, latent, t, text).shape == latent.shape


def test_bin_and_safetensors_hold_the_same_weights(tiny_backbone, bin_root):
    a = _file_state(tiny_backbone)
    b = _file_state(BackboneSpec(bin_root, img_size=IMG))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metadata_weights_dropped_without_use_metadata(tiny_backbone):
    model = load_diffusionsat(tiny_backbone)
    assert model.unet.metadata_embedding is None and not model.unet.config.use_metadata
    state = model.unet.state_dict()
    file_state = _file_state(tiny_backbone)
    dropped = {k for k in file_state if k.startswith("metadata_embedding.")}
    assert dropped and set(file_state) - dropped == set(state)
    assert all(torch.equal(v, file_state[k]) for k, v in state.items())
    latent, t, text = unet_inputs(model)
    with pytest.raises(ValueError, match="use_metadata=False"):
        run_unet(model.unet, latent, t, text, torch.zeros(2, 7))


def test_checkpoint_without_metadata_weights(plain_root):
    model = load_diffusionsat(BackboneSpec(plain_root, img_size=IMG, use_metadata=False))
    assert model.unet.metadata_embedding is None
    with pytest.raises(BackboneError, match="holds no metadata_embedding weights but use_metadata is true"):
        load_diffusionsat(BackboneSpec(plain_root, img_size=IMG, use_metadata=True))


def _copy(spec, dest):
    shutil.copytree(spec.path, dest / spec.path.name)
    return BackboneSpec(dest, img_size=spec.img_size)


@pytest.mark.parametrize("missing", ["folder", "vae", "weights"])
def test_missing_parts_are_named(missing, tiny_backbone, tmp_path):
    spec = _copy(tiny_backbone, tmp_path)
    if missing == "folder":
        spec, gone = BackboneSpec(tmp_path, img_size=128), tmp_path / "resolution128"
    elif missing == "vae":
        gone = spec.path / "vae"
        shutil.rmtree(gone)
    else:
        gone = spec.path / UNET_DIR
        (gone / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BackboneError) as err:
        load_diffusionsat(spec)
    assert str(gone) in str(err.value)


def test_fingerprint_follows_the_files(tiny_backbone, tmp_path):
    again = BackboneSpec(tmp_path / "again", img_size=IMG)
    build_demo_backbone(again.root, img_size=IMG)
    assert fingerprint(again)["id"] == fingerprint(tiny_backbone)["id"]
    assert fingerprint(BackboneSpec(again.root, img_size=IMG, use_metadata=True))["id"] != fingerprint(again)["id"]

    vae_file = again.path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(vae_file))
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    save_file(state, str(vae_file), metadata={"format": "pt"})
    changed = fingerprint(again)
    assert changed["id"] != fingerprint(tiny_backbone)["id"]
    assert changed["files"]["vae/diffusion_pytorch_model.safetensors"] != fingerprint(tiny_backbone)["files"][
        "vae/diffusion_pytorch_model.safetensors"
    ]


# ---- A checkpoint as DiffusionSat's training code publishes it ----------------------------------
#
# DiffusionSat trained with diffusers 0.17 and transformers 4.x under accelerate: config.json files
# hold the key sets of those versions, weights are torch.save'd state dicts (.bin), the VAE's
# mid-block attention uses the names of diffusers < 0.20, the text encoder's tensors carry the
# "text_model." prefix of transformers 4, and the UNet lies in an accelerate checkpoint folder.

# SatUNet.__init__'s arguments in DiffusionSat's code (its own copy of the 0.17-era UNet).
UNET_CONFIG_KEYS = (
    "sample_size in_channels out_channels center_input_sample flip_sin_to_cos freq_shift down_block_types "
    "mid_block_type up_block_types only_cross_attention block_out_channels layers_per_block downsample_padding "
    "mid_block_scale_factor act_fn norm_num_groups norm_eps cross_attention_dim attention_head_dim "
    "dual_cross_attention use_linear_projection class_embed_type num_class_embeds upcast_attention "
    "resnet_time_scale_shift time_embedding_type timestep_post_act time_cond_proj_dim conv_in_kernel "
    "conv_out_kernel use_metadata num_metadata"
).split()
VAE_CONFIG_KEYS = (
    "in_channels out_channels down_block_types up_block_types block_out_channels layers_per_block act_fn "
    "latent_channels norm_num_groups sample_size scaling_factor"
).split()
# What diffusers 0.17's EMAModel.save_pretrained adds to the UNet's config in unet_ema/.
EMA_CONFIG = {"decay": 0.9999, "inv_gamma": 1.0, "min_decay": 0.0, "optimization_step": 150000,
              "power": 2 / 3, "update_after_step": 0, "use_ema_warmup": False}
OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
SD21_V_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _old_vae_name(key):
    for new, old in OLD_ATTENTION_NAMES.items():
        key = re.sub(rf"(coder\.mid_block\.attentions\.\d+)\.{re.escape(new)}\.", rf"\1.{old}.", key)
    return key


def _added_token(text):
    return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_published_checkpoint(source, dest, dtype=torch.float32):
    """The tiny checkpoint at ``source`` (a resolution folder) rewritten as DiffusionSat published
    its own, with every floating tensor cast to ``dtype``; returns the root above ``dest``."""
    source, dest = Path(source), Path(dest)

    def cast(state):
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}

    _write_json(dest / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.17.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    _write_json(dest / "scheduler" / "scheduler_config.json", SD21_V_SCHEDULER)

    vae_config = json.loads((source / "vae" / "config.json").read_text())
    _write_json(dest / "vae" / "config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": "0.17.0",
                                               **{k: vae_config[k] for k in VAE_CONFIG_KEYS}})
    vae = load_file(str(source / "vae" / "diffusion_pytorch_model.safetensors"))
    torch.save(cast({_old_vae_name(k): v for k, v in vae.items()}), dest / "vae" / "diffusion_pytorch_model.bin")

    te_config = json.loads((source / "text_encoder" / "config.json").read_text())
    del te_config["dtype"]
    te_config.update(_name_or_path="stabilityai/stable-diffusion-2-1", dropout=0.0, transformers_version="4.30.2",
                     torch_dtype=str(dtype).removeprefix("torch."))
    _write_json(dest / "text_encoder" / "config.json", te_config)
    text = {"text_model." + k: v for k, v in load_file(str(source / "text_encoder" / "model.safetensors")).items()}
    # transformers 4 stored the position ids buffer too.
    text["text_model.embeddings.position_ids"] = torch.arange(te_config["max_position_embeddings"])[None]
    torch.save(cast(text), dest / "text_encoder" / "pytorch_model.bin")

    tokenizer = dest / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / "tokenizer" / name, tokenizer / name)
    specials = {"bos_token": _added_token("<|startoftext|>"), "eos_token": _added_token("<|endoftext|>"),
                "unk_token": _added_token("<|endoftext|>")}
    _write_json(tokenizer / "tokenizer_config.json", {
        **specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "name_or_path": "stabilityai/stable-diffusion-2-1", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
    })
    _write_json(tokenizer / "special_tokens_map.json", {**specials, "pad_token": "!"})  # SD-2.1 pads with "!"

    checkpoint = dest / "checkpoint-150000"
    unet_config = json.loads((source / UNET_DIR / "config.json").read_text())
    old_config = {"_class_name": "SatUNet", "_diffusers_version": "0.17.0",
                  **{k: unet_config[k] for k in UNET_CONFIG_KEYS}}
    unet = cast(load_file(str(source / UNET_DIR / "diffusion_pytorch_model.safetensors")))
    _write_json(checkpoint / "unet" / "config.json", old_config)
    torch.save(unet, checkpoint / "unet" / "diffusion_pytorch_model.bin")
    _write_json(checkpoint / "unet_ema" / "config.json", {**old_config, **EMA_CONFIG})
    torch.save({k: v / 2 if v.is_floating_point() else v for k, v in unet.items()},
               checkpoint / "unet_ema" / "diffusion_pytorch_model.bin")
    torch.save({"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2]}]}, checkpoint / "optimizer.bin")
    torch.save({"last_epoch": 150000, "_step_count": 150001}, checkpoint / "scheduler.bin")
    with open(checkpoint / "random_states_0.pkl", "wb") as f:
        pickle.dump({"step": 150000, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                     "torch_manual_seed": torch.get_rng_state()}, f)
    return dest.parent


def _published(tiny_backbone, tmp_path_factory, name, dtype):
    root = tmp_path_factory.mktemp(name)
    return write_published_checkpoint(tiny_backbone.path, root / tiny_backbone.path.name, dtype)


@pytest.fixture(scope="module")
def published(tiny_backbone, tmp_path_factory):
    return _published(tiny_backbone, tmp_path_factory, "published", torch.float32)


@pytest.fixture(scope="module")
def published_fp16(tiny_backbone, tmp_path_factory):
    return _published(tiny_backbone, tmp_path_factory, "published16", torch.float16)


def _saved(path):
    return torch.load(path, weights_only=True)


def _assert_same_tensors(loaded, written):
    assert loaded.keys() == written.keys()
    for key, value in loaded.items():
        assert value.dtype == torch.float32 or not value.is_floating_point(), key
        assert torch.equal(value, written[key].to(value.dtype)), key


@pytest.mark.parametrize("use_metadata", [True, False])
def test_published_checkpoint_loads_every_tensor_intact(use_metadata, published):
    spec = BackboneSpec(published, img_size=IMG, use_metadata=use_metadata)
    model = load_diffusionsat(spec)
    path = spec.path

    unet = _saved(path / UNET_DIR / "diffusion_pytorch_model.bin")
    if not use_metadata:
        unet = {k: v for k, v in unet.items() if not k.startswith("metadata_embedding.")}
    _assert_same_tensors(model.unet.state_dict(), unet)
    assert (model.unet.metadata_embedding is not None) == use_metadata

    vae = _saved(path / "vae" / "diffusion_pytorch_model.bin")
    assert {"encoder.mid_block.attentions.0.query.weight", "decoder.mid_block.attentions.0.proj_attn.bias"} <= set(vae)
    loaded_vae = model.vae.state_dict()
    _assert_same_tensors({_old_vae_name(k): v for k, v in loaded_vae.items()}, vae)
    assert "encoder.mid_block.attentions.0.to_q.weight" in loaded_vae

    text = _saved(path / "text_encoder" / "pytorch_model.bin")
    position_ids = text.pop("text_model.embeddings.position_ids")
    _assert_same_tensors({"text_model." + k: v for k, v in model.text_encoder.state_dict().items()}, text)
    assert torch.equal(model.text_encoder.embeddings.position_ids, position_ids)

    assert model.tokenizer.pad_token == "!" and model.tokenizer.model_max_length == 77
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert Schedule.build(model.scheduler_config, 50, (47,)).timesteps[:2] == (981, 961)


def test_accelerate_state_is_neither_read_nor_hashed(published):
    spec = BackboneSpec(published, img_size=IMG)
    assert all(name.startswith(("scheduler/", "text_encoder/", "tokenizer/", "vae/", "unet/"))
               for name in fingerprint(spec)["files"])
    assert "unet/diffusion_pytorch_model.bin" in fingerprint(spec)["files"]
    ema = load_diffusionsat(BackboneSpec(published, img_size=IMG, unet_subfolder="checkpoint-150000/unet_ema"))
    written = _saved(spec.path / "checkpoint-150000" / "unet_ema" / "diffusion_pytorch_model.bin")
    _assert_same_tensors(ema.unet.state_dict(), {k: v for k, v in written.items() if not k.startswith("metadata_")})


def test_bin_weights_load_without_a_safetensors_lookup(published, caplog):
    caplog.set_level(logging.INFO, logger="diffusers")
    load_diffusionsat(BackboneSpec(published, img_size=IMG))
    assert "An error occurred while trying to fetch" not in caplog.text
    assert "safetensors" not in caplog.text and "unsafe serialization" not in caplog.text
    # diffusers' records do reach caplog, and no weight was left over (the metadata MLPs were dropped).
    assert "All model checkpoint weights were used when initializing SatUNet" in caplog.text


def _features(root, images):
    model = load_diffusionsat(BackboneSpec(root, img_size=IMG, use_metadata=True))
    assert {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()} == {torch.float32}
    extractor = FeatureExtractor(model, ExtractionSettings(save_timesteps=(49, 47), metadata=(100.0,) * 7))
    return extractor(images, ["a", "b"])


def test_float16_checkpoint_extracts_on_cpu(tiny_backbone, published, published_fp16, tmp_path):
    # The float32 checkpoint of the same weights rounded to float16: what the fp16 file holds.
    rounded = tmp_path / "rounded"
    shutil.copytree(published, rounded)
    for file in rounded.rglob("*.bin"):
        state = _saved(file)
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            torch.save({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}, file)

    images = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3)) * 2 - 1
    half, exact, full = (_features(root, images) for root in (published_fp16, rounded, published))
    torch.testing.assert_close(half.latents, exact.latents, rtol=0, atol=0)
    for t, layers in half.maps.items():
        for name, fmap in layers.items():
            torch.testing.assert_close(fmap, exact.maps[t][name], rtol=0, atol=0)
    # Against the unrounded float32 weights: as close as float16 rounding of the weights allows
    # (measured 0.28 % of a layer's largest value).
    assert _max_relative_deviation(half, full) < 0.01


def _max_relative_deviation(a, b):
    return max(
        ((a.maps[t][n].float() - b.maps[t][n].float()).abs().max() / b.maps[t][n].float().abs().max()).item()
        for t in a.maps for n in a.maps[t]
    )


# ---- Metadata MLPs and the weights a model is built with ----------------------------------------


@pytest.mark.parametrize("num_metadata", [5, 9])
def test_num_metadata_must_match_the_weights(num_metadata, tiny_backbone):
    spec = BackboneSpec(tiny_backbone.root, img_size=IMG, use_metadata=True, num_metadata=num_metadata)
    weights = spec.path / UNET_DIR / "diffusion_pytorch_model.safetensors"
    with pytest.raises(BackboneError) as err:
        load_diffusionsat(spec)
    assert str(err.value) == (
        f"{weights} holds 7 metadata MLPs (metadata_embedding.N) but num_metadata is {num_metadata}; "
        "set num_metadata: 7 (or use_metadata: false to drop them)"
    )


def test_only_the_dropped_metadata_goes_unreported(tiny_backbone, tmp_path, caplog):
    load_diffusionsat(tiny_backbone)  # use_metadata false, weights with metadata MLPs
    assert "metadata_embedding" not in caplog.text and "were not used" not in caplog.text

    spec = _copy(tiny_backbone, tmp_path)
    weights = spec.path / UNET_DIR / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["extra_head.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    model = load_diffusionsat(spec)
    assert "were not used when initializing SatUNet" in caplog.text and "extra_head.weight" in caplog.text
    assert "metadata_embedding" not in caplog.text and model.unet.metadata_embedding is None


def _without(file, key):
    """Rewrite a weight file without one tensor, in its own format."""
    if file.suffix == ".safetensors":
        state = load_file(str(file))
        del state[key]
        save_file(state, str(file), metadata={"format": "pt"})
    else:
        state = _saved(file)
        del state[key]
        torch.save(state, file)


@pytest.mark.parametrize("file, key", [
    (UNET_DIR + "/diffusion_pytorch_model.safetensors", "conv_out.bias"),
    (UNET_DIR + "/diffusion_pytorch_model.safetensors", "metadata_embedding.3.linear_2.weight"),
    ("vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.weight"),
    ("text_encoder/model.safetensors", "final_layer_norm.weight"),
    ("vae/diffusion_pytorch_model.bin", "encoder.mid_block.attentions.0.query.weight"),
    ("text_encoder/pytorch_model.bin", "text_model.final_layer_norm.bias"),
])
def test_a_weight_missing_from_its_file_is_an_error(file, key, tiny_backbone, published, tmp_path):
    source = BackboneSpec(published, img_size=IMG) if file.endswith(".bin") else tiny_backbone
    spec = BackboneSpec(_copy(source, tmp_path).root, img_size=IMG, use_metadata=True)
    _without(spec.path / file, key)
    with pytest.raises(BackboneError) as err:
        load_diffusionsat(spec)
    message = str(err.value)
    expected = key.removeprefix("text_model.").replace(".query.", ".to_q.")  # as the model names it
    needs = f"lacks 1 weight that the model built from its config.json needs ({expected})"
    assert message.startswith(f"{spec.path / file} {needs}")
    assert "\n" not in message


def test_a_config_that_does_not_fit_its_weights(tiny_backbone, tmp_path):
    spec = _copy(tiny_backbone, tmp_path)
    config_file = spec.path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [8, 16, 16, 32]
    config_file.write_text(json.dumps(config))
    with pytest.raises(BackboneError) as err:
        load_diffusionsat(spec)
    message = str(err.value)
    assert message.startswith(f"{spec.path / 'vae'}: the VAE cannot be built from its files (")
    assert "\n" not in message


# ---- Damaged files: one line each, before anything is built -------------------------------------


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _edit_json(**changes):
    def edit(path):
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key)
            else:
                data[key] = value
        path.write_text(json.dumps(data))
    return edit


UNET_ST = UNET_DIR + "/diffusion_pytorch_model.safetensors"
UNET_BIN = UNET_DIR + "/diffusion_pytorch_model.bin"
DAMAGED = {
    "unet config truncated": (f"{UNET_DIR}/config.json", _truncate, "is not valid JSON (Unterminated string"),
    "vae config random bytes": ("vae/config.json", _random_bytes, "is not UTF-8 text, so not JSON"),
    "text encoder config a list": ("text_encoder/config.json", lambda p: p.write_text("[1, 2]"),
                                   "holds a JSON list where an object of settings is expected"),
    "model index truncated": ("model_index.json", lambda p: _truncate(p, 0.3), "is not valid JSON"),
    "scheduler not JSON": ("scheduler/scheduler_config.json", lambda p: p.write_text("beta_start: 0.00085\n"),
                           "is not valid JSON (Expecting value: line 1 column 1)"),
    "scheduler a number": ("scheduler/scheduler_config.json", lambda p: p.write_text("1000"),
                           "holds a JSON int where an object of settings is expected"),
    "scheduler without betas": ("scheduler/scheduler_config.json", _edit_json(beta_start=None, beta_schedule=None),
                                "lacks beta_start, beta_schedule, which the DDIM schedule is computed from"),
    "scheduler unknown schedule": ("scheduler/scheduler_config.json", _edit_json(beta_schedule="cosine"),
                                   "beta_schedule 'cosine' is not one of ['linear', 'scaled_linear', "),
    "unet safetensors truncated": (UNET_ST, _truncate,
                                   "is not a readable safetensors file (incomplete metadata, file not fully covered)"),
    "vae safetensors random": ("vae/diffusion_pytorch_model.safetensors", _random_bytes,
                               "is not a readable safetensors file (header too large)"),
    "text encoder safetensors empty": ("text_encoder/model.safetensors", lambda p: p.write_bytes(b""),
                                       "is not a readable safetensors file (header too small)"),
    "unet bin truncated": (UNET_BIN, _truncate, "is not a torch.save zip archive"),
    "unet bin random": (UNET_BIN, _random_bytes, "is not a torch.save zip archive"),
    "text encoder bin truncated": ("text_encoder/pytorch_model.bin", lambda p: _truncate(p, 0.9),
                                   "is not a torch.save zip archive"),
    "vocab truncated": ("tokenizer/vocab.json", _truncate, "is not valid JSON"),
    "vocab ids not numbers": ("tokenizer/vocab.json", lambda p: p.write_text('{"a": "x"}'),
                              "maps 'a' to 'x', not to a token id"),
    "merges random bytes": ("tokenizer/merges.txt", _random_bytes, "is not UTF-8 text"),
    "merges three tokens": ("tokenizer/merges.txt", lambda p: p.write_text("#version: 0.2\na t e\n"),
                            "line 2 is 'a t e', not two tokens separated by a space"),
    "merges blank line": ("tokenizer/merges.txt", lambda p: p.write_text("#version: 0.2\na t\n\ne l\n"),
                          "line 3 is '', not two tokens separated by a space"),
    "merges unknown token": ("tokenizer/merges.txt", lambda p: p.write_text("#version: 0.2\nq z\n"),
                             "line 2 merges 'q z' but vocab.json has no token 'qz'"),
    "tokenizer config truncated": ("tokenizer/tokenizer_config.json", _truncate, "is not valid JSON"),
}


@pytest.fixture(scope="module")
def damaged_sources(tiny_backbone, published):
    return {"safetensors": tiny_backbone, "bin": BackboneSpec(published, img_size=IMG)}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_file_is_one_line_naming_it(case, damaged_sources, tmp_path):
    name, damage, expected = DAMAGED[case]
    source = damaged_sources["bin" if name.endswith(".bin") else "safetensors"]
    spec = BackboneSpec(_copy(source, tmp_path).root, img_size=IMG, use_metadata=True)
    damage(spec.path / name)
    for entry in (check_layout, read_scheduler_config, fingerprint, load_diffusionsat):
        with pytest.raises(BackboneError) as err:
            entry(spec)
        message = str(err.value)
        assert message.startswith(f"{spec.path / name} "), (entry.__name__, message)
        assert expected in message and "restore it from the DiffusionSat download" in message, message
        assert "\n" not in message


def test_check_layout_reads_headers_only(tiny_backbone, published):
    for spec in (tiny_backbone, BackboneSpec(published, img_size=IMG)):
        files = check_layout(spec)
        assert files.unet.path.parent == spec.path / UNET_DIR
        assert set(files.unet.keys) == set(_file_state(spec))
        assert {"vae": files.vae.safetensors, "text_encoder": files.text_encoder.safetensors} == {
            "vae": spec is tiny_backbone, "text_encoder": spec is tiny_backbone}


def test_a_tokenizer_the_library_cannot_build(tiny_backbone, tmp_path):
    spec = _copy(tiny_backbone, tmp_path)
    (spec.path / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    check_layout(spec)  # a JSON object, as far as the cheap checks go
    with pytest.raises(BackboneError) as err:
        load_diffusionsat(spec)
    message = str(err.value)
    assert message.startswith(f"{spec.path / 'tokenizer'}: the tokenizer cannot be built from its files (KeyError: ")
    assert "\n" not in message
