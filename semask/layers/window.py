"""Window helpers shared by the Swin blocks and the windowed semantic layers.

All helpers work on channels-last maps ``(B, H, W, C)`` and use only tensor ops on the input's shape,
so they trace with symbolic sizes (torch.export / ONNX with dynamic height and width).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "window_partition", "window_reverse", "shifted_window_mask"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[1], x.shape[2]
    pad_b = (multiple - h % multiple) % multiple
    pad_r = (multiple - w % multiple) % multiple
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * nW, window * window, C)``, windows in batch-major, row-major order."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.transpose(2, 3).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window * window, C)`` -> ``(B, Hp, Wp, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, hp // window, wp // window, window, window, c)
    return x.transpose(2, 3).reshape(-1, hp, wp, c)


def _region_ids(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    # the official slices [0, -w), [-w, -s), [-s, end) on one axis -> region id 0, 1, 2
    pos = torch.arange(size, device=device)
    return (pos >= size - window).long() + (pos >= size - shift).long()


def shifted_window_mask(
    hp: int, wp: int, window: int, shift: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive SW-MSA mask ``(nW, N, N)`` for a padded ``hp x wp`` grid (N = window**2).

    Token pairs from different regions of the shifted grid get -100 (the official value, not -inf),
    so a window that holds a single region attends normally even on maps smaller than the window.
    """
    ids = _region_ids(hp, window, shift, device)[:, None] * 3 + _region_ids(wp, window, shift, device)[None, :]
    ids = window_partition(ids[None, :, :, None], window).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(diff.shape, device=device, dtype=dtype).masked_fill(diff, -100.0)
