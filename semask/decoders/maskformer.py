"""MaskFormer's pixel decoder (``BasePixelDecoder``: a GN FPN) and its DETR transformer predictor
(``TransformerPredictor`` on res5), checkpoint-compatible with the official SeMask code (spec section 3)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .d2_layers import MLP, Conv2dNorm, c2_xavier_fill, sine_position_embedding, xavier_init_

__all__ = ["BasePixelDecoder", "TransformerPredictor"]


class BasePixelDecoder(nn.Module):
    """Top-down FPN with GroupNorm: ``layer_4`` (3x3 conv+GN+ReLU) on res5, then for res4..res2 a
    lateral ``adapter_l`` (1x1+GN) plus the nearest-upsampled coarser output, through ``layer_l``.

    ``forward(features)``: [res2..res5] -> (mask_features (B, mask_dim, H_2, W_2) from a 3x3 conv,
    top-down outputs [stride 32, 16, 8, 4]).
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        n = len(self.in_channels)
        for idx, cin in enumerate(self.in_channels):
            gn = nn.GroupNorm(32, conv_dim)
            if idx == n - 1:
                out = Conv2dNorm(cin, conv_dim, kernel_size=3, padding=1, bias=False, norm=gn, activation=F.relu)
            else:
                lat = Conv2dNorm(cin, conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(32, conv_dim))
                c2_xavier_fill(lat)
                self.add_module(f"adapter_{idx + 1}", lat)
                out = Conv2dNorm(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False, norm=gn, activation=F.relu)
            c2_xavier_fill(out)
            self.add_module(f"layer_{idx + 1}", out)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_fill(self.mask_features)

    def top_down(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        n = len(self.in_channels)
        outs: List[torch.Tensor] = []
        y = getattr(self, f"layer_{n}")(features[-1])
        outs.append(y)
        for idx in range(n - 2, -1, -1):
            lat = getattr(self, f"adapter_{idx + 1}")(features[idx])
            y = getattr(self, f"layer_{idx + 1}")(lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
            outs.append(y)
        return outs

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        outs = self.top_down(features)
        return self.mask_features(outs[-1]), outs


class _DETRDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer (keys ``self_attn``, ``multihead_attn``, ``linear1/2``, ``norm1..3``)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, value=tgt, need_weights=False)[0]))
        attn = self.multihead_attn(tgt + query_pos, memory + pos, value=memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class _DETRDecoder(nn.Module):
    """Decoder stack with a final LayerNorm applied to every intermediate output (keys ``layers``, ``norm``)."""

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DETRDecoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.norm = nn.LayerNorm(layer_kwargs["d_model"])

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            hs.append(self.norm(tgt))
        return torch.stack(hs)  # (L, Q, B, C)


class _DETRTransformer(nn.Module):
    """The DETR transformer of MaskFormer with 0 encoder layers (the official configs): a decoder only."""

    def __init__(self, d_model: int, nhead: int, num_decoder_layers: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.decoder = _DETRDecoder(num_decoder_layers, d_model=d_model, nhead=nhead,
                                    dim_feedforward=dim_feedforward, dropout=dropout)
        xavier_init_(self)

    def forward(self, src: torch.Tensor, query_embed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src, pos (B, C, H, W), query_embed (Q, C) -> (L, B, Q, C)."""
        b = src.shape[0]
        memory = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).expand(-1, b, -1)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, pos, query_pos).transpose(1, 2)


class TransformerPredictor(nn.Module):
    """MaskFormer's predictor: DETR decoder on the res5 features, class and mask-embedding heads.

    ``forward(x, mask_features)``: x (B, C5, H5, W5) -> dict with ``pred_logits`` (B, Q, K+1),
    ``pred_masks`` (B, Q, H_4, W_4) and ``aux_outputs`` (every earlier decoder layer).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dropout: float = 0.1, dim_feedforward: int = 2048, dec_layers: int = 6,
                 mask_dim: int = 256, enforce_input_project: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.transformer = _DETRTransformer(hidden_dim, nheads, dec_layers, dim_feedforward, dropout)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Sequential()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor) -> Dict[str, object]:
        pos = sine_position_embedding(x, self.hidden_dim // 2)
        hs = self.transformer(self.input_proj(x), self.query_embed.weight, pos)  # (L, B, Q, C)
        classes = self.class_embed(hs)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
        return {
            "pred_logits": classes[-1], "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes[:-1], masks[:-1])],
        }
