"""Which UNet layers to hook, and hooks that leave nothing behind on the modules.

The layer grammar is the reference's ``layer_idxs``::

    layer_idxs:
      up_blocks:          # an attribute of the UNet (a ModuleList or a single block)
        attn1: all        # every submodule whose name ends in "attn1", in every block
        conv2: [[1, 0], [3, 2]]   # or (block i, match j) pairs

A selected module is named ``{block}_{i}_{suffix}_{j}``: ``up_blocks_1_attn1_0`` is the first
``attn1`` of ``up_blocks[1]``. The order is the reference's: block name, block index, suffix (in
the order written), match index.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Layer:
    name: str
    module: nn.Module


def _modules_with_suffix(block: nn.Module, suffix: str) -> list[nn.Module]:
    found = []
    for name, module in block.named_modules():
        if name.endswith(suffix):
            found.extend(module if isinstance(module, nn.ModuleList) else [module])
    return found


def _wanted(selection, i: int, j: int) -> bool:
    if selection == "all":
        return True
    return any(int(p[0]) == i and int(p[1]) == j for p in selection)


def select_layers(unet: nn.Module, layer_idxs: dict) -> list[Layer]:
    """Resolve a ``layer_idxs`` spec against ``unet``; raise UserError for names it lacks."""
    layers = []
    for block_name, by_suffix in layer_idxs.items():
        blocks = getattr(unet, block_name, None)
        if blocks is None:
            raise UserError(f"layer_idxs names block {block_name!r}, which the UNet does not have")
        if not isinstance(blocks, nn.ModuleList):
            blocks = [blocks]
        for i, block in enumerate(blocks):
            for suffix, selection in by_suffix.items():
                for j, module in enumerate(_modules_with_suffix(block, suffix)):
                    if _wanted(selection, i, j):
                        layers.append(Layer(f"{block_name}_{i}_{suffix}_{j}", module))
    if not layers:
        raise UserError(f"layer_idxs {layer_idxs} selects no layer of the UNet")
    return layers


def as_map(output: torch.Tensor) -> torch.Tensor:
    """Attention layers return tokens (B, H*W, C); make them (B, C, H, W) like conv outputs."""
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        b, n, c = output.shape
        w = int(math.isqrt(n))
        if w * w != n:
            raise ValueError(f"cannot make a square map of {n} tokens")
        return output.reshape(b, w, w, c).permute(0, 3, 1, 2)
    raise ValueError(f"layer output of shape {tuple(output.shape)} is not supported")


@contextmanager
def capture(layers: list[Layer]):
    """Record each layer's output of the last forward pass in the yielded dict.

    The dict belongs to the caller and the hooks are removed on exit, so no module keeps
    features or hooks once extraction is over (the reference stores them on the modules).
    """
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(_module, _inputs, output):
            store[name] = output.detach()

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook_for(layer.name)))
        yield store
    finally:
        for h in handles:
            h.remove()
