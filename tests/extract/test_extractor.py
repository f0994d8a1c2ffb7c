import pytest
import torch

from pipeline.backbone.layers import as_map, capture
from pipeline.backbone.loader import BackboneSpec, load_diffusionsat
from pipeline.backbone.schedule import ddim_scheduler
from pipeline.extract.extractor import (
    LATENT_SCALE,
    ExtractionSettings,
    FeatureExtractor,
    sample_seed,
    seeded_normal,
)

SAVE = (47, 45, 40)


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return load_diffusionsat(tiny_backbone)


def reference_inversion(model, layers, latents, cond, num_timesteps=50, save=SAVE):
    """The reference's generalized_steps (inversion, eta 0, no guidance), written out step by step."""
    scheduler = ddim_scheduler(model.scheduler_config)
    scheduler.set_timesteps(num_timesteps)
    seq = torch.flip(scheduler.timesteps, dims=(0,))
    b = scheduler.betas
    seq_next = [-1] + list(seq[:-1])
    n = latents.shape[0]
    xs, feats = [latents], {}
    for i, (t, next_t) in enumerate(zip(seq_next, seq)):
        if i >= num_timesteps - min(save):
            break
        t, next_t = torch.ones(n) * t, torch.ones(n) * next_t
        at = torch.ones_like(t) if t.sum().item() == -n else (1 - b).cumprod(dim=0).index_select(0, t.long())
        at_next = torch.ones_like(t) if next_t.sum().item() == -n else (1 - b).cumprod(dim=0).index_select(0, next_t.long())
        at, at_next = at[:, None, None, None], at_next[:, None, None, None]
        cur_t = len(seq_next) - i - 1
        xt = xs[-1]
        with capture(layers) as store:
            et = model.unet(xt, t, encoder_hidden_states=cond).sample
        if cur_t in save:
            feats[cur_t] = {name: as_map(out) for name, out in store.items()}
        x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
        xs.append(at_next.sqrt() * x0_t + (1 - at_next).sqrt() * et)
    return feats


def test_inversion_features_equal_the_reference_loop(model):
    extractor = FeatureExtractor(model, ExtractionSettings(latent="mean"))
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    ours = extractor.features(latents, ["a", "b"])
    cond = extractor.cond.expand(2, -1, -1)
    ref = reference_inversion(model, extractor.layers, latents, cond)
    assert sorted(ours.maps) == ["t40", "t45", "t47"]
    for label in SAVE:
        for name, fmap in ref[label].items():
            torch.testing.assert_close(ours.maps[f"t{label}"][name], fmap.to(torch.float16), rtol=0, atol=0)
            torch.testing.assert_close(ours.pooled[f"t{label}"][name], fmap.mean(dim=(2, 3)))


def test_trajectory_holds_the_unet_input_of_each_saved_pass(model):
    extractor = FeatureExtractor(model, ExtractionSettings(latent="mean", save_timesteps=(49, 48)))
    latents = torch.randn(1, 4, 8, 8)
    out = extractor.features(latents, ["a"])
    torch.testing.assert_close(out.trajectory["t49"], latents)  # first pass: the clean latent at t = -1
    assert not torch.equal(out.trajectory["t48"], latents)


def test_latents_are_seeded_per_sample_not_per_batch(model):
    extractor = FeatureExtractor(model, ExtractionSettings(seed=7))
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    together = extractor.encode(images, ["x", "y", "z"])
    alone = extractor.encode(images[[2, 0]], ["z", "x"])
    torch.testing.assert_close(alone, together[[2, 0]], rtol=0, atol=1e-6)
    dist = model.vae.encode(images).latent_dist
    eps = seeded_normal(dist.mean.shape[1:], ["x"], 7, "latent")
    torch.testing.assert_close(together[:1], (dist.mean[:1] + dist.std[:1] * eps) * LATENT_SCALE)
    mean = FeatureExtractor(model, ExtractionSettings(latent="mean")).encode(images, ["x", "y", "z"])
    torch.testing.assert_close(mean, dist.mean * LATENT_SCALE)
    assert sample_seed(7, "x", "latent") != sample_seed(8, "x", "latent") != sample_seed(7, "x", "noise")


def test_unet_passes_per_mode(model):
    calls = []
    hook = model.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        FeatureExtractor(model, ExtractionSettings()).features(torch.randn(1, 4, 8, 8), ["a"])
        assert len(calls) == 10
        calls.clear()
        FeatureExtractor(model, ExtractionSettings(mode="generation")).features(torch.randn(1, 4, 8, 8), ["a"])
        assert len(calls) == 3
    finally:
        hook.remove()


