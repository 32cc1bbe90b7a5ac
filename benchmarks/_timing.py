"""Timing helpers shared by the benchmark scripts (not part of the installed package)."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable, Dict, List

import torch


def setup_threads(threads: int) -> int:
    """Pin torch's intra-op threads (default: all cores) and return the count used."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def time_once(fn: Callable[[], object]) -> float:
    """Seconds of one call (CUDA-synchronised when a GPU is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1, settle: int = 0
) -> Dict[str, List[float]]:
    """Run every callable ``warmup`` times, then ``reps`` rounds calling each once per round
    (interleaved, so a load spike from other processes hits all candidates alike); returns the
    per-candidate lists of seconds. ``settle`` untimed calls precede each timed one: the previous
    candidate's allocations (another runtime's arena, large buffers) otherwise land on the first call
    after a switch, which a serving loop of one model never sees."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            for _ in range(settle):
                fn()
            times[k].append(time_once(fn))
    return times


def median_ms(ts: List[float]) -> float:
    return 1e3 * statistics.median(ts)


def gemm_gflops(sizes=(2048, 3072, 4096), reps: int = 3) -> float:
    """Best fp32 ``torch.mm`` throughput (GFLOP/s) over square sizes: the machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        t = min(time_once(lambda: torch.mm(a, b)) for _ in range(reps))
        best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def load_note() -> str:
    """1-minute load average vs cores: other processes on a shared machine inflate latencies."""
    try:
        la = os.getloadavg()[0]
    except OSError:
        return "load average unavailable"
    return f"load average {la:.2f} on {os.cpu_count()} cores" + (
        " (machine busy: latencies are inflated, ratios are more reliable)" if la > 0.5 * (os.cpu_count() or 1) + 0.5 else ""
    )


def allocator_note() -> str:
    """The malloc in use: glibc's, or tcmalloc / jemalloc when preloaded (``LD_PRELOAD=...``). On the
    CPU it decides how much of a forward pass goes to page faults on freshly mapped memory."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "allocator: unknown (no /proc/self/maps)"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return f"allocator: {name} (preloaded)"
    return "allocator: the system malloc"


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is unavailable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    # (B, h, L, E) x (B, h, S, E) -> (B, h, L, S); (B, h, L, S) x (B, h, S, Ev)
    b, h, q_len, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * q_len * s * e + 2 * b * h * q_len * s * ev


def _onednn_linear_flops(x_shape, *args, **kwargs) -> int:
    # mkldnn::_linear_pointwise(X, W, B, attr, ...) and .binary(X, other, W, B, attr): 2 * rows * in * out
    w_shape = args[0] if isinstance(args[2], str) else args[1]
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``model(x)`` (FlopCounterMode; also counts the fused CPU attention kernel and oneDNN's
    fused linear, which torch's table misses, so fused and unfused paths count the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    try:
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops  # both overloads
    except (AttributeError, RuntimeError):
        pass
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return counter.get_total_flops()


def bench_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark shares: --size, --reps, --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="square input size")
    ap.add_argument("--reps", type=int, default=reps, help="timed repetitions per candidate")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    return ap
