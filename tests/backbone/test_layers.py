import pytest
import torch

from pipeline.backbone.demo import SD21_UNET_CONFIG, tiny_unet_config
from pipeline.backbone.layer_spec import LayerSpecError
from pipeline.backbone.layers import as_map, capture, catalog, select_layers
from pipeline.backbone.sat_unet import SatUNet
from pipeline.extract.extractor import DEFAULT_LAYER_IDXS, layer_shapes


@pytest.fixture(scope="module")
def full_size_unet():
    with torch.device("meta"):  # shapes only: no memory, no compute
        return SatUNet(**{**SD21_UNET_CONFIG, "use_metadata": False})


def test_default_spec_gives_21_layers_of_sd21_at_256px(full_size_unet):
    layers = select_layers(full_size_unet, DEFAULT_LAYER_IDXS)
    shapes = layer_shapes(full_size_unet, layers, latent_size=32, cond_dim=1024, device="meta")
    assert len(shapes) == 21
    by_shape = {}
    for shape in shapes.values():
        by_shape[shape] = by_shape.get(shape, 0) + 1
    assert by_shape == {(320, 32, 32): 6, (640, 16, 16): 6, (1280, 8, 8): 6, (1280, 4, 4): 3}
    assert list(shapes)[:4] == ["up_blocks_0_conv2_0", "up_blocks_0_conv2_1", "up_blocks_0_conv2_2", "up_blocks_1_attn1_0"]
    assert shapes["up_blocks_3_attn1_2"] == (320, 32, 32)
    assert shapes["up_blocks_1_conv2_0"] == (1280, 8, 8)


def test_explicit_indices_follow_reference_grammar(full_size_unet):
    spec = {"up_blocks": {"attn1": [[1, 0], [3, 2]], "conv2": [[0, 1]]}}
    names = [layer.name for layer in select_layers(full_size_unet, spec)]
    assert names == ["up_blocks_0_conv2_1", "up_blocks_1_attn1_0", "up_blocks_3_attn1_2"]


def test_selected_modules_are_the_named_ones(full_size_unet):
    layers = {l.name: l.module for l in select_layers(full_size_unet, DEFAULT_LAYER_IDXS)}
    assert layers["up_blocks_2_attn1_1"] is full_size_unet.up_blocks[2].attentions[1].transformer_blocks[0].attn1
    assert layers["up_blocks_0_conv2_2"] is full_size_unet.up_blocks[0].resnets[2].conv2


def test_attn1_alone_selects_the_nine_attention_layers(full_size_unet):
    names = [layer.name for layer in select_layers(full_size_unet, {"up_blocks": {"attn1": "all"}})]
    assert names == [f"up_blocks_{i}_attn1_{j}" for i in (1, 2, 3) for j in range(3)]


def test_the_catalogue_counts_every_match_per_block(full_size_unet):
    assert catalog(full_size_unet, DEFAULT_LAYER_IDXS) == {"up_blocks": {"attn1": [0, 3, 3, 3], "conv2": [3, 3, 3, 3]}}


@pytest.mark.parametrize("spec, message", [
    ({"side_blocks": {"attn1": "all"}}, "layer_idxs names block 'side_blocks', which the UNet does not have (it has "),
    ({"up_blocks": {"attn9": "all"}}, "layer_idxs up_blocks.attn9: all matches nothing: no module of up_blocks ends in "
                                      "'attn9'; the modules of up_blocks end in: attentions, attn1, attn2,"),
    ({"up_blocks": {"attn1": [[0, 0]]}}, "layer_idxs up_blocks.attn1 pair [0, 0] matches nothing in the UNet "
                                         "(up_blocks[0] has 0); attn1 modules are in up_blocks 1 (3), 2 (3), 3 (3)"),
    ({"up_blocks": {"conv2": [[1, 3]]}}, "pair [1, 3] matches nothing in the UNet (up_blocks[1] has 3)"),
    ({"up_blocks": {"conv2": [[4, 0]]}}, "pair [4, 0] matches nothing in the UNet (up_blocks has 4 blocks)"),
    ({"up_blocks": {"attn1": [], "conv2": []}}, "selects no layer of the UNet"),
])
def test_a_selector_that_matches_nothing_is_refused(full_size_unet, spec, message):
    with pytest.raises(LayerSpecError) as err:
        select_layers(full_size_unet, spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_capture_leaves_no_state_on_modules():
    torch.manual_seed(0)
    unet = SatUNet(**tiny_unet_config(use_metadata=False))
    layers = select_layers(unet, DEFAULT_LAYER_IDXS)
    before = {id(m): set(vars(m)) for m in unet.modules()}
    with capture(layers) as store:
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1.0]),
             encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim))
    assert set(store) == {l.name for l in layers}
    assert all(not m._forward_hooks for m in unet.modules())
    assert {id(m): set(vars(m)) for m in unet.modules()} == before


def test_tokens_become_maps():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6 * 1, 3)[:, :4]  # (B, HW=4, C=3)
    fmap = as_map(tokens)
    assert fmap.shape == (2, 3, 2, 2)
    assert torch.equal(fmap[1, 2, 1, 0], tokens[1, 2, 2])  # token (row 1, col 0) = index 2
    with pytest.raises(ValueError, match="square"):
        as_map(torch.zeros(1, 5, 3))
