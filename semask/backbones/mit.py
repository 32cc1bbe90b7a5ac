"""SeMask Mix Transformer (MiT, the SegFormer encoder) with a semantic layer in every stage.

Our own design (the official SeMask code has no MiT, spec section 4): each MiT stage is
``overlapping patch embedding -> blocks (efficient self-attention with spatial reduction, Mix-FFN)
-> semantic layer -> stage LayerNorm``; the normalised output is both the stage's feature and the
next stage's input, exactly as in SegFormer. With ``semantic_layers=False`` the network *is*
SegFormer's MiT, so SegFormer / ``nvidia/mit-b*`` weights map 1:1 (:func:`mit_checkpoint_filter_fn`).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model as timm_register_model

from ..core.checkpoint import check_dtypes, read_hub_weights, read_state_dict
from ..core.hf import HUB_PREFIX
from ..core.registry import register_model
from ..layers import SemanticLayer
from .swin import SeMaskSwinTransformer
from ._base import (
    SemanticFeaturesMixin, check_image_input, normalize_out_indices, per_stage_flags, per_stage_ints, semantic_class_count,
    tokens_to_map,
)

__all__ = [
    "SeMaskMiT",
    "MiTBlock",
    "MiTStage",
    "mit_arch_kwargs",
    "load_mit_pretrained",
    "mit_checkpoint_filter_fn",
    "segformer_checkpoint_filter_fn",
]


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``kernel // 2`` padding (overlapping patches), then LayerNorm on the tokens."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, H'*W', dim), (H', W')."""
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a ``sr_ratio``-strided conv of the map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # k and v fused (the mapping concatenates SegFormer's key/value)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _reduce(self, m: torch.Tensor) -> torch.Tensor:
        """The ``sr_ratio``-strided conv of the (B, C, H, W) map. A map side under ``sr_ratio`` (images under
        29 px in stage 1) would give no key at all: it is zero-padded to one ``sr_ratio`` patch (the conv
        is unchanged for every size that has a full patch, where the rest is dropped as in SegFormer)."""
        r = self.sr_ratio
        ph, pw = max(r - m.shape[2], 0), max(r - m.shape[3], 0)
        return self.sr(F.pad(m, (0, pw, 0, ph)) if ph or pw else m)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) tokens of an H x W map -> (B, N, C)."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        kv_in = self.sr_norm(self._reduce(tokens_to_map(x, hw)).flatten(2).transpose(1, 2)) if self.sr_ratio > 1 else x
        k, v = self.kv(kv_in).view(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MixFFN(nn.Module):
    """``fc1 -> 3x3 depthwise conv -> GELU -> fc2``: the conv supplies positional information."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        x = self.dwconv(tokens_to_map(self.fc1(x), hw)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(x))))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: efficient attention and Mix-FFN, each with DropPath."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = 4.0, drop: float = 0.0,
        attn_drop: float = 0.0, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class MiTStage(nn.Module):
    """Patch embedding, MiT blocks, the semantic layer (optional), then the stage LayerNorm."""

    def __init__(
        self, in_chans: int, dim: int, depth: int, num_heads: int, sr_ratio: int, patch_size: int, stride: int,
        mlp_ratio: float, drop: float, attn_drop: float, drop_path: Sequence[float], num_classes: int,
        sem_window_size: int, sem_global: bool, num_sem_blocks: int, sem_drop: float,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, patch_size, stride)
        self.blocks = nn.ModuleList(
            [MiTBlock(dim, num_heads, sr_ratio, mlp_ratio, drop, attn_drop, drop_path[i]) for i in range(depth)]
        )
        self.semantic_layer = (
            SemanticLayer(dim, num_classes, sem_window_size, sem_global, num_sem_blocks, sem_drop)
            if num_sem_blocks > 0 else None
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, with_prior: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, C_in, H, W) -> (features (B, dim, H', W'), prior logits (B, K, H', W') or None)."""
        x, hw = self.patch_embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        prior = None
        if self.semantic_layer is not None:
            prior, x = self.semantic_layer(x, hw, with_prior)
            prior = None if prior is None else tokens_to_map(prior, hw)
        return tokens_to_map(self.norm(x), hw), prior


class SeMaskMiT(SemanticFeaturesMixin, nn.Module):
    """SeMask Mix Transformer: SegFormer's MiT with a semantic layer before each stage norm.

    ``forward(x)`` takes images ``(B, in_chans, H, W)`` (any size, down to 1x1) and returns ``(features, priors)``:
    lists with one NCHW tensor per index in ``out_indices``; stage i has ``embed_dims[i]`` channels at
    stride ``4 * 2**i`` (conv arithmetic: ``ceil`` of the size), priors have ``num_classes`` channels
    (raw logits). ``semantic_layers=False`` gives the plain MiT (``priors`` empty).

    Args:
        num_classes: classes K of the semantic layers.
        in_chans: image channels.
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        sr_ratios: spatial-reduction ratio of the efficient self-attention per stage.
        mlp_ratios: Mix-FFN expansion per stage.
        patch_sizes: overlapping patch-embedding kernel per stage (7 then 3 in every MiT).
        strides: patch-embedding stride per stage (4 then 2).
        sem_window_size: window of the windowed semantic layers (8 divides the 512-crop stage maps).
        sem_global: per stage, True for global semantic attention (default W W G G, like SeMask Swin-T).
        num_sem_blocks: SemanticAttention blocks per semantic layer.
        semantic_layers: False builds plain MiT (exactly SegFormer's encoder).
        drop_rate: dropout (SegFormer: 0).
        attn_drop_rate: attention dropout (SegFormer: 0).
        drop_path_rate: stochastic-depth ramp end (SegFormer: 0.1).
        sem_drop: dropout inside the semantic attention.
        out_indices: stages to output; None: every stage.
        output_stride: only 32 is supported (MiT has no dilated variant).
        num_semantic_classes: K under an unambiguous name (timm's ``num_classes=0`` then means headless).
    """

    def __init__(
        self,
        num_classes: int = 150,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Union[float, Sequence[float]] = 4.0,
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        sem_window_size: int = 8,
        sem_global: Union[bool, Sequence[bool]] = (False, False, True, True),
        num_sem_blocks: Union[int, Sequence[int]] = 1,
        semantic_layers: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        sem_drop: float = 0.1,
        out_indices: Optional[Sequence[int]] = None,
        output_stride: int = 32,
        num_semantic_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        n = len(depths)
        if output_stride != 32:
            raise ValueError(
                f"SeMask MiT supports output_stride=32 only (got {output_stride}): MiT has no dilated "
                "variant. Use output_stride=32 and upsample in the decoder."
            )
        num_classes = semantic_class_count(num_classes, num_semantic_classes)
        lengths = {len(embed_dims), len(num_heads), len(sr_ratios), len(patch_sizes), len(strides)}
        if lengths != {n}:
            raise ValueError("embed_dims, depths, num_heads, sr_ratios, patch_sizes and strides need one entry per stage")
        mlp_ratios = (float(mlp_ratios),) * n if isinstance(mlp_ratios, (int, float)) else tuple(mlp_ratios)
        sem_global = per_stage_flags(sem_global, n, "sem_global")
        num_sem_blocks = per_stage_ints(num_sem_blocks, n, "num_sem_blocks")
        if len(mlp_ratios) != n:
            raise ValueError(f"mlp_ratios needs one entry per stage ({n} stages)")
        if not semantic_layers:
            num_sem_blocks = (0,) * n
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.sem_global = sem_global
        self.sem_window_size = sem_window_size
        self.semantic_layers = semantic_layers
        # None: every stage (timm's features_only builds the model without out_indices; a 3-stage
        # config must not get the 4-stage default)
        self.out_indices = normalize_out_indices(tuple(range(n)) if out_indices is None else out_indices, n)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # python floats: meta-safe
        self.stages = nn.ModuleList()
        reduction = 1
        self.feature_info: List[Dict[str, Any]] = []
        for i in range(n):
            reduction *= strides[i]
            self.stages.append(MiTStage(
                in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], depths[i], num_heads[i], sr_ratios[i],
                patch_sizes[i], strides[i], mlp_ratios[i], drop_rate, attn_drop_rate,
                dpr[sum(depths[:i]):sum(depths[: i + 1])], num_classes, sem_window_size, sem_global[i],
                num_sem_blocks[i], sem_drop,
            ))
            if i in self.out_indices:
                self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # SegFormer's init: Linear trunc_normal(0.02) and unit LayerNorms as in SeMask Swin (the semantic
        # q/k/v/res Linears included; gamma stays 0), plus fan-out normal convs
        SeMaskSwinTransformer._init_weights(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute MiT blocks in the backward pass (less memory, same gradients)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, with_priors: bool = True) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """x: (B, in_chans, H, W) float -> (features [B, C_i, H_i, W_i], priors [B, K, H_i, W_i]; empty
        with ``with_priors=False``)."""
        check_image_input(x, self.in_chans, self.stages[0].patch_embed.proj.weight.dtype)
        feats: List[torch.Tensor] = []
        priors: List[torch.Tensor] = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.stages):
            x, prior = stage(x, with_priors and i in self.out_indices)
            if i in self.out_indices:
                feats.append(x)
                if prior is not None:
                    priors.append(prior)
            if i == last:
                break
        return feats, priors

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay): the first patch embedding, then per stage its
        patch embedding, every block, the semantic layer (with the stage norm); ``coarse``: per stage."""
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.patch_embed", (-1,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.semantic_layer", (99990,)),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    def _truncate_stages(self, n: int) -> None:
        # prune_intermediate_layers: keep stages 0..n-1
        self.stages = self.stages[:n]

    @property
    def min_dynamic_size(self) -> int:
        """Smallest height/width of a size-generic export: every stage map, and every spatially reduced
        key/value map of the efficient attention, at least 2 px wide (61 for the SegFormer layout)."""
        def ok(size: int) -> bool:
            for i, stage in enumerate(self.stages):
                conv = stage.patch_embed.proj
                size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
                sr = stage.blocks[0].attn.sr_ratio if len(stage.blocks) else 1
                if size < 2 or size // sr < 2:
                    return False
                if i == max(self.out_indices):
                    break
            return True

        return next(s for s in range(1, 1 << 16) if ok(s))


# --------------------------------------------------------------------------------------------------
# SegFormer / transformers checkpoints -> our names

# transformers < 5 names (the layout of the files on the Hub, e.g. nvidia/mit-b0) -> transformers 5 names
_LEGACY_RENAMES = [
    (r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"attention\.self\.query\.", "attention.q_proj."),
    (r"attention\.self\.key\.", "attention.k_proj."),
    (r"attention\.self\.value\.", "attention.v_proj."),
    (r"attention\.self\.sr\.", "attention.sequence_reduction.sequence_reduction."),
    (r"attention\.self\.layer_norm\.", "attention.sequence_reduction.layer_norm."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"mlp\.dense1\.", "mlp.fc1."),
    (r"mlp\.dense2\.", "mlp.fc2."),
    (r"layer_norm_1\.", "layernorm_before."),
    (r"layer_norm_2\.", "layernorm_after."),
    (r"decode_head\.linear_c\.", "decode_head.linear_projections."),
]
# transformers 5 names -> ours (k_proj / v_proj are fused into kv afterwards)
_OUR_RENAMES = [
    (r"\.patch_embeddings\.layer_norm\.", ".patch_embed.norm."),
    (r"\.patch_embeddings\.proj\.", ".patch_embed.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.q_proj\.", ".attn.q."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.sr_norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"(stages\.\d+)\.layer_norm\.", r"\1.norm."),
    (r"decode_head\.linear_projections\.(\d+)\.proj\.", r"decode_head.linear_c.\1."),
    (r"decode_head\.batch_norm\.", "decode_head.bn."),
    (r"decode_head\.classifier\.", "decode_head.conv_seg."),
]


def _rename(key: str, rules: Sequence[Tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _map_segformer(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """SegFormer keys (either transformers layout, with or without ``segformer.``) -> ours, fused kv."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("segformer."):] if key.startswith("segformer.") else key
        if key.startswith("classifier."):  # ImageNet head of SegformerForImageClassification
            continue
        out[_rename(_rename(key, _LEGACY_RENAMES), _OUR_RENAMES)] = value
    for key in [k for k in out if ".attention.k_proj." in k]:
        v_key = key.replace(".attention.k_proj.", ".attention.v_proj.")
        out[key.replace(".attention.k_proj.", ".attn.kv.")] = torch.cat([out.pop(key), out.pop(v_key)], 0)
    return out


