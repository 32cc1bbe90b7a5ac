"""Optimized subclasses of the model's modules (installed by :func:`semask.optimize`).

Each ``forward`` takes its fast path only in eager fp32 CPU inference with every inner module it
bypasses plain (exactly the expected class, no forward hooks); otherwise it calls the reference
``forward`` of its base class, so training, autograd, GPUs, autocast, export and hooked or wrapped
modules behave exactly as without :func:`~semask.optimize`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from ..backbones.swin import PatchEmbed, PatchMerging, SwinBlock, WindowAttention
from ..decoders.fpn import ConvBNReLU, FPNHead
from ..layers import (
    SemanticAttention, SemanticLayer, merge_index, padded_size, semantic_attention, shifted_window_mask, window_index,
    windows_to_tokens,
)
from ..models.segmentor import SeMaskSegmentor
from . import _tune
from ._kernels import eager_cpu_inference, integer_scales, is_plain, linear, pack_linear_weight, upsample_bilinear
from ._snapshot import snapshots

__all__ = ["OPTIMIZED", "reference_class"]


def _options(module: nn.Module) -> Dict[str, bool]:
    return module.__dict__.get("_accel_options") or {"autotune": True, "pack_weights": True}


def _run(module: nn.Module, key: tuple, reference: Callable, fast: Sequence[Callable]):
    """The reference or one of the fast candidates: measured per shape (autotune) or the first fast one."""
    if not _options(module)["autotune"]:
        return fast[0]()
    return _tune.fastest(key + (torch.get_num_threads(),), [reference, *fast])


def _weight(module: nn.Module, lin: nn.Linear) -> torch.Tensor:
    if not _options(module)["pack_weights"]:
        return lin.weight
    return snapshots(lin).get("packed", [lin.weight], lambda: pack_linear_weight(lin.weight))


def _batched_index(index: torch.Tensor, batch: int, stride: int) -> torch.Tensor:
    # (M,) row index within one image -> (batch * M,) rows of the batch flattened to (batch * stride, C)
    if batch == 1:
        return index
    return (torch.arange(batch, device=index.device)[:, None] * stride + index).reshape(-1)


def _chunks(n: int, item_tokens: int, tokens: int) -> List[Tuple[int, int]]:
    step = max(1, tokens // item_tokens)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _sizes(base: int, tokens: int) -> List[int]:
    # candidate chunk sizes: one from the L2 size, and 4x that where the input holds more than one chunk
    return [base, 4 * base] if tokens > base else [base]


class OptimizedSwinBlock(SwinBlock):
    """Cache-blocked Swin block: windows, then tokens, of the whole batch go through in chunks sized
    from the L2 cache (window q/k/v and the 4C-wide MLP hidden stay in cache), with fused oneDNN
    matmuls (bias + GELU, bias + residual) on pre-packed weights and the relative-position bias plus
    shift mask built once per input size."""

    def _plain(self) -> bool:
        attn, mlp = self.attn, self.mlp
        return (is_plain(self.norm1, nn.LayerNorm) and is_plain(self.norm2, nn.LayerNorm)
                and is_plain(attn, WindowAttention) and is_plain(attn.qkv, nn.Linear) and is_plain(attn.proj, nn.Linear)
                and is_plain(attn.proj_drop, nn.Dropout) and is_plain(mlp, Mlp) and is_plain(mlp.fc1, nn.Linear)
                and is_plain(mlp.fc2, nn.Linear) and is_plain(mlp.act, nn.GELU) and is_plain(mlp.norm, nn.Identity)
                and is_plain(mlp.drop1, nn.Dropout) and is_plain(mlp.drop2, nn.Dropout)
                and (is_plain(self.drop_path, nn.Identity) or is_plain(self.drop_path, DropPath)))

    def forward(self, x, hw, mask=None, index=None):
        if self.training or index is None or not eager_cpu_inference(x) or not self._plain():
            return SwinBlock.forward(self, x, hw, mask, index)
        c = x.shape[-1]
        base = _tune.token_chunk(4 * (6 * c + 4 * c))  # normed, q/k/v, attention out, MLP hidden
        key = ("swin_block", tuple(x.shape), tuple(hw), self.window_size, self.shift_size, self.attn.num_heads)
        return _run(self, key, lambda: SwinBlock.forward(self, x, hw, mask, index),
                    [lambda t=t: self._chunked(x, hw, index, t) for t in _sizes(base, x.shape[0] * x.shape[1])])

    def _bias(self, hw: Sequence[int]) -> torch.Tensor:
        # relative-position bias (+ shift mask): (nW, h, N, N), or (1, h, N, N) unshifted
        attn, ws, s = self.attn, self.window_size, self.shift_size

        def build() -> torch.Tensor:
            bias = attn.relative_position_bias().unsqueeze(0)
            if not s:
                return bias.contiguous()
            mask = shifted_window_mask(padded_size(hw[0], ws), padded_size(hw[1], ws), ws, s, bias.device)
            return bias + mask.unsqueeze(1)

        return snapshots(self).get(("bias", tuple(hw) if s else None), [attn.relative_position_bias_table], build)

    def _attend(self, xw: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        w, n, c = xw.shape
        h = attn.num_heads
        qkv = linear(xw, _weight(self, attn.qkv), attn.qkv.bias)
        q, k, v = qkv.view(w, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        # batched matmul-softmax on window chunks (the per-head copies stay in cache)
        out = torch.matmul((torch.matmul(q * attn.scale, k.transpose(-2, -1)) + bias).softmax(-1), v)
        return out.transpose(1, 2)  # (w, n, h, d)

    def _chunked(self, x: torch.Tensor, hw: Sequence[int], index, tokens: int) -> torch.Tensor:
        fwd, inv = index
        b, length, c = x.shape
        n = self.window_size ** 2
        nw = fwd.shape[0] // n
        attn, mlp = self.attn, self.mlp
        bias = self._bias(hw)
        # + the zero token that padded positions read, per image; batch flattened into rows
        xn = F.pad(self.norm1(x), (0, 0, 0, 1)).view(-1, c)
        rows = _batched_index(fwd, b, length + 1)
        y = x.new_empty(b * nw, n, attn.num_heads, c // attn.num_heads)
        for w0, w1 in _chunks(b * nw, n, tokens):
            xw = xn.index_select(0, rows[w0 * n:w1 * n]).view(w1 - w0, n, c)
            y[w0:w1] = self._attend(xw, bias if bias.shape[0] == 1 else _windows_of(bias, w0, w1))
        # un-window before the output projection: padded tokens are never projected
        y = y.view(-1, c)
        rows = _batched_index(inv, b, nw * n)
        x = x.reshape(-1, c)
        out = torch.empty_like(x)
        for t0, t1 in _chunks(b * length, 1, tokens):
            xc = linear(y.index_select(0, rows[t0:t1]), _weight(self, attn.proj), attn.proj.bias, residual=x[t0:t1])
            hidden = linear(self.norm2(xc), _weight(self, mlp.fc1), mlp.fc1.bias, gelu=mlp.act.approximate)
            out[t0:t1] = linear(hidden, _weight(self, mlp.fc2), mlp.fc2.bias, residual=xc)
        return out.view(b, length, c)


def _windows_of(per_window: torch.Tensor, w0: int, w1: int) -> torch.Tensor:
    """Rows ``w0..w1`` of a batch-major window sequence from a per-image ``(nW, ...)`` tensor."""
    nw = per_window.shape[0]
    if w0 // nw == (w1 - 1) // nw:  # within one image: a view
        return per_window[w0 % nw:w0 % nw + (w1 - w0)]
    return per_window.index_select(0, torch.arange(w0, w1, device=per_window.device) % nw)


class OptimizedPatchMerging(PatchMerging):
    """Patch merging with a row gather over the flattened batch and a packed-weight matmul."""

    def forward(self, x, hw):
        if not eager_cpu_inference(x) or not (is_plain(self.norm, nn.LayerNorm) and is_plain(self.reduction, nn.Linear)):
            return PatchMerging.forward(self, x, hw)
        b, length, c = x.shape
        rows = _batched_index(merge_index(hw[0], hw[1], x.device), b, length + 1)
        x = F.pad(x, (0, 0, 0, 1)).reshape(-1, c).index_select(0, rows).view(b, -1, 4 * c)
        return linear(self.norm(x), _weight(self, self.reduction), self.reduction.bias)


class OptimizedPatchEmbed(PatchEmbed):
    """Patch embedding with an NHWC conv output (the LayerNorm and token view need no transposing copy)."""

    def forward(self, x):
        if not eager_cpu_inference(x):
            return PatchEmbed.forward(self, x)
        return PatchEmbed.forward(self, x.contiguous(memory_format=torch.channels_last))


class OptimizedSemanticAttention(SemanticAttention):
    """One GEMM for q, k and v (width padded with zero rows to a multiple of 16: oneDNN/MKL run much
    slower on widths such as 2K + C = 396 than on 400), gamma folded into ``mlp_res`` and the residual
    add fused into its matmul."""

    def _plain(self) -> bool:
        lins = (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v, self.mlp_res)
        return all(is_plain(m, nn.Linear) and m.bias is not None for m in lins) and is_plain(self.proj_drop, nn.Dropout)

    def _fused(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lins = (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v)
        res = self.mlp_res
        pack = _options(self)["pack_weights"]

        def build():
            w = torch.cat([m.weight for m in lins])
            b = torch.cat([m.bias for m in lins])
            pad = -w.shape[0] % 16
            w, b = F.pad(w, (0, 0, 0, pad)), F.pad(b, (0, pad))
            rw, rb = res.weight * self.gamma, res.bias * self.gamma
            if pack:
                w, rw = pack_linear_weight(w), pack_linear_weight(rw)
            return w, b, rw, rb

        sources = [t for m in (*lins, res) for t in (m.weight, m.bias)] + [self.gamma]
        return snapshots(self).get(("fused", pack), sources, build)

    def forward(self, x):
        if self.training or not eager_cpu_inference(x) or not self._plain():
            return SemanticAttention.forward(self, x)
        key = ("semantic_attention", tuple(x.shape), self.num_classes)
        return _run(self, key, lambda: SemanticAttention.forward(self, x), [lambda: self._fast(x)])

    def _fast(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        w, b, rw, rb = self._fused()
        k, c = self.mlp_cls_q.out_features, self.mlp_v.out_features
        qkv = linear(x, w, b)
        q, kk, v = qkv[..., :k], qkv[..., k:2 * k], qkv[..., 2 * k:2 * k + c]
        return q, linear(semantic_attention(q, kk, v), rw, rb, residual=x)


class OptimizedSemanticLayer(SemanticLayer):
    """Windowed semantic layer whose windows go through in L2-sized chunks."""

    def forward(self, x, hw, with_prior=True):
        if self.global_attn or self.training or not eager_cpu_inference(x) or not (
                is_plain(self.norm1, nn.LayerNorm) and is_plain(self.class_injection, nn.ModuleList)):
            return SemanticLayer.forward(self, x, hw, with_prior)
        # the same blocks on cache-sized chunks of windows (the blocks themselves are measured against
        # the reference, so this level is not: nested measurements would time undecided inner calls)
        c = x.shape[-1]
        return self._chunked(x, hw, with_prior, _tune.token_chunk(4 * (3 * c + 2 * self.num_classes + 16), scale=2))

    def _chunked(self, x, hw, with_prior: bool, tokens: int):
        x = self.norm1(x)
        b, length, c = x.shape
        n = self.window_size ** 2
        fwd, inv = window_index(hw[0], hw[1], self.window_size, 0, x.device)
        nw = fwd.shape[0] // n
        xf = F.pad(x, (0, 0, 0, 1)).view(-1, c)  # + the zero token that padded positions read, per image
        rows = _batched_index(fwd, b, length + 1)
        prior = x.new_empty(b * nw, n, self.num_classes) if with_prior else None
        out = x.new_empty(b * nw, n, c)
        for w0, w1 in _chunks(b * nw, n, tokens):
            p, out[w0:w1] = self.attend(xf.index_select(0, rows[w0 * n:w1 * n]).view(w1 - w0, n, c))
            if prior is not None:
                prior[w0:w1] = p
        out = windows_to_tokens(out, inv, b)
        return (windows_to_tokens(prior, inv, b) if with_prior else None), out


class OptimizedConvBNReLU(ConvBNReLU):
    """Conv-BN-ReLU with the BatchNorm folded into the conv (one pass less over the map) and an NHWC
    weight, so oneDNN keeps the maps NHWC end to end."""

    def _plain(self) -> bool:
        bn = self.bn
        return (is_plain(self.conv, nn.Conv2d) and is_plain(bn, nn.BatchNorm2d) and bn.track_running_stats
                and bn.running_mean is not None and is_plain(self.act, nn.ReLU))

    def forward(self, x):
        if self.training or not eager_cpu_inference(x) or not self._plain():
            return ConvBNReLU.forward(self, x)
        key = ("conv_bn_relu", tuple(x.shape), x.is_contiguous(), self.conv.out_channels)
        return _run(self, key, lambda: ConvBNReLU.forward(self, x), [lambda: self._folded(x)])

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn

        def build():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            w = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
            return w, bn.bias - bn.running_mean * scale

        w, b = snapshots(self).get("folded", [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var], build)
        x = x.contiguous(memory_format=torch.channels_last)
        return F.relu(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups), inplace=True)


def _resize(x: torch.Tensor, size: Sequence[int], key: tuple, module: nn.Module) -> torch.Tensor:
    """Bilinear (align_corners False) resize: identity at the same size; integer factors measured
    between ``F.interpolate`` and the separable kernel with channel groups sized from the L2 cache."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if integer_scales(x, size) is None or not x.numel():
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    g = max(1, _tune.cache_bytes(2) // max(1, (x.shape[-2] + 2) * size[1] * x.element_size()))
    return _run(module, key + (tuple(x.shape), x.is_contiguous(), size),
                lambda: F.interpolate(x, size=size, mode="bilinear", align_corners=False),
                [lambda g=g: upsample_bilinear(x, size, g), lambda: upsample_bilinear(x, size, 4 * g)])


class OptimizedFPNHead(FPNHead):
    """FPN head: levels of equal size before their final x2 upsampling summed first and upsampled
    once (interpolation is linear), sums in place, identity resizes skipped, and an NHWC classifier
    with the class dim zero-padded to a multiple of 16 (oneDNN runs K = 150 much slower than 160)."""

    def _plain(self) -> bool:
        return (is_plain(self.conv_seg, nn.Conv2d) and self.conv_seg.kernel_size == (1, 1)
                and all(is_plain(h, nn.Sequential) and all(is_plain(m, nn.Upsample) for m in h
                                                           if isinstance(m, nn.Upsample)) for h in self.scale_heads))

    def forward(self, features):
        if self.training or not features or not eager_cpu_inference(features[0]) or not self._plain():
            return FPNHead.forward(self, features)
        # (not measured against the reference as a whole: its convs are, and the rest does less work)
        out = self.scale_heads[0](features[0])
        size = out.shape[-2:]
        pending: dict = {}
        for head, f in zip(self.scale_heads[1:], features[1:]):
            up = isinstance(head[-1], nn.Upsample) and head[-1].scale_factor == 2.0 and head[-1].mode == "bilinear" \
                and not head[-1].align_corners
            y = head[:-1](f) if up else head(f)
            k = (up, tuple(y.shape))
            pending[k] = pending[k].add_(y) if k in pending else y
        for (up, _), y in pending.items():
            if up:
                y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
            out.add_(_resize(y, size, ("fpn_level",), self))
        conv = self.conv_seg
        k = conv.out_channels
        pad = -k % 16
        w, b = snapshots(self).get(
            "classifier", [conv.weight] + ([conv.bias] if conv.bias is not None else []),
            lambda: (F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, pad)).contiguous(memory_format=torch.channels_last),
                     None if conv.bias is None else F.pad(conv.bias, (0, pad))))
        x = self.dropout(out).contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, b)[:, :k].contiguous()


class OptimizedSeMaskSegmentor(SeMaskSegmentor):
    """Segmentor whose final resize to the image runs the separable kernel (where measured faster)."""

    def forward(self, images, labels=None, return_logits=False):
        if labels is not None or not eager_cpu_inference(images) or self.align_corners:
            return SeMaskSegmentor.forward(self, images, labels, return_logits)
        return _resize(self.decode_head(self._features(images)), images.shape[-2:], ("logits",), self)


# reference class -> optimized subclass
OPTIMIZED: Dict[type, type] = {
    SwinBlock: OptimizedSwinBlock,
    PatchMerging: OptimizedPatchMerging,
    PatchEmbed: OptimizedPatchEmbed,
    SemanticAttention: OptimizedSemanticAttention,
    SemanticLayer: OptimizedSemanticLayer,
    ConvBNReLU: OptimizedConvBNReLU,
    FPNHead: OptimizedFPNHead,
    SeMaskSegmentor: OptimizedSeMaskSegmentor,
}
_REFERENCE = {v: k for k, v in OPTIMIZED.items()}


def reference_class(cls: type) -> Optional[type]:
    """The reference class of an optimized subclass (None for any other class)."""
    return _REFERENCE.get(cls)
