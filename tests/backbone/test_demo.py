"""The tiny DiffusionSat written in the published layout: its files, its seeds and its checks."""

import json

import pytest
import torch

from pipeline.backbone.demo import build_demo_backbone, tiny_vae_config
from pipeline.backbone.loader import load_diffusionsat
from pipeline.errors import UserError
from tests.backbone.unet_inputs import IMG

UNET_DIR = "checkpoint-150000/unet"


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_one_seed_writes_the_same_bytes_and_another_other_weights(tiny_backbone, tmp_path):
    again = build_demo_backbone(tmp_path / "again", img_size=IMG)
    other = build_demo_backbone(tmp_path / "other", img_size=IMG, seed=1)
    first, second, third = _files(tiny_backbone.path), _files(again), _files(other)
    assert first == second
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 3 and all(first[name] != third[name] for name in weights)
    assert {k: v for k, v in first.items() if k not in weights} == {k: v for k, v in third.items() if k not in weights}


def test_the_unet_is_saved_as_the_published_satunet(tiny_backbone):
    config = json.loads((tiny_backbone.path / UNET_DIR / "config.json").read_text())
    assert config["_class_name"] == "SatUNet"
    assert (config["use_metadata"], config["num_metadata"], config["sample_size"]) == (True, 7, IMG // 8)
    assert config["block_out_channels"] == [16, 32, 32, 32] and config["use_linear_projection"]
    assert json.loads((tiny_backbone.path / "model_index.json").read_text())["unet"] == [
        "diffusers", "UNet2DConditionModel"]


def test_the_tokenizer_folder_has_the_released_files_and_merges(tiny_backbone):
    folder = tiny_backbone.path / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    assert not (folder / "tokenizer.json").exists()
    tokenizer = load_diffusionsat(tiny_backbone).tokenizer
    # BPE on the few merges: "a t" joins; "i t" does not, as the t of "it" is the word-final "t</w>".
    assert tokenizer.tokenize("ate it") == ["at", "e</w>", "i", "t</w>"]


def test_the_vae_posterior_is_narrow(tiny_backbone):
    vae = load_diffusionsat(tiny_backbone).vae
    image = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
    torch.testing.assert_close(posterior.std, torch.full_like(posterior.std, torch.exp(torch.tensor(-6.0)).item()))
    assert posterior.mean.shape == (1, 4, IMG // 8, IMG // 8)
    # The mean is scaled so that latents x 0.18215 have about unit std, the range SD's UNet expects
    # (0.97 on this image; an unscaled random VAE gives about 0.03).
    assert 0.5 < float((posterior.mean * 0.18215).std()) < 2


def test_build_refuses_to_overwrite(tiny_backbone):
    with pytest.raises(ValueError, match=str(tiny_backbone.path)):
        build_demo_backbone(tiny_backbone.root, img_size=IMG)


@pytest.mark.parametrize("kwargs, message", [
    ({"img_size": 60}, "img_size (--img-size) must be a positive multiple of 8 (the VAE downsamples by 8), not 60; "
                       "e.g. 64 or 128"),
    ({"img_size": 0}, "img_size (--img-size) must be a positive multiple of 8 (the VAE downsamples by 8), not 0; "
                      "e.g. 64 or 128"),
    ({"weights": "ckpt"}, "weights must be 'safetensors' or 'bin', not 'ckpt'"),
])
def test_bad_arguments_are_one_line_and_write_nothing(kwargs, message, tmp_path):
    with pytest.raises(UserError) as err:
        build_demo_backbone(tmp_path / "root", **{"img_size": IMG, **kwargs})
    assert str(err.value) == message
    assert not (tmp_path / "root").exists()


def test_full_size_vae_is_stable_diffusions():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**tiny_vae_config(256, full_size=True))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD's released VAE
