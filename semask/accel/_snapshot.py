"""Per-module snapshots of tensors derived from parameters (fused, folded or packed weights)."""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Hashable, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")

ATTR = "_accel_snapshots"


def _key(t: torch.Tensor) -> tuple:
    # the same tensor object with the same memory, unchanged in place: a replaced parameter changes
    # the identity, ``.to()`` / casts change the pointer, in-place writes through the autograd-visible
    # tensor (optimizer steps, ``copy_``, ``load_state_dict``) move the version counter. Writes through
    # ``.data`` are invisible to all three (documented: call ``optimize`` again).
    return id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)


class Snapshots:
    """Derived tensors of one module, rebuilt when a source tensor changes (see :func:`_key`).

    The sources are held with each value, so a freed tensor's id or memory cannot be reused by a new
    one while its snapshot exists. Copies and pickles of the module start empty (packed oneDNN
    weights cannot be pickled)."""

    def __init__(self) -> None:
        self._values: Dict[Hashable, Tuple[tuple, tuple, Any]] = {}
        self._lock = threading.Lock()

    def get(self, name: Hashable, sources: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
        if any(t.is_inference() for t in sources):
            # created under inference_mode: no version counter, an in-place reload would go unseen
            return build()
        key = tuple(_key(t) for t in sources)
        entry = self._values.get(name)
        if entry is not None and entry[0] == key:
            return entry[2]
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        with self._lock:
            if len(self._values) > 64:  # e.g. shift-mask biases of many input sizes
                self._values.clear()
            self._values[name] = (key, tuple(sources), value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._values = {}

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Snapshots":
        return Snapshots()

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()


def snapshots(module: nn.Module) -> Snapshots:
    snap = module.__dict__.get(ATTR)
    if snap is None:
        snap = module.__dict__.setdefault(ATTR, Snapshots())
    return snap


def drop_snapshots(module: nn.Module, incompatible_keys: Any = None) -> None:
    """Free the snapshots of ``module`` (also its load_state_dict post hook)."""
    snap = module.__dict__.get(ATTR)
    if snap is not None:
        snap.clear()
