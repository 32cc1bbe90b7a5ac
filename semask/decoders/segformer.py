"""SegFormer's all-MLP decode head (Xie et al., 2021), usable on any feature pyramid."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SegFormerHead"]


class SegFormerHead(nn.Module):
    """Per-level Linear to ``channels``, bilinear resize to the first level, concatenation (deepest
    level first, as in SegFormer), 1x1 conv + BN + ReLU fuse, dropout, 1x1 classifier ``conv_seg``.

    Args:
        in_channels: channels of the input levels (first = finest).
        num_classes: K.
        channels: embedding width (256 for MiT-B0/B1, 768 for B2-B5).
        dropout: Dropout2d before the classifier.
        align_corners: of the bilinear resizes.

    ``forward(features)``: list of (B, C_l, H_l, W_l) -> logits (B, K, H_0, W_0).
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.linear_c = nn.ModuleList([nn.Linear(c, channels) for c in in_channels])
        self.linear_fuse = nn.Conv2d(channels * len(in_channels), channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.linear_c):
            raise ValueError(f"SegFormerHead expects {len(self.linear_c)} feature levels, got {len(features)}")
        size = features[0].shape[-2:]
        outs = []
        for i, (proj, f) in enumerate(zip(self.linear_c, features)):
            # the Linear on channels == a 1x1 conv; done channels-last to use the Linear weights as-is
            y = proj(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if i > 0:  # (no size test: under torch.export it would guard on the level sizes differing)
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)
            outs.append(y)
        x = self.act(self.bn(self.linear_fuse(torch.cat(outs[::-1], dim=1))))
        return self.conv_seg(self.dropout(x))
