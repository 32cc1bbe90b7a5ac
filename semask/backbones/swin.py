"""SeMask Swin Transformer backbone, faithful to the official (mmseg) code.

Differences from timm's Swin that a checkpoint-compatible port must keep: the block zero-pads the map
*after* LN1 and rolls *after* padding (so padded zeros move with the shift), the SW-MSA mask uses -100
and is applied even when the map is no larger than the window, PatchMerging concatenates the 2x2
neighbours in the order (0,0), (1,0), (0,1), (1,1), and a semantic layer (windowed or global per
stage) follows every stage.

Module and parameter names follow the official code, so official checkpoints map 1:1 (the only
difference: ``relative_position_index`` is a non-persistent buffer here).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model as timm_register_model

from ..core.adapt import adapt_state_dict, window_of_table
from ..core.checkpoint import check_dtypes, read_hub_weights, read_state_dict
from ..core.hf import HUB_PREFIX
from ..core.registry import register_model
from ..layers import (
    SemanticLayer, merge_index, padded_size, shifted_window_mask, tokens_to_windows, window_index, windows_to_tokens,
)
from ._base import (
    SemanticFeaturesMixin, check_image_input, normalize_out_indices, per_stage_flags, per_stage_ints, semantic_class_count,
    tokens_to_map,
)

__all__ = ["SeMaskSwinTransformer", "SwinBlock", "SwinStage", "PatchMerging", "PatchEmbed", "WindowAttention"]


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 relative-position bias table for the N = w*w tokens of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative-position bias."""

    def __init__(
        self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
        qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def init_non_persistent_buffers(self) -> None:
        """Re-create ``relative_position_index`` (not in checkpoints): after a meta-device build and
        ``to_empty`` (accelerate, transformers ``from_pretrained``) it holds garbage (timm's convention;
        ``timm.models.reinit_non_persistent_buffers(model)`` calls it on every module)."""
        buf = self.relative_position_index
        buf.copy_(relative_position_index(self.window_size).to(buf.device))

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*nW, N, C) windows (batch-major); mask: (nW, N, N) additive shift mask or None -> (B*nW, N, C)."""
        bw, n, c = x.shape
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        bias = self.relative_position_bias().unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            # (B*nW, h, N, N): every image of the batch gets the same per-window masks
            bias = (bias + mask.unsqueeze(1)).repeat(bw // mask.shape[0], 1, 1, 1)
        bias = bias.to(q.dtype)
        if torch.compiler.is_exporting():
            # plain matmul-softmax: exporters decompose SDPA into ops whose output layout differs from
            # the fused kernel's, which breaks the views recorded at trace time (ONNX)
            out = torch.matmul((torch.matmul(q * self.scale, k.transpose(-2, -1)) + bias).softmax(-1), v)
        else:
            # a 4-D mask keeps SDPA on its fused CPU/GPU kernels (a 3-D one falls back to the math path)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.expand(bw, -1, -1, -1),
                dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale,
            )
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class SwinBlock(nn.Module):
    """Swin block with the official pad-after-norm-then-roll order and -100 shift masks."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
        qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
        drop_path: float = 0.0, norm_layer: type = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(
        self, x: torch.Tensor, hw: Tuple[int, int], mask: Optional[torch.Tensor] = None,
        index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x: (B, H*W, C); mask: the stage's (nW, N, N) shift mask (used by shifted blocks only);
        index: this block's :func:`~semask.layers.window_index` (computed when None)."""
        ws, s = self.window_size, self.shift_size
        fwd, inv = index if index is not None else window_index(hw[0], hw[1], ws, s, x.device)
        # official order: LN1, zero-pad bottom/right, roll by -shift, partition; one gather does the
        # last three (and one gather undoes them: reverse, roll back, crop)
        windows = tokens_to_windows(self.norm1(x), fwd, ws)
        windows = self.attn(windows, mask if s else None)
        x = x + self.drop_path(windows_to_tokens(windows, inv, x.shape[0]))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 merge with the official channel order (0,0), (1,0), (0,1), (1,1); odd sizes padded by 1."""

    def __init__(self, dim: int, norm_layer: type = nn.LayerNorm) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""
        b, _, c = x.shape
        # one gather (a zero token for odd sizes) -> per output token its 4 neighbours, concatenated
        # in the official channel order (r0,c0), (r1,c0), (r0,c1), (r1,c1): row offset first
        x = F.pad(x, (0, 0, 0, 1)).index_select(1, merge_index(hw[0], hw[1], x.device))
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    """Conv patch embedding; zero-pads the image at the right, then bottom, to a multiple of the patch."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C, ceil(H/p), ceil(W/p))."""
        p = self.patch_size
        # a constant p - 1 zero pad gives the same ceil(H/p) x ceil(W/p) patches as padding to a multiple
        # of p (the extra zeros fall outside every patch), without size-dependent pad amounts
        x = self.proj(F.pad(x, (0, p - 1, 0, p - 1)))
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinStage(nn.Module):
    """Swin blocks, then the stage's semantic layer, then (except the last stage) patch merging.

    Named ``layers.{i}`` like the official ``BasicLayer``. The SW-MSA mask and the window gather
    indices are built once per forward and shared by the stage's blocks.
    """

    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size: int, num_classes: int,
        sem_window_size: int, sem_global: bool, num_sem_blocks: int, mlp_ratio: float, qkv_bias: bool,
        qk_scale: Optional[float], drop: float, attn_drop: float, drop_path: Sequence[float],
        downsample: bool, sem_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio,
                      qkv_bias, qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])
        self.semantic_layer = (
            SemanticLayer(dim, num_classes, sem_window_size, sem_global, num_sem_blocks, sem_drop)
            if num_sem_blocks > 0 else None
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def shift_mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(nW, N, N) additive mask of the shifted blocks for an h x w stage map."""
        ws = self.window_size
        return shifted_window_mask(padded_size(h, ws), padded_size(w, ws), ws, self.shift_size, device)

    def forward(
        self, x: torch.Tensor, hw: Tuple[int, int], with_prior: bool = True
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Tuple[int, int]]:
        """x: (B, H*W, C) -> (stage tokens, prior logits (B, H*W, K) or None, next tokens, next (H, W))."""
        mask = self.shift_mask(hw[0], hw[1], x.device) if len(self.blocks) > 1 else None
        # gather indices shared by the blocks of the stage (regular and shifted windows)
        index = [window_index(hw[0], hw[1], self.window_size, s, x.device) for s in (0, self.shift_size)]
        for i, blk in enumerate(self.blocks):
            idx = index[i % 2]
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, hw, mask, idx, use_reentrant=False)
            else:
                x = blk(x, hw, mask, idx)
        prior = None
        if self.semantic_layer is not None:
            prior, x = self.semantic_layer(x, hw, with_prior)
        if self.downsample is None:
            return x, prior, x, hw
        return x, prior, self.downsample(x, hw), ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


class SeMaskSwinTransformer(SemanticFeaturesMixin, nn.Module):
    """SeMask Swin Transformer: Swin stages, each followed by a semantic layer.

    ``forward(x)`` takes images ``(B, in_chans, H, W)`` (any size, down to 1x1) and returns
    ``(features, priors)``: lists with one NCHW tensor per index in ``out_indices`` (views of the token
    maps, channels-last strides); features of stage i have ``embed_dim * 2**i`` channels at stride
    ``4 * 2**i`` (sizes rounded up), priors have ``num_classes`` channels (raw logits, no
    softmax). With ``semantic_layers=False`` the semantic layers are absent (plain Swin with
    per-output norms) and ``priors`` is empty.

    Args:
        num_classes: classes K of the semantic layers.
        in_chans: image channels.
        embed_dim: channels of stage 0.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: Swin window.
        sem_window_size: window of the windowed semantic layers (default: ``window_size``).
        sem_global: per stage, True for global semantic attention, False for windowed.
        num_sem_blocks: SemanticAttention blocks per semantic layer (an int for all stages).
        semantic_layers: False builds the plain baseline without semantic layers.
        drop_path_rate: stochastic-depth ramp end, over the Swin blocks only.
        sem_drop: dropout inside the semantic attention (0.1 officially).
        ape: absolute position embedding (bicubic-resized to the input); pretrain_img_size sets its grid.
        out_indices: stages to output (validated; negative indices count from the end); None: every stage.
        frozen_stages: official semantics: >= 0 freezes the patch embedding, >= 2 also stages 0..n-2.
        output_stride: only 32 is supported (Swin has no dilation).
    """

    def __init__(
        self,
        num_classes: int = 150,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        sem_window_size: Optional[int] = None,
        sem_global: Union[bool, Sequence[bool]] = False,
        num_sem_blocks: Union[int, Sequence[int]] = 1,
        semantic_layers: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        sem_drop: float = 0.1,
        patch_size: int = 4,
        patch_norm: bool = True,
        ape: bool = False,
        pretrain_img_size: int = 224,
        out_indices: Optional[Sequence[int]] = None,
        frozen_stages: int = -1,
        output_stride: int = 32,
        num_semantic_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        if output_stride != 32:
            raise ValueError(
                f"SeMask Swin supports output_stride=32 only (got {output_stride}): Swin has no dilated "
                "variant. Use output_stride=32 and upsample in the decoder."
            )
        num_classes = semantic_class_count(num_classes, num_semantic_classes)
        sem_global = per_stage_flags(sem_global, n, "sem_global")
        num_sem_blocks = per_stage_ints(num_sem_blocks, n, "num_sem_blocks")
        if not semantic_layers:
            num_sem_blocks = (0,) * n
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.window_size = window_size
        self.sem_window_size = sem_window_size or window_size
        self.sem_global = sem_global
        self.semantic_layers = semantic_layers
        # None: every stage (timm's features_only builds the model without out_indices; a 3-stage
        # config must not get the 4-stage default)
        self.out_indices = normalize_out_indices(tuple(range(n)) if out_indices is None else out_indices, n)
        self.frozen_stages = frozen_stages
        dims = [embed_dim * 2 ** i for i in range(n)]  # channels per stage (num_features: the last output's)
        self.patch_size = patch_size
        self.ape = ape

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)  # linear ramp 0..drop_path_rate (python floats: works on the meta device)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList([
            SwinStage(
                dims[i], depths[i], num_heads[i], window_size, num_classes, self.sem_window_size,
                sem_global[i], num_sem_blocks[i], mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                dpr[sum(depths[:i]):sum(depths[: i + 1])], downsample=i < n - 1, sem_drop=sem_drop,
            )
            for i in range(n)
        ])
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.feature_info = [
            dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f"norm{i}")
            for i in self.out_indices
        ]
        self.apply(self._init_weights)
        self._freeze_stages()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # mmseg's backbone.init_weights: every Linear (semantic ones included) trunc_normal(0.02)
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _freeze_stages(self) -> None:
        modules: List[nn.Module] = []
        if self.frozen_stages >= 0:
            modules.append(self.patch_embed)
        if self.frozen_stages >= 1 and self.ape:
            self.absolute_pos_embed.requires_grad = False
        if self.frozen_stages >= 2:
            modules += [self.layers[i] for i in range(self.frozen_stages - 1)]
        for m in modules:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "SeMaskSwinTransformer":
        super().train(mode)
        self._freeze_stages()
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute Swin blocks in the backward pass (less memory, same gradients)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"relative_position_bias_table"}

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        check_image_input(x, self.in_chans, self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(x)
        hw = (x.shape[2], x.shape[3])
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=hw, mode="bicubic")
        return self.pos_drop(x.flatten(2).transpose(1, 2)), hw

    def forward(self, x: torch.Tensor, with_priors: bool = True) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """x: (B, in_chans, H, W) float -> (features [B, C_i, H_i, W_i], priors [B, K, H_i, W_i]; empty
        with ``with_priors=False``, which skips assembling them: inference of the main logits)."""
        x, hw = self._embed(x)
        feats: List[torch.Tensor] = []
        priors: List[torch.Tensor] = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.layers):
            out, prior, x, next_hw = stage(x, hw, with_priors and i in self.out_indices)
            if i in self.out_indices:
                feats.append(tokens_to_map(getattr(self, f"norm{i}")(out), hw))
                if prior is not None:
                    priors.append(tokens_to_map(prior, hw))
            if i == last:
                break
            hw = next_hw
        return feats, priors

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay): the embedding, then every Swin block, then each
        stage's semantic layer (its patch merging and output norm join it); ``coarse``: one per stage."""
        return dict(
            stem=r"^patch_embed|^absolute_pos_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm(\d+)", (99999,))] if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.semantic_layer", (99990,)),
                (r"^layers\.(\d+)\.downsample", (99999,)),
                (r"^norm(\d+)", (99999,)),
            ],
        )

    def _truncate_stages(self, n: int) -> None:
        # prune_intermediate_layers: keep stages 0..n-1; the last kept stage no longer merges patches
        self.layers = self.layers[:n]
        self.layers[-1].downsample = None
        for i in range(n, len(self.depths)):
            if hasattr(self, f"norm{i}"):
                delattr(self, f"norm{i}")


