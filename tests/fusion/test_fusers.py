import pytest
import torch

from pipeline.fusion.bottleneck import Bottleneck
from pipeline.fusion.fusers import GlobalWeightedFuser, LocalWeightedFuser, MoEFuser, group_by_scale, timestep_order
from pipeline.model import FusionModel, ModelConfig, parameter_count

# The default extraction at 256 px: 21 layers of SD-2.1's decoder.
FULL = {f"up_blocks_0_conv2_{j}": (1280, 4, 4) for j in range(3)}
for block, (c, w) in zip((1, 2, 3), ((1280, 8), (640, 16), (320, 32))):
    for module in ("attn1", "conv2"):
        FULL.update({f"up_blocks_{block}_{module}_{j}": (c, w, w) for j in range(3)})
TIMESTEPS = ["t47", "t45", "t40"]

# Small layers for the behavioural tests: two scales, three layers.
SMALL = {"a_0_conv2_0": (8, 2, 2), "b_1_attn1_0": (16, 4, 4), "b_1_conv2_0": (8, 4, 4)}


@pytest.mark.parametrize("fuser, head, classes, count", [
    ("gw", "linear", 10, 10_854_601), ("lw", "linear", 10, 10_878_793), ("moe", "linear", 10, 71_498_542),
    ("gw", "upernet", 7, 39_970_758), ("lw", "upernet", 7, 39_994_950), ("moe", "upernet", 7, 100_614_699),
])
def test_parameter_counts_equal_the_reference(fuser, head, classes, count):
    with torch.device("meta"):
        model = FusionModel(ModelConfig(fuser, head, FULL, TIMESTEPS, classes))
    assert parameter_count(model) == count


def feats(shapes=SMALL, timesteps=("t47", "t40"), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t: {l: torch.randn(batch, *s, generator=g).half() for l, s in shapes.items()} for t in timesteps}


def test_scales_are_grouped_widest_first_and_timesteps_least_noisy_first():
    assert list(group_by_scale(SMALL).items()) == [(4, ["b_1_attn1_0", "b_1_conv2_0"]), (2, ["a_0_conv2_0"])]
    assert timestep_order(["t40", "t47", "t45"]) == ["t47", "t45", "t40"]


def test_bottleneck_structure():
    block = Bottleneck(64, 128)
    assert block.shortcut is not None and Bottleneck(128, 128).shortcut is None
    assert [m.weight.shape for m in (block.conv1, block.conv2, block.conv3)] == [(32, 64, 1, 1), (32, 32, 3, 3), (128, 32, 1, 1)]
    assert all(m.bias is None for m in (block.conv1, block.conv2, block.conv3, block.shortcut))
    assert block.conv1.norm.num_groups == 32
    # MSRA fill: kaiming normal with fan_out = out_channels * k * k.
    torch.manual_seed(0)
    big = Bottleneck(256, 2048)
    assert float(big.conv3.weight.detach().std()) == pytest.approx((2 / 2048) ** 0.5, rel=0.05)


def test_gw_is_a_softmax_weighted_sum_of_projections():
    torch.manual_seed(0)
    fuser = GlobalWeightedFuser(SMALL, ["t40", "t47"], projection_dim=128)
    with torch.no_grad():
        fuser.mixing_weights.copy_(torch.arange(6.0))
    x = feats()
    out, aux = fuser(x)
    w = torch.softmax(torch.arange(6.0), 0).view(2, 3)  # (timestep t47, t40) x (layers widest first)
    torch.testing.assert_close(aux["mixing_weights"], w)
    want = sum(w[ti, li] * fuser.bottleneck_layers[li](x[t][l].float())
               for ti, t in enumerate(["t47", "t40"]) for li, l in enumerate(["b_1_attn1_0", "b_1_conv2_0"]))
    torch.testing.assert_close(out[0], want)
    assert [o.shape for o in out] == [(2, 128, 4, 4), (2, 128, 2, 2)]


def test_lw_gates_are_per_pixel_softmaxes():
    torch.manual_seed(0)
    fuser = LocalWeightedFuser(SMALL, ["t47", "t40"], projection_dim=128)
    out, aux = fuser(feats())
    gates = aux["gates"]
    assert [g.shape for g in gates] == [(2, 4, 4, 4), (2, 2, 2, 2)]  # T * L_s maps per scale
    torch.testing.assert_close(gates[0].sum(dim=1), torch.ones(2, 4, 4))
    assert out[0].shape == (2, 128, 4, 4)
    # The gated sum of each timestep's projection, Φ applied to one map at a time.
    x, group = feats(), ["b_1_attn1_0", "b_1_conv2_0"]
    stack = torch.stack([fuser.bottleneck_layers[li](x[t][l].float()) for t in ("t47", "t40")
                         for li, l in enumerate(group)], dim=1)
    torch.testing.assert_close(out[0], (gates[0].unsqueeze(2) * stack).sum(dim=1))


def test_moe_warm_up_counts_training_steps_only_then_routes_to_top_k():
    torch.manual_seed(0)
    fuser = MoEFuser(SMALL, ["t47", "t40"], projection_dim=128, num_experts=4, top_k=2, warmup_steps=2)
    x = feats(batch=3)
    fuser.eval()
    for _ in range(5):
        assert fuser(x)[1]["dense"]  # evaluation never ends the warm-up
    fuser.train()
    assert [fuser(x)[1]["dense"] for _ in range(3)] == [True, True, False]
    # After warm-up each image uses exactly its top-2 experts, weighted by a softmax over their logits.
    moe = fuser.scale_moes[0]
    inp = torch.cat([x["t47"][l].float() for l in ["b_1_attn1_0", "b_1_conv2_0"]], dim=1)
    with torch.no_grad():
        out, _, usage = moe(inp, dense=False)
        logits = moe.gate_network(inp) / moe.temperature
        top, idx = logits.topk(2, dim=1)
        w = torch.softmax(top, dim=1)
        for b in range(3):
            want = sum(w[b, k] * moe.experts[int(idx[b, k])](inp[b : b + 1])[0] for k in range(2))
            torch.testing.assert_close(out[b], want, rtol=1e-4, atol=1e-5)
    assert float(usage.sum()) == pytest.approx(2.0)  # k experts per image


def test_moe_balance_term_is_the_references_mean_over_scales_and_timesteps():
    torch.manual_seed(0)
    fuser = MoEFuser(SMALL, ["t47"], projection_dim=128, num_experts=4, top_k=2, warmup_steps=10)
    x = feats(timesteps=("t47",))
    _, aux = fuser(x)
    inputs = [torch.cat([x["t47"]["b_1_attn1_0"], x["t47"]["b_1_conv2_0"]], 1).float(), x["t47"]["a_0_conv2_0"].float()]
    terms = []
    for moe, inp in zip(fuser.scale_moes, inputs):
        u = torch.softmax(moe.gate_network(inp) / moe.temperature, dim=1).mean(0)
        terms.append(-(u * torch.log(u * 4 + 1e-8)).sum())
    torch.testing.assert_close(aux["balance_loss"], torch.stack(terms).mean())
    assert float(aux["balance_loss"].detach()) <= 1e-6  # zero for uniform use, negative otherwise
    assert aux["expert_usage"].shape == (2, 4)
