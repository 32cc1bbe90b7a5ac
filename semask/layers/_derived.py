"""Inference cache for tensors derived from parameters (fused or re-laid-out weights)."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
import torch.nn as nn

from .window import is_traced

T = TypeVar("T")


def derived_tensor(owner: nn.Module, name: str, sources: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """``build()``, cached on ``owner`` while autograd is off (inference), rebuilt whenever a source
    tensor is replaced, moved, cast or changed in place (its version counter moves). With autograd on,
    or under torch.compile / export / jit tracing, it is built on every call so gradients flow and the
    ops enter the graph."""
    if torch.is_grad_enabled() or is_traced():
        return build()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride()) for t in sources)
    cached = owner.__dict__.get("_derived_" + name)
    # the sources are held with the value, so their memory stays allocated: a tensor matching the key
    # is the same memory (the same tensor, or a fresh view of it, e.g. a cached mask's unsqueeze), and
    # views share the version counter that in-place changes move
    if cached is not None and cached[0] == key:
        return cached[2]
    value = build()
    owner.__dict__["_derived_" + name] = (key, tuple(sources), value)
    return value
