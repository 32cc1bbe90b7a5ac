"""FaPN pixel decoders of SeMask: ``PixelFANDecoder`` (FaPN FPN, no transformer) and
``MSDeformAttnPixelFANDecoder`` (Mask2Former's deformable encoder + a FaPN-aligned res2 level).

Feature alignment uses modulated deformable convolution (DCNv2) through
``torchvision.ops.deform_conv2d``, which has the official ``DCNv2`` offset/mask layout and sampling
(spec section 3.5). The GroupNorm of ``align_l.offset`` *is* the GroupNorm of ``layer_l`` in the
official code (Q11); here it is registered once, under ``layer_l.norm``, and ``align_l`` only holds a
reference, so the state dict has no duplicate (the converter checks and drops the official copy).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from .d2_layers import Conv2dNorm, c2_xavier_fill
from .mask2former import MSDeformAttnPixelDecoder

__all__ = ["ModulatedDeformConv", "FeatureAlign", "PixelFANDecoder", "MSDeformAttnPixelFANDecoder"]


class ModulatedDeformConv(nn.Module):
    """DCNv2 with its own offset/mask predictor (``dcn_v2.DCN`` with ``extra_offset_mask=True``).

    Keys: ``weight``, ``bias``, ``conv_offset_mask.{weight,bias}``. ``forward(x, offset_feat)``: the
    3x3 ``conv_offset_mask(offset_feat)`` gives 3*G*k*k channels split into thirds (o1, o2, m);
    offsets = cat(o1, o2) read as interleaved (dy, dx) per (group, tap), mask = sigmoid(m).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1,
                 deformable_groups: int = 8) -> None:
        super().__init__()
        self.padding = padding
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_offset_mask = nn.Conv2d(in_channels, deformable_groups * 3 * kernel_size * kernel_size,
                                          kernel_size, padding=padding)
        bound = 1.0 / (in_channels * kernel_size * kernel_size) ** 0.5
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.conv_offset_mask.weight)  # starts as a plain conv with mask 0.5
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: torch.Tensor, offset_feat: torch.Tensor) -> torch.Tensor:
        o1, o2, m = self.conv_offset_mask(offset_feat).chunk(3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding, mask=m.sigmoid())


class FeatureAlign(nn.Module):
    """FaPN's feature alignment (without the selection module): ``ReLU(DCN(feat_s, offset)) + feat_l``
    with ``offset = GN(conv1x1([feat_l, 2 * feat_s]))``; ``feat_s`` already has ``feat_l``'s size.

    ``shared_norm`` is the GroupNorm owned by the following ``layer_l`` (tied, not registered here).
    """

    def __init__(self, channels: int, shared_norm: nn.Module, deformable_groups: int = 8) -> None:
        super().__init__()
        self.offset = nn.Conv2d(channels * 2, channels, kernel_size=1, bias=False)
        c2_xavier_fill(self.offset)
        self.dcpack_L2 = ModulatedDeformConv(channels, channels, 3, 1, deformable_groups)
        object.__setattr__(self, "_offset_norm", shared_norm)  # a reference, not a child module

    def forward(self, feat_l: torch.Tensor, feat_s: torch.Tensor) -> torch.Tensor:
        if feat_s.shape[-2:] != feat_l.shape[-2:]:
            feat_s = F.interpolate(feat_s, size=feat_l.shape[-2:], mode="bilinear", align_corners=False)
        offset = self._offset_norm(self.offset(torch.cat([feat_l, feat_s * 2], dim=1)))
        return F.relu(self.dcpack_L2(feat_s.float(), offset.float())) + feat_l


def _fapn_level(in_channels: int, conv_dim: int) -> Tuple[Conv2dNorm, FeatureAlign, Conv2dNorm]:
    """(adapter, align, layer) of one FaPN level; ``align.offset`` and ``layer`` share one GroupNorm."""
    gn = nn.GroupNorm(32, conv_dim)
    lat = Conv2dNorm(in_channels, conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(32, conv_dim))
    out = Conv2dNorm(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False, norm=gn, activation=F.relu)
    c2_xavier_fill(lat)
    c2_xavier_fill(out)
    return lat, FeatureAlign(conv_dim, gn), out


class PixelFANDecoder(nn.Module):
    """FaPN FPN: ``layer_4`` (3x3+GN+ReLU) on res5, then for res4..res2:
    ``y = layer_l(align_l(lat, lat + nearest_up(y)))`` with ``lat = adapter_l(res)``.

    ``forward(features)``: [res2..res5] -> (mask_features (3x3 conv) at stride 4, the first three
    top-down outputs [stride 32, 16, 8]).
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        n = len(self.in_channels)
        for idx, cin in enumerate(self.in_channels):
            if idx == n - 1:
                out = Conv2dNorm(cin, conv_dim, kernel_size=3, padding=1, bias=False,
                                 norm=nn.GroupNorm(32, conv_dim), activation=F.relu)
                c2_xavier_fill(out)
            else:
                lat, align, out = _fapn_level(cin, conv_dim)
                self.add_module(f"adapter_{idx + 1}", lat)
                self.add_module(f"align_{idx + 1}", align)
            self.add_module(f"layer_{idx + 1}", out)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        n = len(self.in_channels)
        y = getattr(self, f"layer_{n}")(features[-1])
        outs = [y]
        for idx in range(n - 2, -1, -1):
            lat = getattr(self, f"adapter_{idx + 1}")(features[idx])
            y = lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{idx + 1}")(getattr(self, f"align_{idx + 1}")(lat, y))
            outs.append(y)
        return self.mask_features(y), outs[:3]


class MSDeformAttnPixelFANDecoder(MSDeformAttnPixelDecoder):
    """Mask2Former's deformable pixel decoder whose res2 level is FaPN-aligned:
    ``layer_1(align_1(lat, lat + bilinear_up(encoder stride-8 output)))``. Same I/O as the parent."""

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.0, n_points: int = 4) -> None:
        super().__init__(in_channels, conv_dim, mask_dim, num_heads, num_layers, dim_feedforward, dropout, n_points)
        self.adapter_1, self.align_1, self.layer_1 = _fapn_level(self.in_channels[0], conv_dim)

    def fpn_level(self, res2: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        lat = self.adapter_1(res2)
        y = lat + F.interpolate(coarse, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        return self.layer_1(self.align_1(lat, y))
