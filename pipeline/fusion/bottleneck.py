"""The projection Φ that every fuser applies to a UNet layer: a ResNet bottleneck block.

SatDiFuser uses detectron2's ``BottleneckBlock`` with GroupNorm: 1×1 conv C→P/4, 3×3 conv
P/4→P/4, 1×1 conv P/4→P, each without bias and followed by GroupNorm(32); ReLU after the first
two; a 1×1 conv + GroupNorm shortcut when C ≠ P; ReLU after the residual sum; convolutions
initialised with MSRA fill (kaiming normal, fan_out, relu). Parameter names follow detectron2
(``conv1.weight``, ``conv1.norm.weight``) so the reference's trained weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by GroupNorm, named as detectron2 names it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 32):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(groups, out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        mid = out_channels // 4
        self.shortcut = ConvNorm(in_channels, out_channels, 1, norm_groups) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, mid, 1, norm_groups)
        self.conv2 = ConvNorm(mid, mid, 3, norm_groups)
        self.conv3 = ConvNorm(mid, out_channels, 1, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def projection(in_channels: int, projection_dim: int, norm_groups: int = 32) -> nn.Sequential:
    """Φ wrapped as the reference wraps it (a one-block stage), so state-dict keys match."""
    return nn.Sequential(Bottleneck(in_channels, projection_dim, norm_groups))