def _with_semantic_init(out: Dict[str, torch.Tensor], model: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
    # the semantic layers (absent from SegFormer) keep the model's own init, so that a strict load
    # still catches every mis-mapped SegFormer key
    if model is not None:
        for key, value in model.state_dict().items():
            if key not in out and ".semantic_layer." in key:
                out[key] = value
    return out


def mit_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Map a SegFormer checkpoint (``nvidia/mit-b*`` or ``SegformerModel``, transformers < 5 or 5 key
    layout) to :class:`SeMaskMiT` keys. The decode head and ImageNet classifier are dropped. With
    ``model``, its semantic-layer tensors are added so ``load_state_dict(strict=True)`` works (timm's
    ``pretrained_filter_fn`` signature)."""
    mapped = {k: v for k, v in _map_segformer(state_dict).items() if k.startswith("stages.")}
    if isinstance(model, SeMaskMiT):  # stages removed by prune_intermediate_layers (features_only) load nothing
        mapped = {k: v for k, v in mapped.items() if int(k.split(".")[1]) < len(model.stages)}
    return _with_semantic_init(mapped, model)


def segformer_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Map a ``SegformerForSemanticSegmentation`` checkpoint to a ``semask_mit_b*_segformer`` segmentor
    (``backbone.stages.*`` and ``decode_head.*``); with ``model``, its semantic tensors are kept."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in _map_segformer(state_dict).items():
        out[key if key.startswith("decode_head.") else f"backbone.{key}"] = value
    return _with_semantic_init(out, model)


# --------------------------------------------------------------------------------------------------
# Registered backbones (also in timm's registry: timm.create_model("semask_mit_b0", features_only=True))

_MIT_ARCHS = {
    "semask_mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "semask_mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "semask_mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "semask_mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "semask_mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "semask_mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}


def mit_arch_kwargs(variant: str) -> dict:
    """Architecture kwargs of a SeMask MiT size (``semask_mit_b0`` ... ``semask_mit_b5``)."""
    return dict(_MIT_ARCHS[variant])


def _timm_cfg(hub_id: str) -> dict:
    # ImageNet-1k MiT weights on the Hub (transformers layout; mapped by mit_checkpoint_filter_fn)
    return dict(
        hf_hub_id=hub_id, num_classes=150, input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=1.0,
        interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="stages.0.patch_embed.proj", classifier=None, license="other",
    )


default_cfgs = generate_default_cfgs({name: _timm_cfg(f"nvidia/mit-{name[-2:]}") for name in _MIT_ARCHS})


PretrainedSource = Union[bool, str, os.PathLike, Dict[str, torch.Tensor]]


def _variant_of(backbone: SeMaskMiT) -> Optional[str]:
    dims, depths = backbone.embed_dims, tuple(len(s.blocks) for s in backbone.stages)
    return next((v for v, a in _MIT_ARCHS.items() if a["embed_dims"] == dims and a["depths"] == depths), None)


def _read_mit_source(source: PretrainedSource, cfg: Dict[str, Any], cache_dir: Optional[str]
                     ) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(where from, tensors) of a MiT weights source, read through semask's safe readers."""
    if isinstance(source, dict):
        return "the given state dict", source
    if source is True and cfg.get("state_dict"):  # timm's pretrained_cfg_overlay=dict(state_dict=...)
        return "pretrained_cfg['state_dict']", cfg["state_dict"]
    if source is True and cfg.get("file"):  # timm's pretrained_cfg_overlay=dict(file=...)
        source = cfg["file"]
    elif source is True:
        return read_hub_weights(cfg["hf_hub_id"], cache_dir)
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return read_hub_weights(source, cache_dir)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"MiT pretrained weights must be True, a path, 'hf-hub:org/repo' or a state dict, got "
                        f"{type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"MiT checkpoint {path} does not exist; pass a SegFormer checkpoint file or folder, "
                                "'hf-hub:nvidia/mit-b0', or True")
    return str(path), read_state_dict(path)  # .safetensors, or .bin / .pth read with weights_only=True