def test_metadata_reaches_the_unet_when_it_has_the_embedding(tiny_backbone):
    spec = BackboneSpec(tiny_backbone.root, img_size=64, use_metadata=True, num_metadata=7)
    with_md = load_diffusionsat(spec)
    latents = torch.randn(1, 4, 8, 8)
    zeros = FeatureExtractor(with_md, ExtractionSettings(save_timesteps=(49,))).features(latents, ["a"])
    given = FeatureExtractor(with_md, ExtractionSettings(save_timesteps=(49,), metadata=(500.0,) * 7)).features(latents, ["a"])
    name = "up_blocks_3_conv2_2"
    assert not torch.equal(zeros.maps["t49"][name], given.maps["t49"][name])
    with pytest.raises(ValueError, match="metadata has 2 values; the UNet expects num_metadata=7"):
        FeatureExtractor(with_md, ExtractionSettings(metadata=(1.0, 2.0)))


@pytest.mark.parametrize("mode", ["inversion", "generation"])
def test_maps_from_the_trajectory_equal_the_extraction_maps(model, mode):
    extractor = FeatureExtractor(model, ExtractionSettings(mode=mode, latent="mean"))
    torch.manual_seed(0)
    out = extractor.features(torch.randn(3, 4, 8, 8), ["a", "b", "c"])
    subset = ["up_blocks_1_attn1_1", "up_blocks_2_conv2_0"]
    maps, pooled = extractor.from_trajectory(out.trajectory, subset, pooled=True)
    assert sorted(maps) == sorted(pooled) == ["t40", "t45", "t47"]
    for t in maps:
        assert list(maps[t]) == subset
        for name in subset:
            assert maps[t][name].dtype == torch.float16 and pooled[t][name].dtype == torch.float32
            # The same UNet input at the same timestep, in the same batch: the same bits.
            assert torch.equal(maps[t][name], out.maps[t][name])
            assert torch.equal(pooled[t][name], out.pooled[t][name])
    only_maps, none = extractor.from_trajectory({"t45": out.trajectory["t45"]})
    assert none == {} and list(only_maps) == ["t45"] and list(only_maps["t45"]) == extractor.layer_names


def counting(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


def no_hooks_left(unet):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_the_pass_from_the_trajectory_stops_after_the_last_hooked_layer(model):
    extractor = FeatureExtractor(model, ExtractionSettings())
    unet = model.unet
    x = {"t47": torch.randn(2, 4, 8, 8), "t40": torch.randn(2, 4, 8, 8)}
    hooks = [counting(m) for m in (unet.up_blocks[1], unet.up_blocks[2], unet.up_blocks[3], unet.conv_out)]
    try:
        extractor.from_trajectory(x, ["up_blocks_1_attn1_0", "up_blocks_2_conv2_1"])
        # up_blocks[2] starts (its hooked conv2 is inside it) but never finishes; nothing after it runs.
        assert [len(calls) for calls, _ in hooks] == [2, 0, 0, 0]
        extractor.features(torch.randn(1, 4, 8, 8), ["a"])  # the full pass, for comparison
        assert [len(calls) for calls, _ in hooks] == [12, 10, 10, 10]
    finally:
        for _, handle in hooks:
            handle.remove()
    assert no_hooks_left(unet)


def test_the_pass_from_the_trajectory_leaves_no_hook_even_when_it_fails(model):
    extractor = FeatureExtractor(model, ExtractionSettings())
    with pytest.raises(RuntimeError):
        extractor.from_trajectory({"t47": torch.randn(1, 3, 8, 8)}, ["up_blocks_3_conv2_2"])  # 3 channels, not 4
    assert no_hooks_left(model.unet)
    extractor.from_trajectory({"t47": torch.randn(1, 4, 8, 8)}, ["up_blocks_1_attn1_0"])
    assert no_hooks_left(model.unet)


def test_the_trajectory_pass_refuses_layers_and_timesteps_the_extraction_does_not_have(model):
    extractor = FeatureExtractor(model, ExtractionSettings(layer_idxs={"up_blocks": {"attn1": "all", "conv2": []}}))
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"layers \['up_blocks_3_conv2_2'\] are not among the 9 layers"):
        extractor.from_trajectory({"t47": x}, ["up_blocks_3_conv2_2"])
    with pytest.raises(ValueError, match="'t50' is not a timestep key of a 50-step schedule"):
        extractor.from_trajectory({"t50": x})
