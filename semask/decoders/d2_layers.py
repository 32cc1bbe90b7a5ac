"""Small building blocks shared by the detectron2-family decoders (MaskFormer, Mask2Former, FaPN).

Module and parameter names follow detectron2 / the official MaskFormer code, so converted
checkpoints load 1:1 (``weight``, ``bias``, ``norm.{weight,bias}`` for a conv with a norm).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ["Conv2dNorm", "MLP", "c2_xavier_fill", "sine_position_embedding", "xavier_init_"]


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as detectron2 uses it: kaiming-uniform(a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform init of every >= 2-D parameter (DETR's ``_reset_parameters``); returns ``module``."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return module


class Conv2dNorm(nn.Conv2d):
    """detectron2 ``Conv2d``: conv, then an optional norm, then an optional activation.

    Keys: ``weight``, ``bias`` (if any) and ``norm.*``. The norm is the module's ``norm``
    child (GroupNorm(32) in every SeMask decoder).
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None,
                 activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (DETR's MLP); keys ``layers.{i}.*``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def sine_position_embedding(
    x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """DETR's normalised sine position encoding for an unpadded map (no mask).

    x: (B, C, H, W) (only its shape, device and dtype are used) -> (B, 2*num_pos_feats, H, W), the
    y features first. Positions are ``i / (n + 1e-6) * scale`` for i = 1..n (as the official code).
    """
    b, _, h, w = x.shape
    eps = 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device) / (h + eps) * scale
    xx = torch.arange(1, w + 1, dtype=torch.float32, device=x.device) / (w + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def enc(v: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, num_pos_feats), sin/cos interleaved
        p = v[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = enc(y)[:, None, :].expand(h, w, num_pos_feats)
    pos_x = enc(xx)[None, :, :].expand(h, w, num_pos_feats)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)
