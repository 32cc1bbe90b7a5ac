"""Bilinear resizing by an integer factor, a slab of output rows at a time (for outputs too large to
keep whole: full-resolution logits of a training loss, per-query masks)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["resize_rows", "row_slabs"]


def resize_rows(x: torch.Tensor, r0: int, r1: int, scale: int, width: int) -> torch.Tensor:
    """Output rows ``r0 * scale .. r1 * scale`` of ``F.interpolate(x, size=(H * scale, width),
    mode="bilinear", align_corners=False)`` for (B, C, H, W) ``x``, computed from input rows
    ``r0 - 1 .. r1 + 1`` only: (B, C, (r1 - r0) * scale, width).

    With an integer factor and align_corners False the resize commutes with whole-row shifts, so a
    slab resized with one row of context on each side gives exactly the rows of resizing the whole map
    (the border clamp applies where the slab touches the map's border).
    """
    lo, hi = max(r0 - 1, 0), min(r1 + 1, x.shape[2])
    y = F.interpolate(x[:, :, lo:hi], size=((hi - lo) * scale, width), mode="bilinear", align_corners=False)
    off = (r0 - lo) * scale
    return y[:, :, off:off + (r1 - r0) * scale]


def row_slabs(rows: int, row_bytes: int, budget: int) -> Tuple[Tuple[int, int], ...]:
    """``(r0, r1)`` ranges over ``rows`` input rows such that a slab's output (``row_bytes`` per input
    row) stays within ``budget`` bytes and within 1/8 of the whole output (at least one row each)."""
    step = max(1, min(budget, row_bytes * rows // 8) // max(1, row_bytes))
    return tuple((r, min(r + step, rows)) for r in range(0, rows, step))
