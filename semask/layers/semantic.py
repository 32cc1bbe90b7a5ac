"""SeMask's semantic attention: a class-space attention that both predicts a semantic prior map and
re-weights the features with it (Jain et al., SeMask)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .window import tokens_to_windows, window_index, windows_to_tokens

__all__ = ["SemanticAttention", "SemanticLayer", "semantic_attention"]

# Bytes of one query chunk's (chunk, N) attention matrix in :func:`semantic_attention`: global
# attention over N tokens then needs memory linear in N (about this much per chunk), not N x N.
ATTN_CHUNK_BYTES = 64 << 20


def _traced() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def semantic_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_bytes: Optional[int] = None
) -> torch.Tensor:
    """Unscaled ``softmax(q k^T) v`` for (B, N, K) q/k and (B, M, C) v -> (B, N, C).

    On the CPU, softmax is per query row, so the queries go through in chunks whose (chunk, M) score
    matrix stays under ``chunk_bytes`` per image (default :data:`ATTN_CHUNK_BYTES`; exact, memory linear in
    N instead of N x M). 0, or tracing (torch.compile / export / jit, where a size-dependent loop would
    bake in one size), computes the whole matrix at once. Other devices use
    ``F.scaled_dot_product_attention`` (``scale=1``: the same function, fused).
    """
    if q.device.type != "cpu":
        # accelerators: SDPA's fused kernels (memory-efficient attention keeps memory linear in N in
        # training too, where chunks would still save every chunk's scores for the backward pass)
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    n, m = q.shape[1], k.shape[1]
    budget = ATTN_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = n if not budget or _traced() else max(1, budget // max(1, m * q.element_size()))
    if rows >= n:
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
    kt = k.transpose(1, 2)
    out = v.new_empty(q.shape[0], n, v.shape[-1])
    for i in range(0, n, rows):
        out[:, i:i + rows] = torch.bmm(torch.bmm(q[:, i:i + rows], kt).softmax(-1), v)
    return out


class SemanticAttention(nn.Module):
    """Single-head attention in class space.

    ``q, k = Linear(C -> K)(x)``, ``v = Linear(C -> C)(x)``, ``A = softmax(q k^T)`` (unscaled, as in the
    official code: no 1/sqrt(K)), and the output is ``x + gamma * dropout(res(A v))``. ``q`` is returned
    as the semantic prior logits. Works on any token set ``(B, N, C)``.

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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T) v`` (see :func:`semantic_attention`)."""
        if q.dtype == torch.float16:
            # unscaled K-dim logits can exceed fp16's range: run the attention in fp32, with autocast
            # off (under fp16 autocast, bmm would cast the fp32 inputs straight back to fp16)
            with torch.autocast(q.device.type, enabled=False):
                return semantic_attention(q.float(), k.float(), v.float()).to(v.dtype)
        return semantic_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C) -> (prior logits (B, N, K), features (B, N, C))."""
        q, k, v = self.mlp_cls_q(x), self.mlp_cls_k(x), self.mlp_v(x)
        y = self.proj_drop(self.mlp_res(self.attend(q, k, v)))
        return q, x + self.gamma * y


class SemanticLayer(nn.Module):
    """Pre-LayerNorm plus one or more :class:`SemanticAttention` blocks over a token map.

    As in the official code, the stream is *replaced* by its normalised version: the output is
    ``LN(x) + gamma * attn(LN(x))``, not ``x + ...`` (the un-normalised input is dropped). Attention
    runs globally over all tokens or in non-overlapping windows (zero-padded bottom/right to a
    multiple of ``window_size``, no shift; the padded zero tokens are keys no mask hides, as
    officially).

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

    def attend(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The SemanticAttention blocks on (B', N, C) token sets -> (last block's prior, tokens)."""
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
            prior, x = self.attend(x)
            return (prior if with_prior else None), x
        fwd, inv = window_index(hw[0], hw[1], self.window_size, 0, x.device)
        prior, xw = self.attend(tokens_to_windows(x, fwd, self.window_size))
        b = x.shape[0]
        # (without the prior, its un-windowing gather, a (B, H*W, K) map, is skipped)
        return (windows_to_tokens(prior, inv, b) if with_prior else None), windows_to_tokens(xw, inv, b)

    def extra_repr(self) -> str:
        return "global" if self.global_attn else f"windowed, window_size={self.window_size}"
