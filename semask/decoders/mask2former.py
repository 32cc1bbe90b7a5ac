"""Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``) and transformer decoder
(``MultiScaleMaskedTransformerDecoder``), checkpoint-compatible with the official SeMask code
(spec section 3). Inputs are the backbone's res2..res5 feature lists (strides 4..32)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .d2_layers import MLP, Conv2dNorm, c2_xavier_fill, sine_position_embedding, xavier_init_
from .ms_deform_attn import MSDeformAttnTransformerEncoderOnly

__all__ = ["MSDeformAttnPixelDecoder", "MultiScaleMaskedTransformerDecoder"]


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder on res3..res5, then an FPN step down to res2.

    Keys: ``input_proj.{0,1,2}`` (res5, res4, res3: 1x1 conv + GN), ``transformer.*``, ``adapter_1`` /
    ``layer_1`` (res2 lateral 1x1+GN and output 3x3+GN+ReLU), ``mask_features`` (1x1 conv).

    ``forward(features)``: [res2, res3, res4, res5] (B, C_i, H_i, W_i) -> (mask_features (B, mask_dim,
    H_2, W_2), multi-scale features [stride 32, 16, 8] each (B, conv_dim, H, W)).

    Args:
        in_channels: channels of res2..res5.
        conv_dim: decoder width (256).
        mask_dim: mask-embedding channels (256).
        num_heads: deformable-attention heads (the official code uses MASK_FORMER.NHEADS).
        num_layers: encoder layers (6).
        dim_feedforward: encoder FFN width (1024, hard-coded officially).
        dropout: encoder dropout.
        n_points: sampling points per head and level (4).
    """

    num_encoder_levels = 3  # res3, res4, res5

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256, num_heads: int = 8,
                 num_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.0, n_points: int = 4) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected the channels of res2..res5 (4 levels), got {tuple(in_channels)}")
        self.in_channels = tuple(in_channels)
        self.conv_dim = conv_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in reversed(self.in_channels[1:])
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=num_heads, num_encoder_layers=num_layers, dim_feedforward=dim_feedforward,
            dropout=dropout, num_feature_levels=self.num_encoder_levels, enc_n_points=n_points,
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        self.adapter_1 = Conv2dNorm(self.in_channels[0], conv_dim, kernel_size=1, bias=False,
                                    norm=nn.GroupNorm(32, conv_dim))
        self.layer_1 = Conv2dNorm(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False,
                                  norm=nn.GroupNorm(32, conv_dim), activation=F.relu)
        c2_xavier_fill(self.adapter_1)
        c2_xavier_fill(self.layer_1)

    def encode(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The deformable encoder on res5, res4, res3 -> its outputs as maps (strides 32, 16, 8)."""
        srcs = [proj(x) for proj, x in zip(self.input_proj, reversed(features[1:]))]
        pos = [sine_position_embedding(x, self.conv_dim // 2) for x in srcs]
        y, shapes = self.transformer(srcs, pos)
        b = y.shape[0]
        maps = y.split([h * w for h, w in shapes], dim=1)
        return [z.transpose(1, 2).reshape(b, -1, h, w) for z, (h, w) in zip(maps, shapes)]

    def fpn_level(self, res2: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The res2 FPN level: lateral + bilinear-upsampled encoder output, then the 3x3 output conv."""
        lat = self.adapter_1(res2)
        y = lat + F.interpolate(coarse, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        return self.layer_1(y)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        features = [f.float() for f in features]  # the official op runs in fp32 (autocast disabled)
        out = self.encode(features)
        y = self.fpn_level(features[0], out[-1])
        return self.mask_features(y), out[:3]


class _AttentionLayer(nn.Module):
    """Post-norm attention block ``norm(tgt + attn(...))``; the attention is registered under the
    official key ``attn_name`` (``self_attn`` or ``multihead_attn``), next to ``norm``."""

    def __init__(self, d_model: int, nhead: int, dropout: float, attn_name: str) -> None:
        super().__init__()
        self.add_module(attn_name, nn.MultiheadAttention(d_model, nhead, dropout=dropout))
        self.attn_name = attn_name
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        xavier_init_(self)

    def attend(self, tgt: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = getattr(self, self.attn_name)(q, k, value=v, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class _SelfAttentionLayer(_AttentionLayer):
    """Post-norm self-attention over the queries (keys ``self_attn``, ``norm``)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, nhead, dropout, "self_attn")

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = tgt + query_pos
        return self.attend(tgt, q, q, tgt)


class _CrossAttentionLayer(_AttentionLayer):
    """Post-norm (masked) cross-attention from queries to one feature level (keys ``multihead_attn``, ``norm``)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, nhead, dropout, "multihead_attn")

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, attn_mask: Optional[torch.Tensor],
                pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        return self.attend(tgt, tgt + query_pos, memory + pos, memory, attn_mask)


class _FFNLayer(nn.Module):
    """Post-norm FFN (keys ``linear1``, ``linear2``, ``norm``)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        xavier_init_(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's decoder: learnable queries, masked cross-attention round-robin over 3 levels.

    ``forward(multi_scale, mask_features)`` -> dict with ``pred_logits`` (B, Q, K+1), ``pred_masks``
    (B, Q, H_4, W_4) and ``aux_outputs`` (list of dicts, the predictions before each layer).

    Args:
        in_channels: channels of the multi-scale features (= conv_dim of the pixel decoder).
        num_classes: K (the classifier has K+1 outputs, the last one "no object").
        hidden_dim: query width (256).
        num_queries: Q (100).
        nheads: attention heads (8).
        dim_feedforward: FFN width (2048).
        dec_layers: masked-attention layers (official cfg DEC_LAYERS - 1 = 9).
        mask_dim: mask-embedding channels (= the pixel decoder's mask_dim).
        enforce_input_project: 1x1 input projections even when in_channels == hidden_dim.
    """

    num_feature_levels = 3

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 256,
                 enforce_input_project: bool = False) -> None:
        super().__init__()
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(
            _SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            _CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            _FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor,
                         target_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """output (Q, B, C) -> class logits (B, Q, K+1), mask logits (B, Q, H, W) and the boolean
        attention mask (B*heads, Q, h*w) for the next layer (True = masked: sigmoid < 0.5)."""
        dec = self.decoder_norm(output).transpose(0, 1)
        logits = self.class_embed(dec)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(dec), mask_features)
        attn = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        attn = (attn.sigmoid().flatten(2) < 0.5).detach()
        attn = attn.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        return logits, masks, attn

    def forward(self, x: Sequence[torch.Tensor], mask_features: torch.Tensor) -> Dict[str, object]:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        b = x[0].shape[0]
        sizes, src, pos = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(tuple(x[i].shape[-2:]))
            pos.append(sine_position_embedding(x[i], self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))  # (HW, B, C)
        query_embed = self.query_embed.weight.unsqueeze(1).expand(-1, b, -1)
        output = self.query_feat.weight.unsqueeze(1).expand(-1, b, -1)
        classes, masks = [], []
        logits, m, attn = self.prediction_heads(output, mask_features, sizes[0])
        classes.append(logits)
        masks.append(m)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # a query masked everywhere would get NaN attention: let it attend everywhere instead
            attn = attn & ~attn.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](output, src[level], attn, pos[level], query_embed)
            output = self.transformer_self_attention_layers[i](output, query_embed)
            output = self.transformer_ffn_layers[i](output)
            logits, m, attn = self.prediction_heads(output, mask_features, sizes[(i + 1) % self.num_feature_levels])
            classes.append(logits)
            masks.append(m)
        return {
            "pred_logits": classes[-1], "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": mk} for c, mk in zip(classes[:-1], masks[:-1])],
        }
