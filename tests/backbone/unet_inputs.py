"""Inputs for a tiny DiffusionSat's UNet: a seeded latent, two timesteps and a caption's encoding."""

import torch

IMG = 64  # the size the tiny_backbone fixture (tests/conftest.py) is built at


def unet_inputs(model):
    batch = 2  # one per timestep below
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, 4, IMG // 8, IMG // 8, generator=gen)
    ids = model.tokenizer(
        ["A satellite image"] * batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (batch, 77)
    with torch.no_grad():
        text = model.text_encoder(ids).last_hidden_state
    return latent, torch.tensor([10, 500]), text


def run_unet(unet, latent, t, text, metadata=None):
    with torch.no_grad():
        return unet(latent, t, text, metadata=metadata).sample
