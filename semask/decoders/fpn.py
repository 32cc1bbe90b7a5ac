"""Semantic-FPN decode head (mmseg ``FPNHead`` as used by SeMask's ``BranchFPNHead``) and the
parameter-free light semantic decoder that sums the upsampled prior maps (spec section 2)."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers._derived import derived_tensor
from ..layers.cpu import upsample_bilinear
from ..layers.window import is_traced

__all__ = ["ConvBNReLU", "FPNHead", "SemanticDecoder", "upsample_sum"]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # a pure layout choice; under torch.export NCHW instead: the layout of a symbolic batch of 1 is
    # ambiguous (the conv meta function would guard on batch > 1) and ONNX has no layouts anyway
    fmt = torch.contiguous_format if torch.compiler.is_exporting() else torch.channels_last
    return x.contiguous(memory_format=fmt)


def _resize_to(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize to ``size`` (:func:`~semask.layers.cpu.upsample_bilinear`); skipped when the size
    already matches (then an exact identity: x2 steps reach the stride-4 size except on odd inputs).
    Always traced under export / compile, where a size test would guard (and recompile) on the size."""
    if not is_traced() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return upsample_bilinear(x, size, align_corners)


class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule``: conv3x3 (no bias) -> BatchNorm -> ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, cout, H, W), channels-last strided (the fast layout on CPU and GPU)."""
        # a channels-last weight makes oneDNN/cuDNN keep NHWC end to end (the upsampling that follows
        # is ~4x faster in NHWC on CPU); the stored parameter stays contiguous
        x = _channels_last(x)
        bn = self.bn
        if not bn.training and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
            # eval: BatchNorm folded into the conv (one pass less over the map), weights cached
            w, b = derived_tensor(self, "folded", [self.conv.weight, bn.weight, bn.bias, bn.running_mean,
                                                   bn.running_var], self._folded)
            return self.act(F.conv2d(x, w, b, self.conv.stride, self.conv.padding))
        w = _channels_last(self.conv.weight)
        return self.act(bn(F.conv2d(x, w, None, self.conv.stride, self.conv.padding)))

    def _folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        w = _channels_last(self.conv.weight * scale[:, None, None, None])
        return w, bn.bias - bn.running_mean * scale


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class _Up2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _up2(x)


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
                    layers.append(_Up2())
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        size = out.shape[-2:]
        if torch.is_grad_enabled() or is_traced():
            for head, f in zip(self.scale_heads[1:], features[1:]):
                out = out + _resize_to(head(f), size, align_corners=False)
        else:
            # inference: the levels > 0 end with a x2 upsampling; interpolation is linear, so levels
            # of equal size before it are summed first and upsampled once (one pass over the stride-4
            # map instead of three), and everything accumulates in place
            pending: dict = {}
            for head, f in zip(self.scale_heads[1:], features[1:]):
                up = isinstance(head[-1], _Up2)
                y = head[:-1](f) if up else head(f)
                key = (up, tuple(y.shape))
                pending[key] = pending[key].add_(y) if key in pending else y
            for (up, _), y in pending.items():
                out.add_(_resize_to(_up2(y) if up else y, size, align_corners=False))
        # NHWC 1x1 conv (~1.7x faster than NCHW on CPU) with the class dim zero-padded to a multiple
        # of 16 (K = 150 runs ~1.5x slower than 160 in oneDNN); logits returned in NCHW layout
        k = self.conv_seg.out_channels
        w, b = self.conv_seg.weight, self.conv_seg.bias
        # plain conv when exporting: the slice below would guard on batch == 1 (torch.export), and the
        # classic (jit-tracing) ONNX exporter cannot convert a conv with a computed kernel
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return F.conv2d(self.dropout(out), w, b)
        pad = -k % 16
        w = _channels_last(F.pad(w, (0, 0, 0, 0, 0, 0, 0, pad)))
        b = None if b is None else F.pad(b, (0, pad))
        return F.conv2d(self.dropout(out), w, b)[:, :k].contiguous()


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
