"""Inference caches for tensors derived from parameters (fused or re-laid-out weights).

The values live here, keyed by the identity of the object they belong to (held weakly: dropped with
it), not on the modules or tensors themselves: copies and pickles of a model never carry them, and
values that cannot be pickled (oneDNN's packed weights) are fine.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

from .window import is_traced

T = TypeVar("T")

# (id(anchor), name) -> (weak reference to anchor, key of the sources, sources, value)
_CACHE: Dict[Tuple[int, str], Tuple[weakref.ref, tuple, tuple, Any]] = {}


def _key(t: torch.Tensor) -> tuple:
    # the same memory with the same contents: a moved, cast or replaced tensor changes the pointer,
    # an in-place change (optimizer step, load_state_dict) moves the version counter (inference tensors
    # have none: only our own derived weights get here, never changed in place)
    return t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device, t.shape, t.stride()


def _cached(anchor: Any, name: str, sources: Sequence[torch.Tensor], held: tuple, build: Callable[[], T]) -> T:
    if any(t.is_inference() and isinstance(t, nn.Parameter) for t in sources):
        # parameters of a model built under inference_mode: an in-place reload would go unnoticed
        return build()
    slot = (id(anchor), name)
    key = tuple(_key(t) for t in sources)
    entry = _CACHE.get(slot)
    if entry is not None and entry[0]() is anchor and entry[1] == key:
        return entry[3]
    value = build()

    def drop(ref: weakref.ref) -> None:
        current = _CACHE.get(slot)
        if current is not None and current[0] is ref:  # not the entry of a newer object with that id
            del _CACHE[slot]

    _CACHE[slot] = (weakref.ref(anchor, drop), key, held, value)
    return value


def derived_tensor(owner: nn.Module, name: str, sources: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """``build()``, cached for ``owner`` while autograd is off (inference), rebuilt whenever a source
    tensor is replaced, moved, cast or changed in place (its version counter moves). With autograd on,
    or under torch.compile / export / jit tracing, it is built on every call so gradients flow and the
    ops enter the graph."""
    if torch.is_grad_enabled() or is_traced():
        return build()
    # the sources are held with the value, so their memory stays allocated: a tensor matching the key
    # is the same memory (the same tensor, or a fresh view of it, e.g. a cached mask's unsqueeze), and
    # views share the version counter that in-place changes move
    return _cached(owner, name, sources, tuple(sources), build)


def tensor_derived(source: torch.Tensor, name: str, build: Callable[[], T]) -> T:
    """``build()`` for an inference-only value derived from ``source`` alone, cached while ``source``
    lives and is unchanged (same rules as :func:`derived_tensor`), dropped with it."""
    return _cached(source, name, (source,), (), build)


def drop_derived(name: str) -> None:
    """Free every cached value called ``name``."""
    for slot in [slot for slot in _CACHE if slot[1] == name]:
        _CACHE.pop(slot, None)
