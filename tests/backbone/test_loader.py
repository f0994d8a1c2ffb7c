"""Loading DiffusionSat checkpoints in the published layout, on tiny random models."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.backbone.demo import SD21_UNET_CONFIG, build_demo_backbone
from pipeline.backbone.loader import BackboneError, BackboneSpec, fingerprint, load_diffusionsat
from pipeline.backbone.sat_unet import SatUNet

IMG = 64
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


@pytest.fixture(scope="module")
def meta_model(tiny_backbone):
    return load_diffusionsat(BackboneSpec(tiny_backbone.root, img_size=IMG, use_metadata=True))


def _file_state(spec):
    folder = spec.path / UNET_DIR
    st = folder / "diffusion_pytorch_model.safetensors"
    if st.is_file():
        return load_file(str(st))
    return torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)


def _inputs(model, batch=2):
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, 4, IMG // 8, IMG // 8, generator=gen)
    ids = model.tokenizer(
        ["A satellite image"] * batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (batch, 77)
    with torch.no_grad():
        text = model.text_encoder(ids).last_hidden_state
    return latent, torch.tensor([10, 500]), text


def _run(unet, latent, t, text, metadata=None):
    with torch.no_grad():
        return unet(latent, t, text, metadata=metadata).sample


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
    latent, t, text = _inputs(model)
    assert model.vae.encode(torch.zeros(1, 3, IMG, IMG)).latent_dist.mean.shape == (1, 4, IMG // 8, IMG // 8)
    assert _run(model.unet, latent, t, text).shape == latent.shape


def test_bin_and_safetensors_hold_the_same_weights(tiny_backbone, bin_root):
    a = _file_state(tiny_backbone)
    b = _file_state(BackboneSpec(bin_root, img_size=IMG))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metadata_changes_the_output(meta_model):
    latent, t, text = _inputs(meta_model)
    md = torch.tensor([[100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0],
                       [900.0, 10.0, 0.0, 50.0, 999.0, 1.0, 5.0]])
    out = _run(meta_model.unet, latent, t, text, md)
    other = _run(meta_model.unet, latent, t, text, md.flip(0))
    zeros = _run(meta_model.unet, latent, t, text, torch.zeros_like(md))
    none = _run(meta_model.unet, latent, t, text)
    assert not torch.allclose(out, other, atol=1e-4)
    assert not torch.allclose(out, zeros, atol=1e-4)
    torch.testing.assert_close(zeros, none, rtol=0, atol=0)


def test_metadata_weights_dropped_without_use_metadata(tiny_backbone):
    model = load_diffusionsat(tiny_backbone)
    assert model.unet.metadata_embedding is None and not model.unet.config.use_metadata
    state = model.unet.state_dict()
    file_state = _file_state(tiny_backbone)
    dropped = {k for k in file_state if k.startswith("metadata_embedding.")}
    assert dropped and set(file_state) - dropped == set(state)
    assert all(torch.equal(v, file_state[k]) for k, v in state.items())
    latent, t, text = _inputs(model)
    with pytest.raises(ValueError, match="use_metadata=False"):
        _run(model.unet, latent, t, text, torch.zeros(2, 7))


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


def test_build_refuses_to_overwrite(tiny_backbone):
    with pytest.raises(ValueError, match=str(tiny_backbone.path)):
        build_demo_backbone(tiny_backbone.root, img_size=IMG)


# ---- DiffusionSat's formula, computed by hand -------------------------------------------------


def _sinusoid(x, dim):
    # SD's timestep projection: flip_sin_to_cos true, freq_shift 0, max period 10000.
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _mlp(embedding, x):
    return F.linear(F.silu(F.linear(x, embedding.linear_1.weight, embedding.linear_1.bias)),
                    embedding.linear_2.weight, embedding.linear_2.bias)


def _metadata_embedding(unet, metadata):
    dim = unet.config.block_out_channels[0]
    return sum(_mlp(mlp, _sinusoid(metadata[:, i], dim)) for i, mlp in enumerate(unet.metadata_embedding))


def test_forward_matches_diffusionsat_formula(meta_model):
    from diffusers import UNet2DConditionModel

    unet = meta_model.unet
    latent, t, text = _inputs(meta_model)
    md = torch.tensor([[12.0, 345.0, 678.0, 910.0, 1000.0, 0.0, 55.5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    with torch.no_grad():
        hand = _metadata_embedding(unet, md)
        torch.testing.assert_close(unet.get_class_embed(latent, md), hand, rtol=1e-5, atol=1e-5)

        # The plain SD UNet with the same weights, the metadata term added to its time embedding.
        drop = ("use_metadata", "num_metadata")
        config = {k: v for k, v in unet.config.items() if k not in drop and not k.startswith("_")}
        plain = UNet2DConditionModel(**config).eval()
        state = {k: v for k, v in unet.state_dict().items() if not k.startswith("metadata_embedding.")}
        plain.load_state_dict(state)
        plain.time_embedding.register_forward_hook(lambda mod, args, out: out + hand)
        expected = plain(latent, t, text).sample
    torch.testing.assert_close(_run(unet, latent, t, text, md), expected, rtol=1e-4, atol=1e-5)


def test_sd21_parameter_counts():
    with torch.device("meta"):
        counts = {md: sum(p.numel() for p in SatUNet(**{**SD21_UNET_CONFIG, "use_metadata": md}).parameters())
                  for md in (False, True)}
    # Seven TimestepEmbedding(320, 1280) MLPs: 7 * (320*1280 + 1280 + 1280*1280 + 1280).
    assert counts == {False: 865_910_724, True: 865_910_724 + 14_353_920}


def test_full_size_vae_is_stable_diffusions():
    from diffusers import AutoencoderKL

    from pipeline.backbone.demo import tiny_vae_config

    with torch.device("meta"):
        vae = AutoencoderKL(**tiny_vae_config(256, full_size=True))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD's released VAE
