"""The reference's heads on a fuser's per-scale maps (widest first).

- Linear: every scale upsampled (bilinear) to the widest, summed, global-average-pooled, one
  linear layer. Used for classification (cross-entropy) and multi-label (BCE with logits).
- UPerNet: pyramid pooling (scales 1/2/3/6) on the narrowest map, FPN laterals and 3×3 convs,
  BatchNorm + ReLU, a fusing bottleneck, Dropout2d(0.1) and a 1×1 classifier; logits resized
  bilinearly to the label size. (The reference uses SyncBatchNorm, which is BatchNorm on one
  device.) Before it, the reference's neck resamples each scale by its factor of ``rescales``:
  4 (two stride-2 transposed convolutions with BatchNorm and GELU between), 2 (one), 1 (as is),
  0.5 or 0.25 (max pooling). With the default factors of 1 the neck is the identity and has no
  parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RESCALES


class LinearHead(nn.Module):
    def __init__(self, projection_dim: int, num_classes: int):
        super().__init__()
        self.decoder_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(projection_dim, num_classes))

    def forward(self, scales: list[torch.Tensor], output_shape=None) -> torch.Tensor:
        size = scales[0].shape[-2:]
        summed = sum(s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                     for s in scales)
        return self.decoder_head(summed)


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample2(channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)


def rescale(factor: float, channels: int) -> nn.Module:
    """The reference's resampling of one scale by ``factor``."""
    if factor == 4:
        return nn.Sequential(upsample2(channels), nn.BatchNorm2d(channels), nn.GELU(), upsample2(channels))
    if factor == 2:
        return nn.Sequential(upsample2(channels))
    if factor == 1:
        return nn.Identity()
    if factor in (0.5, 0.25):
        return nn.MaxPool2d(kernel_size=int(1 / factor), stride=int(1 / factor))
    raise ValueError(f"rescale factor {factor!r} is not one of {RESCALES}")


class Neck(nn.Module):
    """Each scale resampled by its factor (named ``ops`` as the reference names them)."""

    def __init__(self, channels: int, factors):
        super().__init__()
        self.ops = nn.ModuleList(rescale(f, channels) for f in factors)

    def forward(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip(self.ops, scales)]


class UPerNetHead(nn.Module):
    def __init__(self, projection_dim: int, num_scales: int, num_classes: int, channels: int = 512,
                 pool_scales=(1, 2, 3, 6), rescales=(1, 1, 1, 1)):
        super().__init__()
        if len(rescales) < num_scales:
            raise ValueError(f"rescales {list(rescales)} has {len(rescales)} factors for {num_scales} scales")
        # Both trimmed to the number of scales, as the reference trims them.
        pool_scales = tuple(pool_scales)[:num_scales]
        self.neck = Neck(projection_dim, tuple(rescales)[:num_scales])
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(p), *conv_bn_relu(projection_dim, channels, 1)) for p in pool_scales
        )
        self.bottleneck = conv_bn_relu(projection_dim + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(projection_dim, channels, 1) for _ in range(num_scales - 1))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(num_scales - 1))
        self.fpn_bottleneck = conv_bn_relu(num_scales * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [F.interpolate(m(x), size=x.shape[2:], mode="bilinear", align_corners=False) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, scales: list[torch.Tensor], output_shape=None) -> torch.Tensor:
        if output_shape is None:
            raise ValueError("UPerNetHead needs output_shape, the (H, W) of the label maps")
        scales = self.neck(scales)
        laterals = [conv(scales[i]) for i, conv in enumerate(self.lateral_convs)] + [self._psp(scales[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=False
            )
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        logits = self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))
        return F.interpolate(logits, size=tuple(output_shape), mode="bilinear", align_corners=False)
