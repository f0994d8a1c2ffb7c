"""DiffusionSat's UNet: the metadata term against a hand computation, its config round trip, its size."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.backbone.demo import SD21_UNET_CONFIG, tiny_unet_config
from pipeline.backbone.loader import BackboneSpec, load_diffusionsat
from pipeline.backbone.sat_unet import SatUNet
from tests.backbone.unet_inputs import IMG, run_unet, unet_inputs


@pytest.fixture(scope="module")
def meta_model(tiny_backbone):
    return load_diffusionsat(BackboneSpec(tiny_backbone.root, img_size=IMG, use_metadata=True))


def test_metadata_changes_the_output(meta_model):
    latent, t, text = unet_inputs(meta_model)
    md = torch.tensor([[100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0],
                       [900.0, 10.0, 0.0, 50.0, 999.0, 1.0, 5.0]])
    out = run_unet(meta_model.unet, latent, t, text, md)
    other = run_unet(meta_model.unet, latent, t, text, md.flip(0))
    zeros = run_unet(meta_model.unet, latent, t, text, torch.zeros_like(md))
    none = run_unet(meta_model.unet, latent, t, text)
    assert not torch.allclose(out, other, atol=1e-4)
    assert not torch.allclose(out, zeros, atol=1e-4)
    torch.testing.assert_close(zeros, none, rtol=0, atol=0)


def test_metadata_of_the_wrong_shape_is_refused(meta_model):
    latent, t, text = unet_inputs(meta_model)
    with pytest.raises(ValueError) as err:
        run_unet(meta_model.unet, latent, t, text, torch.zeros(2, 5))
    assert str(err.value) == "metadata has shape (2, 5); expected (batch, 7) values normalised to 0-1000"


def test_config_round_trip_keeps_every_argument(tmp_path):
    # diffusers builds from config.json by the signature of __init__: both our keys and the
    # parent's must survive, or a saved SatUNet would come back as another model.
    config = tiny_unet_config(sample_size=8, num_metadata=3, upcast_attention=False, attention_head_dim=(2, 2, 4, 4))
    torch.manual_seed(0)
    unet = SatUNet(**config)
    again = SatUNet.from_config(unet.config)
    for key, value in config.items():
        got = again.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, (list, tuple)) else value), key
    assert len(again.metadata_embedding) == 3

    unet.save_pretrained(str(tmp_path))
    loaded = SatUNet.from_pretrained(str(tmp_path))
    assert loaded.config.num_metadata == 3 and not loaded.config.upcast_attention
    mine, theirs = unet.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


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
    latent, t, text = unet_inputs(meta_model)
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
    torch.testing.assert_close(run_unet(unet, latent, t, text, md), expected, rtol=1e-4, atol=1e-5)


def test_sd21_parameter_counts():
    with torch.device("meta"):
        counts = {md: sum(p.numel() for p in SatUNet(**{**SD21_UNET_CONFIG, "use_metadata": md}).parameters())
                  for md in (False, True)}
    # Seven TimestepEmbedding(320, 1280) MLPs: 7 * (320*1280 + 1280 + 1280*1280 + 1280).
    assert counts == {False: 865_910_724, True: 865_910_724 + 14_353_920}