# --------------------------------------------------------------------------------------------------
# Registered backbones (also in timm's registry: timm.create_model("semask_swin_tiny", features_only=True))

def _timm_cfg(**kwargs) -> dict:
    return dict(
        url="", num_classes=150, input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=1.0,
        interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.proj", classifier=None, license="apache-2.0", **kwargs,
    )


# The per-stage windowed/global default is the pattern of the official ADE20K FPN checkpoint of
# each size: T/S/L use W W G G, B uses W W W W.
_SWIN_ARCHS = {
    "semask_swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                             sem_global=(False, False, True, True)),
    "semask_swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
                              sem_global=(False, False, True, True)),
    "semask_swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
                             sem_global=(False, False, False, False)),
    "semask_swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                              sem_global=(False, False, True, True)),
}


def swin_arch_kwargs(variant: str) -> dict:
    """Architecture kwargs of a SeMask Swin size (``semask_swin_{tiny,small,base,large}``)."""
    return dict(_SWIN_ARCHS[variant])


# --------------------------------------------------------------------------------------------------
# Checkpoints: timm's ImageNet Swin weights -> SeMask Swin (timm-style ``checkpoint_filter_fn``), and
# the architecture that an official checkpoint's shapes show.
#
# The official SeMask configs start from the Microsoft Swin ImageNet weights (T/S: IN-1k 224 window 7,
# B/L: IN-22k 384 window 12), which timm republishes as safetensors. timm's layout differs from ours
# (= the official one) in one way: timm >= 0.9 puts ``downsample`` (PatchMerging) at the *start* of
# stage i+1 (``layers.{i+1}.downsample``) where we have it at the end of stage i. The merge channel
# order is the same: timm reshapes (B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5), i.e. (0,0), (1,0),
# (0,1), (1,1) like ours.

