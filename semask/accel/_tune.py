"""Machine-dependent choices of the optimized paths, made on the machine that runs them.

* Chunk sizes come from the CPU's cache sizes (Linux sysfs / ``os.sysconf``), not from constants.
* :func:`fastest` runs each candidate implementation of a call a few times per process and input
  shape, then keeps the fastest one (the reference forward is always a candidate: a fast path stays
  only where the reference does not beat it on this machine). Every candidate computes the same values.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Sequence, TypeVar

import torch

__all__ = ["cache_bytes", "token_chunk", "fastest", "reset_decisions"]

T = TypeVar("T")

_FALLBACK = {1: 32 << 10, 2: 1 << 20, 3: 8 << 20}  # typical sizes, used only when the OS reports none


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.lru_cache(maxsize=None)
def cache_bytes(level: int) -> int:
    """Size in bytes of one core's share of the level-``level`` data cache (a shared L3 divided by the
    CPUs sharing it)."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(root.glob("index*")):
            if int((idx / "level").read_text()) == level and (idx / "type").read_text().strip() != "Instruction":
                size = _parse_size((idx / "size").read_text())
                shared = (idx / "shared_cpu_list").read_text().strip()
                n = sum((int(b) - int(a) + 1) if a else 1 for a, _, b in
                        (part.partition("-") for part in shared.split(",")) if a or b) if shared else 1
                return max(size // max(n, 1), 1)
    except (OSError, ValueError):
        pass
    name = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}[level]
    try:
        size = os.sysconf(name)
        if size > 0:
            return size
    except (ValueError, OSError, AttributeError):
        pass
    return _FALLBACK[level]


def token_chunk(bytes_per_token: int, scale: int = 1) -> int:
    """Tokens per chunk whose working set (``bytes_per_token`` each) fills one core's L2 cache,
    times ``scale``, rounded down to a power of two in [64, 65536]."""
    n = max(1, cache_bytes(2) * scale // max(bytes_per_token, 1))
    return max(64, min(65536, 1 << (n.bit_length() - 1)))


# per-process decisions: key -> index of the winning candidate; and the timings while undecided
_DECIDED: Dict[Hashable, int] = {}
_TIMES: Dict[Hashable, List[List[float]]] = {}
_LOCK = threading.Lock()
TRIALS = 5  # timed runs per candidate (the first is a warm-up and not counted)
MARGIN = 1.03  # the reference is kept only when it beats every fast candidate by more than this


def _winner(times: List[List[float]]) -> int:
    best = [min(t[1:]) for t in times]  # best time: the least disturbed by other load on the machine
    fast = min(range(1, len(times)), key=lambda j: best[j])
    return 0 if best[0] * MARGIN < best[fast] else fast


def fastest(key: Hashable, candidates: Sequence[Callable[[], T]]) -> T:
    """Run one of ``candidates`` (same result, different speed; ``candidates[0]`` is the reference):
    while undecided for ``key``, the one with the fewest timed runs (round robin); after
    :data:`TRIALS` runs each, always the winner: the fastest fast candidate, unless the reference
    beats it by more than :data:`MARGIN`. Candidates must not themselves call :func:`fastest`."""
    choice = _DECIDED.get(key)
    if choice is not None:
        return candidates[choice]()
    with _LOCK:
        times = _TIMES.setdefault(key, [[] for _ in candidates])
        i = min(range(len(candidates)), key=lambda j: len(times[j]))
    t0 = time.perf_counter()
    out = candidates[i]()
    dt = time.perf_counter() - t0
    with _LOCK:
        times[i].append(dt)
        if key not in _DECIDED and all(len(t) >= TRIALS for t in times):
            _DECIDED[key] = _winner(times)
    return out


def decisions() -> Dict[Hashable, int]:
    """A copy of the decisions made so far (key -> index of the kept candidate)."""
    with _LOCK:
        return dict(_DECIDED)


def reset_decisions() -> None:
    """Forget every decision (they are re-measured on the next calls)."""
    with _LOCK:
        _DECIDED.clear()
        _TIMES.clear()


def threads() -> int:
    return torch.get_num_threads()
