"""SatDiFuser's three fusers: GW (global weights), LW (localized weights) and MoE (experts).

Each takes the features of T timesteps × L layers, ``{timestep: {layer: (B, C, H, W)}}``, and
returns one map per scale (layers grouped by spatial size, largest first), each (B, P, H_s, W_s),
plus a dict of what it learned (weights, gates, expert usage, load-balancing term). Timesteps are
taken in descending label order and layers in the order given, as the reference does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .bottleneck import projection

FUSERS = ("gw", "lw", "moe")
LW_INPUTS = ("paper", "reference")


def timestep_order(timesteps) -> list[str]:
    """Label keys in the reference's order: largest label (least noise) first."""
    return sorted(timesteps, key=lambda t: int(str(t).lstrip("t")), reverse=True)


def group_by_scale(layer_shapes: dict) -> OrderedDict[int, list[str]]:
    """Layers grouped by spatial width, widest first, keeping their order within a scale."""
    widths = sorted({shape[-1] for shape in layer_shapes.values()}, reverse=True)
    return OrderedDict((w, [l for l, s in layer_shapes.items() if s[-1] == w]) for w in widths)


def run_projection(phi: nn.Module, build, inputs: list[torch.Tensor], keep_activations: bool) -> torch.Tensor:
    """``phi(build(*inputs))``; with ``keep_activations`` off, the projection's inner activations are
    not kept for the backward pass but recomputed there (activation checkpointing). The numbers
    are the same (Φ has no randomness and no running statistics); a training step holds only the
    projections' inputs and outputs, at the cost of running each Φ forward twice."""
    if keep_activations or not torch.is_grad_enabled():
        return phi(build(*inputs))
    return checkpoint(lambda *xs: phi(build(*xs)), *inputs, use_reentrant=False)


