"""Input and ``out_indices`` validation shared by every SeMask backbone."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["check_image_input", "normalize_out_indices"]


def check_image_input(x: torch.Tensor, in_chans: int) -> None:
    """Raise a ValueError naming the expected layout unless x is a float (B, in_chans, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D image batch of shape (B, {in_chans}, H, W), got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (B, {in_chans}, H, W), got shape {tuple(x.shape)}; "
            f"channels-last input needs x.permute(0, 3, 1, 2), other channel counts need in_chans={x.shape[1]}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"expected a floating-point image tensor, got dtype {x.dtype}; convert with x.float() and "
            "normalise it (e.g. semask.predict does this for uint8 images)"
        )


def normalize_out_indices(out_indices: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    """Validate stage indices (negative ones count from the end) and return them sorted, unique."""
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    out = []
    for i in out_indices:
        if not isinstance(i, int) or not -num_stages <= i < num_stages:
            raise ValueError(f"out_indices {tuple(out_indices)} must hold stage indices in [0, {num_stages})")
        out.append(i % num_stages)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"out_indices {tuple(out_indices)} must be non-empty and without duplicates")
    return tuple(sorted(out))