_logger = logging.getLogger("semask.hub")

# (embed_dim, depths) -> timm model.tag holding the ImageNet weights the official configs start from
IMAGENET_SOURCES: Dict[Tuple[int, Tuple[int, ...]], str] = {
    (96, (2, 2, 6, 2)): "swin_tiny_patch4_window7_224.ms_in1k",
    (96, (2, 2, 18, 2)): "swin_small_patch4_window7_224.ms_in1k",
    (128, (2, 2, 18, 2)): "swin_base_patch4_window12_384.ms_in22k",
    (192, (2, 2, 18, 2)): "swin_large_patch4_window12_384.ms_in22k",
}
_IGNORED_PREFIXES = ("head.", "norm.")  # classifier and final norm: SeMask has per-stage norms instead


def find_swin_backbone(model: nn.Module) -> Tuple[str, "SeMaskSwinTransformer"]:
    """(prefix, module) of the SeMask Swin backbone inside ``model`` (``""`` if it is the backbone)."""
    for name, m in model.named_modules():
        if isinstance(m, SeMaskSwinTransformer):
            return (name + "." if name else ""), m
    raise ValueError(f"{type(model).__name__} has no SeMask Swin backbone; pretrained_backbone applies to "
                     "Swin-based models only")


def default_imagenet_source(backbone: "SeMaskSwinTransformer") -> str:
    """``hf-hub:timm/<model.tag>`` of the ImageNet weights matching the backbone's size."""
    key = (backbone.embed_dim, tuple(backbone.depths))
    if key not in IMAGENET_SOURCES:
        raise ValueError(
            f"no default ImageNet weights for a Swin with embed_dim={key[0]}, depths={key[1]}; pass "
            "pretrained_backbone='hf-hub:timm/<swin repo>' or a path to a timm Swin .safetensors file"
        )
    from timm.models import get_pretrained_cfg

    name = IMAGENET_SOURCES[key]
    cfg = get_pretrained_cfg(name)
    return HUB_PREFIX + (cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f"timm/{name}")