class Fuser(nn.Module):
    """What the three fusers share: the layer/timestep bookkeeping."""

    # A training-time memory setting (checkpoint_projections), not part of the model.
    keep_activations = True

    def __init__(self, layer_shapes: dict, timesteps, projection_dim: int):
        super().__init__()
        self.layer_shapes = OrderedDict((k, tuple(v)) for k, v in layer_shapes.items())
        self.timesteps = timestep_order(timesteps)
        self.scales = group_by_scale(self.layer_shapes)
        self.layers = [l for group in self.scales.values() for l in group]  # bottleneck order
        self.projection_dim = projection_dim

    def channels(self, layer: str) -> int:
        return self.layer_shapes[layer][0]

    def project(self, feats: dict, layer: str) -> list[torch.Tensor]:
        """Φ of ``layer`` applied to each timestep's map, in ``self.timesteps`` order."""
        return self.project_maps(layer, [feats[t][layer] for t in self.timesteps])

    def project_maps(self, layer: str, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Φ of ``layer`` applied to each of ``maps``.

        The timesteps share Φ, so their maps go through it as one batch: the same result per map
        (convolution and GroupNorm act per sample) from a third of the calls.
        """
        phi = self.bottleneck_layers[self.layers.index(layer)]
        joined = run_projection(phi, lambda *xs: torch.cat(xs).float(), maps, self.keep_activations)
        return list(joined.chunk(len(maps)))


class GlobalWeightedFuser(Fuser):
    """One Φ per layer (shared across timesteps) and one softmax weight per (timestep, layer)."""

    def __init__(self, layer_shapes, timesteps, projection_dim: int = 384):
        super().__init__(layer_shapes, timesteps, projection_dim)
        self.bottleneck_layers = nn.ModuleList(projection(self.channels(l), projection_dim) for l in self.layers)
        self.mixing_weights = nn.Parameter(torch.ones(len(self.layers) * len(self.timesteps)))

    def forward(self, feats: dict) -> tuple[list[torch.Tensor], dict]:
        weights = F.softmax(self.mixing_weights, dim=0)
        n_layers = len(self.layers)
        out = []
        for group in self.scales.values():
            projected = {layer: self.project(feats, layer) for layer in group}
            fused = None
            for ti in range(len(self.timesteps)):
                for layer in group:
                    part = weights[ti * n_layers + self.layers.index(layer)] * projected[layer][ti]
                    fused = part if fused is None else fused + part
            out.append(fused)
        return out, {"mixing_weights": weights.detach().view(len(self.timesteps), n_layers)}


class LocalWeightedFuser(Fuser):
    """The same Φs; per scale a 1×1 conv on the mean projected map gives per-pixel weights.

    ``input_mode`` says what each Φ reads. ``paper``: its own layer's map, as the paper describes.
    ``reference``: what the reference's code feeds it; its channel offset into a scale's
    concatenated layers never advances, so the Φ of a layer with C channels reads the first C
    channels of that concatenation: the scale's first map, running on into the next maps' channels
    when C is larger than the first map's. At the default extraction that is 4 of the 21 layers.
    """

    def __init__(self, layer_shapes, timesteps, projection_dim: int = 384, temperature: float = 1.0,
                 input_mode: str = "paper"):
        super().__init__(layer_shapes, timesteps, projection_dim)
        if input_mode not in LW_INPUTS:
            raise ValueError(f"LW input_mode {input_mode!r} is not one of {LW_INPUTS}")
        self.input_mode = input_mode
        self.bottleneck_layers = nn.ModuleList(projection(self.channels(l), projection_dim) for l in self.layers)
        self.gate_modules = nn.ModuleList(
            nn.Conv2d(projection_dim, len(self.timesteps) * len(group), kernel_size=1) for group in self.scales.values()
        )
        self.temperature = temperature

    def forward(self, feats: dict) -> tuple[list[torch.Tensor], dict]:
        out, gates = [], []
        for group, gate in zip(self.scales.values(), self.gate_modules):
            # (B, T*L_s, P, H, W), timestep-major as the reference stacks them.
            projected = self.project_scale(feats, group)
            stack = torch.stack([projected[l][ti] for ti in range(len(self.timesteps)) for l in group], dim=1)
            weights = F.softmax(gate(stack.mean(dim=1)) / self.temperature, dim=1)
            out.append((weights.unsqueeze(2) * stack).sum(dim=1))
            gates.append(weights.detach())
        return out, {"gates": gates}

    def project_scale(self, feats: dict, group: list[str]) -> dict[str, list[torch.Tensor]]:
        if self.input_mode == "paper":
            return {l: self.project(feats, l) for l in group}
        joined = [torch.cat([feats[t][l] for l in group], dim=1) for t in self.timesteps]
        return {l: self.project_maps(l, [x[:, : self.channels(l)] for x in joined]) for l in group}


class ExpertsPerScale(nn.Module):
    """E experts Φ over one scale's concatenated layers, routed per image by a pooled 3×3 conv."""

    def __init__(self, in_channels: int, projection_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(projection(in_channels, projection_dim) for _ in range(num_experts))
        self.gate_network = nn.Sequential(
            nn.Conv2d(in_channels, num_experts, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.top_k = top_k
        self.projection_dim = projection_dim
        self.keep_activations = True  # see checkpoint_projections

    def _expert(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return run_projection(expert, lambda v: v, [x], self.keep_activations)

    def forward(self, x: torch.Tensor, dense: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate_network(x) / self.temperature
        probs = F.softmax(logits, dim=1)
        usage = probs.mean(dim=0)
        balance = -(usage * torch.log(usage * len(self.experts) + 1e-8)).sum()
        b, _, h, w = x.shape
        out = x.new_zeros(b, self.projection_dim, h, w)
        if dense:
            for e, expert in enumerate(self.experts):
                out = out + probs[:, e].view(b, 1, 1, 1) * self._expert(expert, x)
            return out, balance, usage.detach()
        top_logits, top_idx = torch.topk(logits, k=self.top_k, dim=1)
        top_w = F.softmax(top_logits, dim=1)
        for e, expert in enumerate(self.experts):
            chosen = top_idx == e  # (B, k)
            rows = chosen.any(dim=1)
            if rows.any():
                weight = (top_w * chosen).sum(dim=1)[rows].view(-1, 1, 1, 1)
                out[rows] += weight * self._expert(expert, x[rows])
        routed = F.one_hot(top_idx, len(self.experts)).sum(dim=1).float().mean(dim=0)
        return out, balance, routed.detach()


class MoEFuser(Fuser):
    """Per scale, experts over the concatenated layers of each timestep; timesteps averaged.

    The first ``warmup_steps`` training steps mix all experts densely; afterwards each image is
    routed to its top-k experts. Only training forwards advance the counter.
    """

    def __init__(self, layer_shapes, timesteps, projection_dim: int = 384, num_experts: int = 8,
                 top_k: int = 2, warmup_steps: int = 300):
        super().__init__(layer_shapes, timesteps, projection_dim)
        self.scale_moes = nn.ModuleList(
            ExpertsPerScale(sum(self.channels(l) for l in group), projection_dim, num_experts, top_k)
            for group in self.scales.values()
        )
        self.warmup_steps = warmup_steps
        # Saved with the weights: a reloaded model routes as it did when it was saved (top-k after
        # the warm-up), not densely as a fresh one would.
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def forward(self, feats: dict) -> tuple[list[torch.Tensor], dict]:
        dense = int(self.train_steps) < self.warmup_steps
        if self.training:
            self.train_steps += 1
        out, balance, usage = [], [], []
        for group, moe in zip(self.scales.values(), self.scale_moes):
            per_t = []
            for t in self.timesteps:
                fused, lb, use = moe(torch.cat([feats[t][l].float() for l in group], dim=1), dense)
                per_t.append(fused)
                balance.append(lb)
                usage.append(use)
            out.append(torch.stack(per_t).mean(dim=0))
        # Mean over scales and timesteps (the reference resets its sum per scale and so averages
        # only the last scale's terms; with the default weight 0 the value is not used).
        return out, {"balance_loss": torch.stack(balance).mean(), "expert_usage": torch.stack(usage), "dense": dense}


def checkpoint_projections(model: nn.Module, on: bool) -> None:
    """Recompute every projection's inner activations in the backward pass instead of keeping
    them (``run_projection``), in every fuser and MoE scale of ``model``."""
    for module in model.modules():
        if isinstance(module, (Fuser, ExpertsPerScale)):
            module.keep_activations = not on


def build_fuser(kind: str, layer_shapes: dict, timesteps, projection_dim: int, num_experts: int = 8,
                top_k: int = 2, warmup_steps: int = 300, lw_input: str = "paper") -> Fuser:
    if kind == "gw":
        return GlobalWeightedFuser(layer_shapes, timesteps, projection_dim)
    if kind == "lw":
        return LocalWeightedFuser(layer_shapes, timesteps, projection_dim, input_mode=lw_input)
    if kind == "moe":
        return MoEFuser(layer_shapes, timesteps, projection_dim, num_experts, top_k, warmup_steps)
    raise ValueError(f"fuser {kind!r} is not one of {FUSERS}")
