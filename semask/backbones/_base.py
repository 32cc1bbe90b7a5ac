"""Input and ``out_indices`` validation shared by every SeMask backbone."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..layers import SemanticLayer

__all__ = ["SemanticFeaturesMixin", "check_image_input", "normalize_out_indices", "per_stage_flags", "per_stage_ints"]


def check_image_input(x: torch.Tensor, in_chans: int, weight_dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ValueError saying what to do unless x is a non-empty float (B, in_chans, H, W) tensor
    (of ``weight_dtype``, the model's parameter dtype, when given; autocast may also run fp32 / fp16 /
    bf16 input in its compute dtype)."""
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
    if x.shape[0] == 0:
        raise ValueError(f"got an empty batch (shape {tuple(x.shape)}): pass at least one image")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"got images of size {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)}): height and "
                         "width must be at least 1 pixel")
    if weight_dtype is not None and x.dtype != weight_dtype:
        # autocast casts fp32 / fp16 / bf16 inputs of convs and matmuls to its dtype (float64 never)
        autocast = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
        if not autocast:
            raise ValueError(
                f"the input is {x.dtype} but the model's weights are {weight_dtype}: cast the input with "
                f"x.to({weight_dtype}) (numpy arrays are float64 by default), or the model with "
                f"model.to({x.dtype}), or run under torch.autocast"
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


def per_stage_flags(value: Union[bool, Sequence[bool]], n: int, name: str) -> Tuple[bool, ...]:
    """A bool for every stage, or one per stage (validated)."""
    flags = (bool(value),) * n if isinstance(value, bool) else tuple(bool(v) for v in value)
    if len(flags) != n:
        raise ValueError(f"{name} needs one entry per stage ({n} stages), got {len(flags)}")
    return flags


def per_stage_ints(value: Union[int, Sequence[int]], n: int, name: str) -> Tuple[int, ...]:
    """An int for every stage, or one per stage (validated)."""
    values = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per stage ({n} stages), got {len(values)}")
    return values


class SemanticFeaturesMixin:
    """timm feature API and class reset shared by SeMask backbones with ``out_indices`` and ``forward(x)
    -> (features, priors)``: ``forward_intermediates`` (used by ``features_only=True`` and smp's ``tu-``
    encoders) and ``reset_classes``."""

    out_indices: Tuple[int, ...]
    num_classes: int

    @property
    def num_stages(self) -> int:
        return len(self.stages)  # type: ignore[attr-defined]

    def reset_classes(self, num_classes: int) -> None:
        """Re-initialise only the class-dependent tensors (semantic q/k projections) for K classes."""
        self.num_classes = num_classes
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, SemanticLayer):
                m.num_classes = num_classes
                for blk in m.class_injection:
                    blk.reset_num_classes(num_classes)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: NCHW features of the requested stages (priors are dropped)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        n = self.num_stages
        if indices is None:
            wanted: Sequence[int] = self.out_indices
        elif isinstance(indices, int):
            wanted = list(range(n - indices, n))
        else:
            wanted = normalize_out_indices(indices, n)
        missing = [i for i in wanted if i not in self.out_indices]
        if missing:
            raise ValueError(f"stages {missing} are not in out_indices {self.out_indices}")
        feats, _ = self(x)  # type: ignore[operator]
        picked = [feats[self.out_indices.index(i)] for i in wanted]
        return picked if intermediates_only else (feats[-1], picked)
