"""Peak tensor memory of a block of code, on the CPU as on a GPU (benchmarks and memory tests).

PyTorch reports peak memory for accelerators (``torch.cuda.max_memory_allocated``) but not for the
CPU. :class:`PeakMemory` counts, on the CPU, the bytes of every tensor storage that an operator
creates inside the block while it is alive (a ``TorchDispatchMode``; each storage counted once, freed
when its last tensor goes), so activation memory of a training step can be measured and compared on
any machine: it does not depend on the device or the allocator.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory"]


class _StorageCounter(TorchDispatchMode):
    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        for t in exclude:
            self._seen[t.untyped_storage()] = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage not in self._seen:
                    n = storage.nbytes()
                    self._seen[storage] = n
                    weakref.finalize(storage, self._free, n)
                    self.current += n
                    self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """Context manager: ``peak`` = the most bytes of tensors created inside the block alive at once.

    ``device``: ``"cpu"`` counts storages created by operators (tensors that existed before the
    block, and ``exclude``, are not counted); ``"cuda"`` reads ``torch.cuda.max_memory_allocated``
    relative to the memory allocated at entry. ``current``: bytes still alive at exit.

        with PeakMemory() as mem:
            model(images, labels)["loss"].backward()
        print(mem.peak / 2**20, "MiB")
    """

    def __init__(self, device: str = "cpu", exclude: Iterable[torch.Tensor] = ()) -> None:
        self.device = torch.device(device)
        self._exclude = list(exclude)
        self._counter: Optional[_StorageCounter] = None
        self._start = 0
        self.peak = 0
        self.current = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            self._counter = _StorageCounter(self._exclude)
            self._counter.__enter__()
        else:
            raise ValueError(f"PeakMemory supports cpu and cuda, not {self.device.type!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._counter is not None:
            self._counter.__exit__(*exc)
            self.peak, self.current = self._counter.peak, self._counter.current
            self._counter = None
        else:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            self.current = torch.cuda.memory_allocated(self.device) - self._start
