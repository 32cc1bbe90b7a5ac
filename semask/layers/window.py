"""Window helpers shared by the Swin blocks and the windowed semantic layers.

Two families:

* map helpers on channels-last maps ``(B, H, W, C)``: :func:`pad_to_multiple`,
  :func:`window_partition`, :func:`window_reverse` (plain einops re-arrangements);
* token gathers used by the models: :func:`window_index` builds, with integer arithmetic on
  ``arange``, the indices that take a ``(B, H*W, C)`` token map straight to zero-padded, cyclically
  shifted windows (:func:`tokens_to_windows`) and back (:func:`windows_to_tokens`). One gather does
  pad + roll + partition (and one gather reverse + roll + crop) with no shape-dependent Python
  branches or reshapes, so torch.export / ONNX / torch.compile trace them with symbolic batch,
  height and width.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "pad_to_multiple",
    "padded_size",
    "window_partition",
    "window_reverse",
    "shifted_window_mask",
    "window_index",
    "merge_index",
    "tokens_to_windows",
    "windows_to_tokens",
]

Size = Union[int, torch.SymInt]
Device = Union[str, torch.device, None]


def padded_size(size: Size, multiple: int) -> Size:
    """Smallest multiple of ``multiple`` >= ``size`` (works on ints and symbolic sizes)."""
    return (size + multiple - 1) // multiple * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[1], x.shape[2]
    return F.pad(x, (0, 0, 0, padded_size(w, multiple) - w, 0, padded_size(h, multiple) - h))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * nW, window * window, C)``, windows in batch-major, row-major order."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window, ww=window)


def window_reverse(windows: torch.Tensor, window: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window * window, C)`` -> ``(B, Hp, Wp, C)``."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                     nh=hp // window, nw=wp // window, wh=window)


def _mod(a: torch.Tensor, b: Size) -> torch.Tensor:
    # Python-style ``a % b``; spelled with floor division because a tensor % symbolic-size has no
    # ONNX translation (aten.remainder.Scalar needs a constant)
    return a - (a // b) * b


def _window_coords(
    hp: Size, wp: Size, window: int, device: Device, per_window: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    # (row, col) on the padded hp x wp grid of every token in window order (window-major, row-major
    # inside a window), by arithmetic on aranges: no reshape of a symbolic size (each would make
    # torch.export guard on the window count being 1). Flat (nW*N,), or (nW, N) with per_window.
    n = window * window
    if per_window:
        win = torch.arange((hp // window) * (wp // window), device=device)[:, None]
        tok = torch.arange(n, device=device)[None, :]
    else:
        j = torch.arange(hp * wp, device=device)
        win, tok = j // n, j % n
    nww = wp // window
    return (win // nww) * window + tok // window, _mod(win, nww) * window + tok % window


def _region_ids(pos: torch.Tensor, size: Size, window: int, shift: int) -> torch.Tensor:
    # the shifted grid's three bands on one axis, [0, size - window), [size - window, size - shift)
    # and [size - shift, size) -> region id 0, 1, 2
    return (pos >= size - window).long() + (pos >= size - shift).long()


def shifted_window_mask(
    hp: Size, wp: Size, window: int, shift: int, device: Device = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive SW-MSA mask ``(nW, N, N)`` for a padded ``hp x wp`` grid (N = window**2).

    Token pairs from different regions of the shifted grid get -100 (the official value, not -inf).
    The official code applies it to every shifted block, even when the map is no larger than the
    window (where timm turns the shift off): a window then still holds several regions, and checkpoint
    parity needs exactly that.
    """
    r, c = _window_coords(hp, wp, window, device, per_window=True)
    ids = _region_ids(r, hp, window, shift) * 3 + _region_ids(c, wp, window, shift)  # (nW, N)
    return (ids[:, None, :] != ids[:, :, None]).to(dtype) * -100.0


def window_index(h: Size, w: Size, window: int, shift: int = 0, device: Device = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather indices between an ``h x w`` token map and its padded, shifted windows.

    Returns ``(fwd, inv)``: ``fwd`` (nW * window**2,) indexes the tokens extended by one zero token at
    position ``h * w`` (padding), in window order after a cyclic shift by ``-shift`` of the padded
    grid (``torch.roll(x, -shift)`` of the official code, applied after zero-padding); ``inv``
    (h * w,) gives each token's position in that window order.
    """
    hp, wp = padded_size(h, window), padded_size(w, window)
    r, c = _window_coords(hp, wp, window, device)
    r, c = _mod(r + shift, hp), _mod(c + shift, wp)  # rolled[i] = padded[(i + shift) % hp]
    fwd = torch.where((r < h) & (c < w), r * w + c, h * w)
    # where token row i lands in the rolled grid: (i - shift) mod hp, with a non-negative dividend
    # (the classic ONNX exporter's integer division truncates instead of flooring)
    i = _mod(torch.arange(h, device=device) + (hp - shift), hp)
    j = _mod(torch.arange(w, device=device) + (wp - shift), wp)
    n, nww = window * window, wp // window
    inv = ((i // window)[:, None] * nww + (j // window)[None, :]) * n + (
        (i % window)[:, None] * window + (j % window)[None, :])
    return fwd, inv.reshape(-1)


def merge_index(h: Size, w: Size, device: Device = None) -> torch.Tensor:
    """Gather index of Swin's 2x2 patch merging: ``(ceil(h/2) * ceil(w/2) * 4,)`` positions in the
    tokens extended by one zero token (odd sizes), sub-positions ordered (0,0), (1,0), (0,1), (1,1)."""
    wh = (w + 1) // 2
    j = torch.arange(((h + 1) // 2) * wh * 4, device=device)
    t, k = j // 4, j % 4
    r, c = (t // wh) * 2 + k % 2, _mod(t, wh) * 2 + k // 2
    return torch.where((r < h) & (c < w), r * w + c, h * w)


def tokens_to_windows(x: torch.Tensor, fwd: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H*W, C)`` tokens -> ``(B * nW, window**2, C)`` zero-padded (shifted) windows, one gather."""
    x = F.pad(x, (0, 0, 0, 1))  # the zero token that padded positions read
    return x.index_select(1, fwd).view(-1, window * window, x.shape[-1])


def windows_to_tokens(windows: torch.Tensor, inv: torch.Tensor, batch: Size) -> torch.Tensor:
    """``(B * nW, N, C)`` windows -> ``(B, H*W, C)`` tokens (undoes shift and padding), one gather."""
    return windows.reshape(batch, -1, windows.shape[-1]).index_select(1, inv)
