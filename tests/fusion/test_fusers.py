import pytest
import torch

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


# One scale whose layers differ in width (8, 16, 8 channels), so that reading from the wrong offset
# shows, and a second scale of one layer.
UNEVEN = {"w4_0": (8, 4, 4), "w4_1": (16, 4, 4), "w4_2": (8, 4, 4), "w2_0": (16, 2, 2)}


def reference_lw_forward(bottlenecks, gates, feature_dims, batch_feats, num_timesteps, temperature=1.0):
    """The reference's LW forward, step by step, on its inputs: ``batch_feats`` maps an integer
    label to one tensor per scale (widest first) holding that scale's layers concatenated along
    channels; ``feature_dims`` maps a width to its layers' channel counts. Its channel offset is
    reset for every timestep and never moved on, so every slice starts at channel 0."""
    scales = sorted(feature_dims, reverse=True)
    counts = [len(feature_dims[w]) for w in scales]
    labels = sorted(batch_feats)[::-1]
    fused, gate_maps = [], []
    for s, width in enumerate(scales):
        per_t = []
        for ti in range(num_timesteps):
            t_feats = batch_feats[labels[ti]][s].float()
            start = 0
            per_l = []
            for l, dim in enumerate(feature_dims[width]):
                per_l.append(bottlenecks[sum(counts[:s]) + l](t_feats[:, start:start + dim]))
            per_t.append(torch.stack(per_l, dim=1))
        stacked = torch.stack(per_t, dim=1)
        b, t, l, c, h, w = stacked.shape
        k = stacked.reshape(b, t * l, c, h, w)
        weights = torch.softmax(gates[s](k.mean(dim=1)) / temperature, dim=1)
        fused.append((weights.unsqueeze(2) * k).sum(dim=1))
        gate_maps.append(weights)
    return fused, gate_maps


def reference_inputs(x: dict, shapes: dict) -> dict:
    """Our {timestep: {layer: map}} as the reference's extractor hands it over."""
    groups = group_by_scale(shapes)
    return {int(t[1:]): [torch.cat([maps[l] for l in group], dim=1) for group in groups.values()]
            for t, maps in x.items()}


def test_lw_reference_input_reproduces_the_reference_forward():
    from pipeline.fusion.bottleneck import projection

    torch.manual_seed(0)
    fuser = LocalWeightedFuser(UNEVEN, ["t40", "t47", "t45"], projection_dim=128, input_mode="reference")
    # The reference's modules, built on their own and given the fuser's weights.
    bottlenecks = torch.nn.ModuleList(projection(UNEVEN[l][0], 128) for l in fuser.layers)
    gates = torch.nn.ModuleList(torch.nn.Conv2d(128, 3 * n, 1) for n in (3, 1))
    bottlenecks.load_state_dict(fuser.bottleneck_layers.state_dict())
    gates.load_state_dict(fuser.gate_modules.state_dict())
    x = feats(UNEVEN, timesteps=("t47", "t45", "t40"), batch=3)
    dims = {w: [UNEVEN[l][0] for l in group] for w, group in group_by_scale(UNEVEN).items()}
    with torch.no_grad():
        out, aux = fuser(x)
        want, want_gates = reference_lw_forward(bottlenecks, gates, dims, reference_inputs(x, UNEVEN), 3)
    for ours, theirs in zip(out + aux["gates"], want + want_gates):
        assert torch.equal(ours, theirs)


def test_lw_reference_input_reads_the_first_channels_of_each_scale():
    torch.manual_seed(0)
    fuser = LocalWeightedFuser(UNEVEN, ["t47", "t40"], projection_dim=128, input_mode="reference")
    seen = record_bottleneck_inputs(fuser, feats(UNEVEN))
    x = feats(UNEVEN)
    first = torch.cat([x["t47"]["w4_0"], x["t40"]["w4_0"]]).float()
    assert torch.equal(seen["w4_0"], first) and torch.equal(seen["w4_2"], first)
    # 16 channels: the first layer's 8 and then the first 8 of the second layer's.
    spill = torch.cat([torch.cat([x[t]["w4_0"], x[t]["w4_1"][:, :8]], dim=1) for t in ("t47", "t40")]).float()
    assert torch.equal(seen["w4_1"], spill)
    # The last map of the scale is never read.
    changed = feats(UNEVEN)
    changed["t47"]["w4_2"] += 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fuser(x)[0], fuser(changed)[0]))


def record_bottleneck_inputs(fuser, x: dict) -> dict:
    seen = {}
    hooks = [phi.register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0]))
             for l, phi in zip(fuser.layers, fuser.bottleneck_layers)]
    with torch.no_grad():
        fuser(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_lw_paper_input_gives_each_bottleneck_its_own_layer():
    torch.manual_seed(0)
    fuser = LocalWeightedFuser(UNEVEN, ["t47", "t40"], projection_dim=128)
    assert fuser.input_mode == "paper"
    x = feats(UNEVEN)
    seen = record_bottleneck_inputs(fuser, x)
    for layer in UNEVEN:
        assert torch.equal(seen[layer], torch.cat([x["t47"][layer], x["t40"][layer]]).float())
    # Changing one layer's map changes what its own bottleneck reads and nothing else's.
    changed = feats(UNEVEN)
    changed["t40"]["w4_2"] += 1
    again = record_bottleneck_inputs(fuser, changed)
    assert [l for l in UNEVEN if not torch.equal(seen[l], again[l])] == ["w4_2"]
    with torch.no_grad():
        assert not torch.equal(fuser(x)[0][0], fuser(changed)[0][0])


def test_lw_input_mode_is_checked():
    with pytest.raises(ValueError, match="input_mode 'ref' is not one of"):
        LocalWeightedFuser(UNEVEN, ["t47"], projection_dim=128, input_mode="ref")


def saved_bytes_and_grads(model, x, output_shape):
    """Loss, gradients and the bytes autograd kept for the backward pass of one training step."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(x, output_shape)
        loss = logits.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(kept)


@pytest.mark.parametrize("fuser, head", [("gw", "linear"), ("lw", "upernet"), ("moe", "linear"), ("moe", "upernet")])
def test_checkpointed_projections_give_the_same_step_and_keep_less(fuser, head):
    from pipeline.fusion.fusers import checkpoint_projections

    torch.manual_seed(0)
    config = ModelConfig(fuser, head, SMALL, ["t47", "t40"], 3, projection_dim=128, num_experts=4,
                         moe_warmup_steps=1, channels=32)
    model = FusionModel(config).train()
    x = feats(batch=3)
    shape = (8, 8) if head == "upernet" else None
    for step in range(2):  # MoE: the dense warm-up step, then a routed one
        runs = []
        for on in (False, True):
            if fuser == "moe":
                model.fuser.train_steps.fill_(step)
            checkpoint_projections(model, on)
            torch.manual_seed(step)  # UPerNet's dropout draws the same in both
            runs.append(saved_bytes_and_grads(model, x, shape))
        (loss, grads, kept), (loss_c, grads_c, kept_c) = runs
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
        assert grads_c.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-6, atol=1e-7)
        assert kept_c < 0.7 * kept