def timm_swin_to_semask(
    state: Mapping[str, torch.Tensor], backbone: nn.Module
) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Map a Swin ImageNet state dict (timm >= 0.9 layout, or the official/timm < 0.9 one) onto
    ``backbone`` (a :class:`SeMaskSwinTransformer`).

    * ``layers.{i}.downsample.*`` (timm: start of stage i) -> ``layers.{i-1}.downsample.*``;
      official-layout checkpoints (``layers.0.downsample`` present) keep their indices;
    * ``head.*``, the final ``norm.*`` and recomputed buffers are dropped;
    * relative-position tables are resized to the backbone's window, the patch embedding is adapted
      to its ``in_chans`` (see :func:`semask.core.adapt.adapt_state_dict`).
    Returns (mapped state, ignored checkpoint keys, adaptation notes).
    """
    official_layout = any(k.endswith("layers.0.downsample.reduction.weight") for k in state)
    mapped: Dict[str, torch.Tensor] = {}
    ignored: List[str] = []
    for key, v in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if not official_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        mapped[k] = v
    adapted, notes = adapt_state_dict(mapped, backbone.state_dict())
    ignored += [k for k in mapped if k not in adapted]  # recomputed buffers
    return adapted, ignored, notes


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` signature: a timm Swin ImageNet state dict -> ``model``'s keys."""
    return timm_swin_to_semask(state_dict, model)[0]


