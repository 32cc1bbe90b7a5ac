"""Semantic-FPN decode head (mmseg ``FPNHead`` as used by SeMask's ``BranchFPNHead``) and the
parameter-free light semantic decoder that sums the upsampled prior maps."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvBNReLU", "FPNHead", "SemanticDecoder", "upsample_sum"]


def _resize_to(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize to ``size`` (mmseg's ``resize``). At the same size a bilinear resize is an exact
    copy, so it is skipped (its copy and backward pass cost a training step ~3%), except when traced:
    there a size test would specialise the graph to the traced size."""
    traced = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    if not traced and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule``: conv3x3 (no bias) -> BatchNorm -> ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, cout, H, W)."""
        return self.act(self.bn(self.conv(x)))


class FPNHead(nn.Module):
    """Per-level scale heads (conv3x3-BN-ReLU, x2 bilinear), summed at stride 4, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the input levels (strides ``feature_strides``).
        num_classes: K.
        channels: width of the scale heads (256 officially).
        feature_strides: stride of each level; level l gets max(1, log2(stride/stride_0)) convs.
        dropout: Dropout2d before the classifier.

    ``forward(features)``: list of (B, C_l, H_l, W_l) -> logits (B, K, H_0, W_0).
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
        feature_strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(feature_strides):
            raise ValueError("in_channels and feature_strides need one entry per level")
        self.in_channels = tuple(in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.scale_heads = nn.ModuleList()
        for i, (cin, stride) in enumerate(zip(in_channels, feature_strides)):
            n = max(1, int(math.log2(stride) - math.log2(feature_strides[0])))
            layers: List[nn.Module] = []
            for j in range(n):
                layers.append(ConvBNReLU(cin if j == 0 else channels, channels))
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        size = out.shape[-2:]
        for head, f in zip(self.scale_heads[1:], features[1:]):
            out = out + _resize_to(head(f), size, align_corners=False)
        return self.conv_seg(self.dropout(out))


def upsample_sum(maps: Sequence[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
    """``maps[0] + sum_l resize(up2^l(maps[l]), size(maps[0]))``: level l is upsampled x2 l times in
    sequence (as the official ``cls_scale_heads``), then resized to the exact size (odd sizes)."""
    out = maps[0]
    size = out.shape[-2:]
    for level, m in enumerate(maps[1:], start=1):
        for _ in range(level):
            m = F.interpolate(m, scale_factor=2.0, mode="bilinear", align_corners=align_corners)
        out = out + _resize_to(m, size, align_corners)
    return out


class SemanticDecoder(nn.Module):
    """The light semantic decoder: the sum of upsampled prior maps (no parameters), at stride 4."""

    def __init__(self, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners

    def forward(self, priors: Sequence[torch.Tensor]) -> torch.Tensor:
        return upsample_sum(priors, self.align_corners)
