"""The UNet layers a ``layer_idxs`` selects (grammar in ``layer_spec``), and hooks that leave
nothing behind on the modules."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .layer_spec import LayerSpecError, layer_name, parse, resolve


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


def _blocks(unet: nn.Module, block_name: str) -> list[nn.Module]:
    blocks = getattr(unet, block_name, None)
    if not isinstance(blocks, nn.Module):
        children = ", ".join(name for name, _ in unet.named_children())
        raise LayerSpecError(f"layer_idxs names block {block_name!r}, which the UNet does not have (it has {children})")
    return list(blocks) if isinstance(blocks, nn.ModuleList) else [blocks]


def catalog(unet: nn.Module, layer_idxs: dict) -> dict:
    """How many modules end in each suffix of ``layer_idxs``, per block (see ``layer_spec``)."""
    return {block_name: {suffix: [len(_modules_with_suffix(b, suffix)) for b in _blocks(unet, block_name)]
                         for suffix in by_suffix}
            for block_name, by_suffix in parse(layer_idxs).items()}


def _module_suffixes(unet: nn.Module, block_name: str) -> str:
    names = {name.rsplit(".", 1)[-1] for b in _blocks(unet, block_name) for name, _ in b.named_modules() if name}
    return ", ".join(sorted(n for n in names if not n.isdigit()))


def select_layers(unet: nn.Module, layer_idxs: dict) -> list[Layer]:
    """The modules ``layer_idxs`` selects, named and ordered as the reference does; a selector that
    matches no module is an error naming it and what the UNet has."""
    names = resolve(layer_idxs, catalog(unet, layer_idxs),
                    hint=lambda block: f"; the modules of {block} end in: {_module_suffixes(unet, block)}")
    modules = {}
    for block_name, by_suffix in parse(layer_idxs).items():
        for i, block in enumerate(_blocks(unet, block_name)):
            for suffix in by_suffix:
                for j, module in enumerate(_modules_with_suffix(block, suffix)):
                    modules[layer_name(block_name, i, suffix, j)] = module
    return [Layer(name, modules[name]) for name in names]


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


class ForwardStopped(Exception):
    """Raised out of a forward pass by ``capture(..., stop=True)`` once every layer has its output."""


@contextmanager
def capture(layers: list[Layer], stop: bool = False):
    """Record each layer's output of the last forward pass in the yielded dict.

    The dict belongs to the caller and the hooks are removed on exit, so no module keeps
    features or hooks once extraction is over (the reference stores them on the modules). With
    ``stop``, the hook of whichever layer runs last in a pass raises ``ForwardStopped``, for the
    caller to catch: what the UNet computes after it is not needed. Each module runs once per
    UNet forward, so "every layer has its output" is "the last hooked module has run".
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    names = {layer.name for layer in layers}
    waiting = set(names)

    def hook_for(name):
        def hook(_module, _inputs, output):
            store[name] = output.detach()
            waiting.discard(name)
            if stop and not waiting:
                waiting.update(names)  # the next pass waits for all of them again
                raise ForwardStopped

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook_for(layer.name)))
        yield store
    finally:
        for h in handles:
            h.remove()