def _read_imagenet_source(source: Any, backbone: "SeMaskSwinTransformer",
                          cache_dir: Optional[Union[str, os.PathLike]]) -> Tuple[str, Dict[str, torch.Tensor]]:
    if source is True:
        source = default_imagenet_source(backbone)
    src = os.fspath(source)
    if not src.startswith(HUB_PREFIX) and os.path.exists(src):
        return src, read_state_dict(src)  # safetensors, or .pth / .bin read with weights_only=True
    if not src.startswith(HUB_PREFIX) and (os.path.splitext(src)[1] or src.count("/") != 1):
        raise FileNotFoundError(f"pretrained_backbone={src!r} is neither an existing file/folder nor a Hub id "
                                "('hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k')")
    return read_hub_weights(src, cache_dir)


def load_swin_imagenet(
    model: nn.Module,
    source: Any = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, List[str]]:
    """Load ImageNet Swin weights into the SeMask Swin backbone of ``model`` (a backbone, a segmentor
    or timm's feature wrapper of one).

    Args:
        model: the model; its Swin backbone is found by type.
        source: True (timm's weights for the backbone's size, see ``IMAGENET_SOURCES``), an
            ``hf-hub:org/repo[@rev]`` id, or a path to a timm/official Swin ``.safetensors`` (or ``.pth``
            / ``.bin``, read with ``weights_only=True``) file.
        cache_dir: Hub cache (default ``$HF_HUB_CACHE``).
    Semantic layers, ``norm0..3`` and the heads keep their (official) initialisation. Every Swin
    trunk tensor (patch embedding, blocks, merges) must be in the checkpoint, else ValueError and
    nothing is loaded. Returns ``dict(loaded=..., not_loaded=..., ignored=..., adapted=...)``.
    """
    prefix, backbone = find_swin_backbone(model)
    name, state = _read_imagenet_source(source, backbone, cache_dir)
    mapped, ignored, notes = timm_swin_to_semask(state, backbone)
    target = backbone.state_dict()
    check_dtypes(mapped, target, name)
    unexpected = [k for k in mapped if k not in target]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
             if k in target and v.shape != target[k].shape]
    trunk_missing = [k for k in target if k not in mapped and (k.startswith("patch_embed.") or (
        k.startswith("layers.") and ".semantic_layer." not in k))]
    if unexpected or wrong or trunk_missing:
        raise ValueError(
            f"{name} does not fit this Swin backbone (embed_dim={backbone.embed_dim}, depths={backbone.depths}); "
            f"nothing was loaded. unexpected: {unexpected[:6]}, shape mismatch: {wrong[:6]}, missing: "
            f"{trunk_missing[:6]}. Use the ImageNet weights of the same Swin size (pretrained_backbone=True "
            "picks them)."
        )
    backbone.load_state_dict(mapped, strict=False)
    not_loaded = [k for k in target if k not in mapped]
    _logger.info("ImageNet init of %sbackbone from %s: loaded %d tensors; kept at init %d tensors (semantic "
                 "layers, per-stage norms): %s; ignored from the checkpoint: %s",
                 prefix, name, len(mapped), len(not_loaded), not_loaded, ignored)
    for note in notes:
        _logger.info("ImageNet init from %s: adapted %s", name, note)
    return dict(loaded=sorted(mapped), not_loaded=not_loaded, ignored=ignored, adapted=notes)


