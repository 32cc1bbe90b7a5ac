"""SeMask's semantic attention: a class-space attention that both predicts a semantic prior map and
re-weights the features with it (Jain et al., SeMask, spec section 1.4)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ._derived import derived_tensor
from .cpu import is_plain, linear
from .window import batched_index, eager_cpu_inference, token_chunks, tokens_to_windows, window_index, windows_to_tokens

__all__ = ["SemanticAttention", "SemanticLayer"]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unscaled ``softmax(q k^T) v`` for (B, N, K) q/k and (B, N, C) v."""
    if q.device.type == "cpu":
        # q/k width K != v width C sends CPU SDPA to its generic math path; two bmm + softmax is
        # the same computation with less overhead (about 1.5x faster at SeMask sizes)
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
    # fused kernels on accelerators (memory-efficient for large global maps)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


class SemanticAttention(nn.Module):
    """Single-head attention in class space.

    ``q, k = Linear(C -> K)(x)``, ``v = Linear(C -> C)(x)``, ``A = softmax(q k^T)`` (unscaled, as in the
    official code), and the output is ``x + gamma * dropout(res(A v))``. ``q`` is returned as the
    semantic prior logits. Works on any token set ``(B, N, C)``.

    Args:
        dim: token channels C.
        num_classes: classes K (width of q and k).
        proj_drop: dropout on the residual branch (0.1, hard-coded in the official code).
    """

    def __init__(self, dim: int, num_classes: int, proj_drop: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # gamma = 0 at init: the block starts as the identity on the (normalised) stream
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official (mmseg) init: trunc_normal(0.02) Linears with zero bias, gamma 0."""
        for lin in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v, self.mlp_res):
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.gamma)

    def reset_num_classes(self, num_classes: int) -> None:
        """Replace q/k by freshly initialised ``Linear(C -> num_classes)`` (v, res and gamma are kept)."""
        w = self.mlp_cls_q.weight
        self.num_classes = num_classes
        for name in ("mlp_cls_q", "mlp_cls_k"):
            lin = nn.Linear(self.dim, num_classes).to(w.device, w.dtype)
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
            setattr(self, name, lin)

    def _fused_qkv(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # one GEMM for the three projections, its width padded with zero rows to a multiple of 16:
        # oneDNN/MKL run 2-3x slower on widths like 2K + C = 396 (K = 150) than on 400
        lins = (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v)

        def build() -> Tuple[torch.Tensor, torch.Tensor]:
            w = torch.cat([m.weight for m in lins])
            b = torch.cat([m.bias for m in lins])
            pad = -w.shape[0] % 16
            return F.pad(w, (0, 0, 0, pad)), F.pad(b, (0, pad))

        return derived_tensor(self, "qkv", [p for m in lins for p in (m.weight, m.bias)], build)

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lins = (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v)
        if torch.compiler.is_exporting() or not all(type(m) is nn.Linear and m.bias is not None for m in lins):
            # export: contiguous outputs (slices of a fused output would make later reshapes guard on
            # batch == 1); wrapped / replaced projections: call them
            return lins[0](x), lins[1](x), lins[2](x)
        k, c = self.mlp_cls_q.out_features, self.mlp_v.out_features
        qkv = linear(x, *self._fused_qkv())
        return qkv[..., :k], qkv[..., k:2 * k], qkv[..., 2 * k:2 * k + c]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C) -> (prior logits (B, N, K), features (B, N, C))."""
        q, k, v = self._qkv(x)
        if q.dtype == torch.float16:
            # unscaled K-dim logits can exceed fp16's range: run the attention in fp32, with autocast
            # off (under fp16 autocast, bmm/SDPA would cast the fp32 inputs straight back to fp16)
            with torch.autocast(q.device.type, enabled=False):
                attn = _attention(q.float(), k.float(), v.float()).to(v.dtype)
        else:
            attn = _attention(q, k, v)
        if not self.training and eager_cpu_inference(x) and is_plain(self.mlp_res, nn.Linear):
            # CPU inference: gamma folded into mlp_res, the residual add fused into its matmul
            return q, linear(attn, *self._scaled_res(), residual=x)
        y = self.proj_drop(self.mlp_res(attn))
        return q, x + self.gamma * y

    def _scaled_res(self) -> Tuple[torch.Tensor, torch.Tensor]:
        lin = self.mlp_res
        return derived_tensor(self, "res", [lin.weight, lin.bias, self.gamma],
                              lambda: (lin.weight * self.gamma, lin.bias * self.gamma))


class SemanticLayer(nn.Module):
    """Pre-LayerNorm plus one or more :class:`SemanticAttention` blocks over a token map.

    The stream is *replaced* by its normalised version (official quirk Q1): the output is
    ``LN(x) + gamma * attn(LN(x))``. Attention runs globally over all tokens or in non-overlapping
    windows (zero-padded bottom/right to a multiple of ``window_size``, no shift, padded tokens are
    unmasked keys).

    Args:
        dim: channels C.
        num_classes: classes K.
        window_size: semantic window (ignored when ``global_attn``).
        global_attn: attend over the whole map instead of windows.
        num_blocks: number of stacked SemanticAttention blocks (1 in every official config).
        proj_drop: dropout of the attention residual.
        norm_layer: the pre-norm.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        window_size: int = 7,
        global_attn: bool = False,
        num_blocks: int = 1,
        proj_drop: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"SemanticLayer needs num_blocks >= 1, got {num_blocks}")
        self.window_size = window_size
        self.global_attn = global_attn
        self.num_classes = num_classes
        self.norm1 = norm_layer(dim)
        self.class_injection = nn.ModuleList(
            [SemanticAttention(dim, num_classes, proj_drop) for _ in range(num_blocks)]
        )

    def _attend(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        prior = x
        for blk in self.class_injection:
            prior, x = blk(x)
        return prior, x

    def forward(
        self, x: torch.Tensor, hw: Sequence[int], with_prior: bool = True
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """x: (B, H*W, C) tokens of an H x W map -> (prior logits (B, H*W, K), or None without
        ``with_prior``; tokens (B, H*W, C))."""
        x = self.norm1(x)
        if self.global_attn:
            prior, x = self._attend(x)
            return (prior if with_prior else None), x
        b = x.shape[0]
        fwd, inv = window_index(hw[0], hw[1], self.window_size, 0, x.device)
        if not self.training and eager_cpu_inference(x):
            prior, xw = self._attend_chunked(x, fwd, with_prior)
        else:
            prior, xw = self._attend(tokens_to_windows(x, fwd, self.window_size))
        # (no prior: its un-windowing gather, a (B, H*W, K) map, is skipped)
        return (windows_to_tokens(prior, inv, b) if with_prior else None), windows_to_tokens(xw, inv, b)

    def _attend_chunked(
        self, x: torch.Tensor, fwd: torch.Tensor, with_prior: bool = True
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        # CPU inference: the windows go through in cache-sized chunks (their (n, 2K + C) q/k/v never
        # reach DRAM); same values as the whole-tensor path
        b, length, c = x.shape
        n = self.window_size ** 2
        nw = fwd.shape[0] // n
        x = F.pad(x, (0, 0, 0, 1)).view(-1, c)  # + the zero token that padded positions read, per image
        rows = batched_index(fwd, b, length + 1)
        prior = x.new_empty(b * nw, n, self.num_classes) if with_prior else None
        out = x.new_empty(b * nw, n, c)
        for w0, w1 in token_chunks(b * nw, n):
            p, out[w0:w1] = self._attend(x.index_select(0, rows[w0 * n:w1 * n]).view(w1 - w0, n, c))
            if prior is not None:
                prior[w0:w1] = p
        return (None if prior is None else prior.view(b, nw * n, -1)), out.view(b, nw * n, c)

    def extra_repr(self) -> str:
        return "global" if self.global_attn else f"windowed, window_size={self.window_size}"
