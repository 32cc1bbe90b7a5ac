"""SeMask Swin Transformer backbone, faithful to the official (mmseg) code.

Differences from timm's Swin that a checkpoint-compatible port must keep (spec section 1.3, 8):
the block pads *after* LN1 and rolls *after* padding, the SW-MSA mask uses -100 and is applied even
when the map is smaller than the window, PatchMerging concatenates (0,0), (1,0), (0,1), (1,1), and a
semantic layer (windowed or global per stage) follows every stage.

Module and parameter names follow the official code, so official checkpoints map 1:1 (the only
difference: ``relative_position_index`` is a non-persistent buffer here).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg

from ..layers import (
    SemanticLayer, batched_index, cached_shifted_window_mask, eager_cpu_inference, gather_rows, merge_index,
    token_chunks, tokens_to_windows, window_index, windows_to_tokens,
)
from ..layers._derived import derived_tensor
from ..layers.cpu import linear_module, mlp_residual
from timm.models import generate_default_cfgs, register_model as timm_register_model

from ..models._registry import register_model
from ._base import (
    SemanticFeaturesMixin, check_image_input, normalize_out_indices, per_stage_flags, per_stage_ints, semantic_class_count,
)

__all__ = ["SeMaskSwinTransformer", "SwinBlock", "SwinStage", "PatchMerging", "PatchEmbed"]


def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # (N, N)


def _nchw(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) view (channels-last strides)."""
    return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[2]).permute(0, 3, 1, 2)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative-position bias, on ``F.scaled_dot_product_attention``
    (batched matmul-softmax in CPU inference and export)."""

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
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=False)
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
        buf.copy_(_relative_position_index(self.window_size).to(buf.device))

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def window_bias(self, mask: Optional[torch.Tensor], batch: int, windows: int) -> torch.Tensor:
        """Additive attention bias: relative-position bias (+ shift mask) as a 4-D mask.

        mask: (nW, 1, N, N) or None; returns (windows, h, N, N) for ``windows = B * nW`` (a view
        where possible) or (1, h, N, N) without a mask.
        """
        def build() -> torch.Tensor:
            bias = self.relative_position_bias().unsqueeze(0)  # (1, h, N, N)
            return bias if mask is None else bias + mask  # (nW, h, N, N)

        # inference: built once per input size, not in every block call
        table = self.relative_position_bias_table
        bias = derived_tensor(self, "bias", [table] if mask is None else [table, mask], build)
        if mask is None:
            return bias
        h, n = self.num_heads, bias.shape[-1]  # windows are batch-major
        if type(batch) is int and type(bias.shape[0]) is int:
            return bias.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(windows, h, n, n)  # a view if B == 1
        # symbolic sizes (export): reshape's view-or-copy choice would guard on B == 1 / nW == 1
        return bias.repeat(batch, 1, 1, 1)

    def attend(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B*nW, N, C) windows, bias from :meth:`window_bias` -> (B*nW, N, heads, C/heads) attention
        output (a view; its heads flatten to C) *before* ``proj``: the caller projects after
        un-windowing, so padded tokens are never projected."""
        bw, n, c = x.shape
        h = self.num_heads
        fast = not self.training and eager_cpu_inference(x)
        qkv = linear_module(self.qkv, x) if fast else self.qkv(x)
        # (B*nW, h, N, hd) strided views of the qkv output: no copies before the attention kernel
        q, k, v = qkv.view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = bias.to(q.dtype)
        if fast or torch.compiler.is_exporting():
            # plain matmul-softmax. Export: exporters decompose SDPA into ops whose output layout
            # differs from the fused kernel's, which breaks the views recorded at trace time (ONNX).
            # CPU inference on window chunks: batched GEMMs beat the fused CPU kernel 1.2-1.5x at
            # 49-token windows (the per-head copies they need stay in cache)
            out = torch.matmul((torch.matmul(q * self.scale, k.transpose(-2, -1)) + bias).softmax(-1), v)
        else:
            # a 4-D mask keeps SDPA on its fused CPU/GPU kernels (a 3-D one falls back to the math path)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.expand(bw, -1, -1, -1),
                dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale,
            )
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, batch: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, 1, N, N) additive shift mask or None -> (B*nW, N, C)."""
        out = self.attend(x, self.window_bias(mask, batch, x.shape[0])).flatten(2)
        return self.proj_drop(self.proj(out))


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
        self, x: torch.Tensor, hw: Tuple[int, int], mask: Optional[torch.Tensor],
        index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x: (B, H*W, C); mask: the stage's (nW, 1, N, N) shift mask (used by shifted blocks only);
        index: this block's :func:`~semask.layers.window_index` (computed when None)."""
        b = x.shape[0]
        ws, s = self.window_size, self.shift_size
        fwd, inv = index if index is not None else window_index(hw[0], hw[1], ws, s, x.device)
        mask = mask if s else None
        if not self.training and eager_cpu_inference(x):
            return self._forward_chunked(x, mask, fwd, inv)
        # official order: LN1, zero-pad, roll, partition; here one gather does pad + roll + partition
        xw = tokens_to_windows(self.norm1(x), fwd, ws)
        y = self.attn.attend(xw, self.attn.window_bias(mask, b, xw.shape[0])).flatten(2)
        # un-window before the output projection: the padded tokens are dropped, never projected
        x = x + self.drop_path(self.attn.proj_drop(self.attn.proj(windows_to_tokens(y, inv, b))))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_chunked(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], fwd: torch.Tensor, inv: torch.Tensor
    ) -> torch.Tensor:
        """Inference on the CPU, same values as the whole-tensor path: the windows, then the tokens,
        of the whole batch go through in cache-sized chunks (window q/k/v and the 4C-wide MLP hidden
        never reach DRAM)."""
        b, length, c = x.shape
        n = self.window_size ** 2
        nw = fwd.shape[0] // n
        attn = self.attn
        # + the zero token that padded positions read, per image; batch flattened into rows
        xn = F.pad(self.norm1(x), (0, 0, 0, 1)).view(-1, c)
        rows = batched_index(fwd, b, length + 1)
        bias = attn.window_bias(mask, 1, nw)
        y = x.new_empty(b * nw, n, attn.num_heads, c // attn.num_heads)
        for w0, w1 in token_chunks(b * nw, n):
            xw = xn.index_select(0, rows[w0 * n:w1 * n]).view(w1 - w0, n, c)
            y[w0:w1] = attn.attend(xw, bias if mask is None else _windows_of(bias, w0, w1))
        y = y.view(-1, c)
        rows = batched_index(inv, b, nw * n)
        x = x.reshape(-1, c)
        out = torch.empty_like(x)
        for t0, t1 in token_chunks(b * length):
            xc = linear_module(attn.proj, y.index_select(0, rows[t0:t1]), residual=x[t0:t1])
            out[t0:t1] = mlp_residual(self.mlp, xc, self.norm2(xc))
        return out.view(b, length, c)


def _windows_of(per_window: torch.Tensor, w0: int, w1: int) -> torch.Tensor:
    """Rows ``w0..w1`` of a batch-major window sequence from a per-image ``(nW, ...)`` tensor."""
    nw = per_window.shape[0]
    if w0 // nw == (w1 - 1) // nw:  # within one image: a view
        return per_window[w0 % nw:w0 % nw + (w1 - w0)]
    return per_window.index_select(0, torch.arange(w0, w1, device=per_window.device) % nw)


class PatchMerging(nn.Module):
    """2x2 merge with the official channel order (0,0), (1,0), (0,1), (1,1); odd sizes padded by 1."""

    def __init__(self, dim: int, norm_layer: type = nn.LayerNorm) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""
        b, _, c = x.shape
        # one gather (zero token for odd sizes) -> per output token the 4 neighbours in the official
        # channel order (r0,c0), (r1,c0), (r0,c1), (r1,c1)
        x = gather_rows(F.pad(x, (0, 0, 0, 1)), merge_index(hw[0], hw[1], x.device)).view(b, -1, 4 * c)
        return linear_module(self.reduction, self.norm(x))


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
        x = F.pad(x, (0, p - 1, 0, p - 1))
        if eager_cpu_inference(x):
            # an NHWC conv output: the LayerNorm and the token view that follow need no transposing copy
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinStage(nn.Module):
    """Swin blocks, then the stage's semantic layer, then (except the last stage) patch merging.

    Named ``layers.{i}`` like the official ``BasicLayer``. The SW-MSA mask is built once per input
    size and cached (masks are tiny; relative-position biases are gathered once per block call).
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
        """(nW, 1, N, N) additive mask for an h x w stage map (cached per size and device)."""
        return cached_shifted_window_mask(h, w, self.window_size, self.shift_size, device).unsqueeze(1)

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
    ``(features, priors)``: lists with one NCHW tensor per index in ``out_indices`` (views of the
    token maps, channels-last strides); features of stage i have ``embed_dim * 2**i`` channels at
    stride ``4 * 2**i`` (sizes rounded up), priors have ``num_classes`` channels (raw logits, no
    softmax). With ``semantic_layers=False`` the semantic layers are absent (plain Swin with
    per-output norms) and ``priors`` is empty. Eager CPU inference runs cache-blocked chunks of
    windows and tokens (same values as the whole-tensor path of training, GPUs and export).

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
        out_indices: stages to output (validated; negative indices count from the end).
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
        out_indices: Sequence[int] = (0, 1, 2, 3),
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
        self.out_indices = normalize_out_indices(out_indices, n)
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
        check_image_input(x, self.in_chans)
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
                # NCHW views of the token maps (channels-last strides, as timm's NHWC models return
                # them): no transposing copy, and the decoders' NHWC convs take them as they are
                feats.append(_nchw(getattr(self, f"norm{i}")(out), hw))
                if prior is not None:
                    priors.append(_nchw(prior, hw))
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
# each size (spec section 1.4): T/S/L use W W G G, B uses W W W W.
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


def _create_semask_swin(variant: str, pretrained: bool = False, **kwargs) -> SeMaskSwinTransformer:

    kwargs = {**swin_arch_kwargs(variant), **kwargs}
    model = build_model_with_cfg(
        SeMaskSwinTransformer, variant, pretrained=False,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs,
    )
    if pretrained:
        from ..hub import load_pretrained

        load_pretrained(model, pretrained, cfg=None, name=variant)
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