def _indices(keys: Sequence[str], pattern: str) -> List[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_swin_kwargs(sd: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> Dict[str, Any]:
    """SeMaskSwinTransformer kwargs that tensor shapes determine: ``in_chans, patch_size, embed_dim,
    depths, num_heads, window_size, mlp_ratio, qkv_bias, out_indices, ape, semantic_layers,
    num_sem_blocks`` (of the keys under ``prefix``; for the conversion rules of official checkpoints).

    The per-stage windowed/global pattern and the semantic window are not visible in the weights.
    """
    p = re.escape(prefix)
    keys = list(sd)
    proj = sd.get(f"{prefix}patch_embed.proj.weight")
    if proj is None:
        return {}
    stages = _indices(keys, rf"{p}layers\.(\d+)\.")
    out: Dict[str, Any] = dict(in_chans=proj.shape[1], patch_size=proj.shape[-1], embed_dim=proj.shape[0])
    out["depths"] = tuple(len(_indices(keys, rf"{p}layers\.{i}\.blocks\.(\d+)\.")) for i in stages)
    heads, windows = [], set()
    for i in stages:
        table = sd.get(f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table")
        if table is None:
            continue
        heads.append(table.shape[1])
        windows.add(window_of_table(table.shape[0]))  # the table has (2w-1)^2 rows
    if len(heads) == len(stages):
        out["num_heads"] = tuple(heads)
    if len(windows) == 1:
        out["window_size"] = windows.pop()
    fc1 = sd.get(f"{prefix}layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        out["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    out["qkv_bias"] = f"{prefix}layers.0.blocks.0.attn.qkv.bias" in sd
    out["out_indices"] = tuple(_indices(keys, rf"{p}norm(\d+)\."))
    out["ape"] = f"{prefix}absolute_pos_embed" in sd
    sem_blocks = tuple(len(_indices(keys, rf"{p}layers\.{i}\.semantic_layer\.class_injection\.(\d+)\."))
                       for i in stages)
    out["semantic_layers"] = any(sem_blocks)
    if any(sem_blocks):
        out["num_sem_blocks"] = sem_blocks
    return out


# --------------------------------------------------------------------------------------------------
# Builders

def _create_semask_swin(variant: str, pretrained: Any = False, **kwargs) -> SeMaskSwinTransformer:
    """Build a registered size; ``pretrained``: False, True (timm's ImageNet Swin of that size), an
    ``hf-hub:`` id or a weights file (see :func:`load_swin_imagenet`)."""
    kwargs = {**swin_arch_kwargs(variant), **kwargs}
    model = build_model_with_cfg(
        SeMaskSwinTransformer, variant, pretrained=False,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs,
    )
    file = (getattr(model, "pretrained_cfg", None) or {}).get("file")
    if pretrained is True and file:  # timm's pretrained_cfg_overlay=dict(file=...)
        pretrained = file
    if pretrained:
        load_swin_imagenet(model, pretrained)
    return model


default_cfgs = generate_default_cfgs({name: _timm_cfg() for name in _SWIN_ARCHS})


@timm_register_model
@register_model(kind="backbone")
def semask_swin_tiny(pretrained: bool = False, **kwargs) -> SeMaskSwinTransformer:
    """SeMask Swin-T: embed 96, depths 2-2-6-2, window 7, semantic layers W W G G."""
    return _create_semask_swin("semask_swin_tiny", pretrained, **kwargs)


@timm_register_model
@register_model(kind="backbone")
def semask_swin_small(pretrained: bool = False, **kwargs) -> SeMaskSwinTransformer:
    """SeMask Swin-S: embed 96, depths 2-2-18-2, window 7, semantic layers W W G G."""
    return _create_semask_swin("semask_swin_small", pretrained, **kwargs)


@timm_register_model
@register_model(kind="backbone")
def semask_swin_base(pretrained: bool = False, **kwargs) -> SeMaskSwinTransformer:
    """SeMask Swin-B: embed 128, depths 2-2-18-2, window 12, semantic layers W W W W."""
    return _create_semask_swin("semask_swin_base", pretrained, **kwargs)


@timm_register_model
@register_model(kind="backbone")
def semask_swin_large(pretrained: bool = False, **kwargs) -> SeMaskSwinTransformer:
    """SeMask Swin-L: embed 192, depths 2-2-18-2, window 12, semantic layers W W G G."""
    return _create_semask_swin("semask_swin_large", pretrained, **kwargs)
