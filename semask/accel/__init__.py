"""Opt-in CPU inference fast paths: :func:`optimize` and :func:`restore`.

The model files (``semask.layers``, ``backbones``, ``decoders``, ``models``) are the reference
computation. ``semask.optimize(model)`` swaps, in place, the classes of the modules it knows
(Swin blocks, patch merging / embedding, semantic attention and layers, FPN conv-BN-ReLU and head,
the segmentor) for subclasses in :mod:`semask.accel.modules` whose ``forward`` runs a faster
eager-CPU path and otherwise calls the reference ``forward``.

Contract:

* Outputs equal the reference model's (fp32, within 1e-5 relative): the fast paths compute the same
  function, in another order (chunks, fused matmuls, folded BatchNorm, separable resize).
* They run only in eager fp32 CPU inference (autograd off, ``eval()``, no autocast, not under
  torch.compile / export / jit tracing). Everything else calls the reference forward.
* Forward hooks fire as in the reference model: a module whose inner modules have hooks (or are
  replaced by other classes: LoRA wrappers, quantised layers) takes the reference forward.
* Snapshots (fused / folded / packed weights, attention biases) are keyed on the identity, memory
  and version counter of the tensors they derive from, and dropped by ``load_state_dict``: they are
  rebuilt after ``load_state_dict``, ``copy_``, optimizer steps, ``.to()`` and parameter replacement.
  Writes through ``.data`` are invisible to the version counter: after them, call ``optimize(model)``
  again (it drops every snapshot).
* Machine-dependent choices are made on the machine that runs them: chunk sizes from the CPU's cache
  sizes, and (``autotune=True``) each fast path measured against the reference once per process and
  input shape, kept only where it is faster (the first calls of a new shape run both).
* ``restore(model)`` (or ``optimize(model, enabled=False)``) puts the reference classes back.
"""
from __future__ import annotations

from typing import TypeVar

import torch.nn as nn

from . import _tune
from ._snapshot import ATTR as _SNAPSHOTS, drop_snapshots
from .modules import OPTIMIZED, reference_class

__all__ = ["optimize", "restore", "is_optimized"]

M = TypeVar("M", bound=nn.Module)

_OPTIONS = "_accel_options"
_HOOK = "_accel_hook"


def _drop_tree(module: nn.Module, incompatible_keys=None) -> None:
    # load_state_dict post hook: the snapshots of the module and of its children (packed linears)
    for m in module.modules():
        drop_snapshots(m)


def optimize(model: M, enabled: bool = True, *, autotune: bool = True, pack_weights: bool = True) -> M:
    """Turn on the CPU inference fast paths of ``model`` in place and return it (see the module doc
    for the contract). Calling it again drops every snapshot (needed after ``.data`` writes).

    Args:
        model: any module; the semask modules inside it are optimized, the rest is left alone.
        enabled: False restores the reference model (:func:`restore`).
        autotune: measure each fast path against the reference per input shape and keep the faster
            one (False: always the fast paths, with cache-derived chunk sizes).
        pack_weights: keep a copy of each linear weight in oneDNN's blocked layout (faster matmuls,
            a second copy of the linear weights in memory).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"semask.optimize needs an nn.Module, got {type(model).__name__}")
    if not enabled:
        return restore(model)
    options = dict(autotune=bool(autotune), pack_weights=bool(pack_weights))
    for m in model.modules():
        drop_snapshots(m)
        cls = type(m)
        fast = OPTIMIZED.get(cls) or (cls if reference_class(cls) else None)
        if fast is None:
            continue  # not ours, or a user subclass of ours: left as it is
        m.__class__ = fast
        m.__dict__[_OPTIONS] = options
        if _HOOK not in m.__dict__:
            m.__dict__[_HOOK] = m.register_load_state_dict_post_hook(_drop_tree)
    return model


def restore(model: M) -> M:
    """Undo :func:`optimize` in place: reference classes back, snapshots and hooks removed."""
    for m in model.modules():
        ref = reference_class(type(m))
        if ref is not None:
            m.__class__ = ref
        m.__dict__.pop(_OPTIONS, None)
        m.__dict__.pop(_SNAPSHOTS, None)
        handle = m.__dict__.pop(_HOOK, None)
        if handle is not None:
            handle.remove()
    return model


def is_optimized(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs an optimized forward."""
    return any(reference_class(type(m)) is not None for m in model.modules())


reset_decisions = _tune.reset_decisions