def load_mit_pretrained(model: nn.Module, source: PretrainedSource = True, cache_dir: Optional[str] = None) -> SeMaskMiT:
    """Load SegFormer MiT weights into the :class:`SeMaskMiT` of ``model`` (a backbone, a segmentor, or a
    timm feature wrapper) with :func:`mit_checkpoint_filter_fn`.

    Args:
        source: True (``nvidia/mit-bX`` of the backbone's size from the Hub), ``"hf-hub:org/repo[@rev]"``,
            a checkpoint file or a folder holding ``model.safetensors`` / ``pytorch_model.bin`` (``.bin``
            is read with ``weights_only=True``), or a state dict; SegFormer key layout (transformers < 5 or 5).
        cache_dir: Hub cache override.
    Files are read by semask's safe readers (never timm's); timm then adapts a first conv for
    ``in_chans != 3``. The MiT trunk must match exactly (strict load); the semantic layers keep their
    initialisation. Returns the backbone; ValueError naming the source when the weights do not fit.
    """
    from timm.models import get_pretrained_cfg, load_pretrained

    backbone = next((m for m in model.modules() if isinstance(m, SeMaskMiT)), None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no SeMask MiT backbone to load MiT weights into")
    variant = _variant_of(backbone)
    if getattr(backbone, "pretrained_cfg", None):  # built by a registered entry point (timm overlays applied)
        cfg = dict(backbone.pretrained_cfg)
    elif variant is not None or source is not True:  # for file / state-dict sources only the loader fields matter
        cfg = get_pretrained_cfg(variant or "semask_mit_b0").to_dict()
    else:
        raise ValueError(f"no published MiT weights for embed_dims={backbone.embed_dims} with these depths; pass "
                         "a SegFormer checkpoint (file, folder or state dict) instead of True")
    name, state = _read_mit_source(source, cfg, cache_dir)
    mapped = mit_checkpoint_filter_fn(state, backbone)
    check_dtypes(mapped, backbone.state_dict(), name)
    cfg.update(state_dict=mapped, file=None, url="", hf_hub_id=None, source="")
    try:
        load_pretrained(backbone, pretrained_cfg=cfg, num_classes=cfg.get("num_classes", 150),
                        in_chans=backbone.in_chans, filter_fn=None, strict=True)
    except (RuntimeError, KeyError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"the weights in {name} do not fit this MiT backbone (embed_dims={backbone.embed_dims}): "
                         f"{why[:400]}. Use the SegFormer MiT checkpoint of the same size.") from None
    return backbone


def _create_semask_mit(variant: str, pretrained: PretrainedSource = False, **kwargs: Any) -> SeMaskMiT:
    """Build a registered size; ``pretrained``: False, or a source for :func:`load_mit_pretrained`."""
    model = build_model_with_cfg(
        SeMaskMiT, variant, pretrained=False, feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **{**mit_arch_kwargs(variant), **kwargs},
    )
    if pretrained is not False and pretrained is not None:
        load_mit_pretrained(model, pretrained)
    return model


def _register_mit_backbone(variant: str) -> None:
    # one entry point per size, registered in semask's registry (kind="backbone") and timm's
    arch = _MIT_ARCHS[variant]

    def entry(pretrained: Union[bool, str, Dict[str, torch.Tensor]] = False, **kwargs: Any) -> SeMaskMiT:
        return _create_semask_mit(variant, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__doc__ = (f"SeMask MiT-{variant[-2:].upper()}: dims {'-'.join(map(str, arch['embed_dims']))}, depths "
                     f"{'-'.join(map(str, arch['depths']))}. ``pretrained``: False, True (nvidia/mit-{variant[-2:]} "
                     "from the Hub), or a SegFormer checkpoint file / state dict.")
    globals()[variant] = timm_register_model(register_model(entry, kind="backbone"))


for _variant in _MIT_ARCHS:
    _register_mit_backbone(_variant)
