"""Timing helpers shared by the benchmark scripts (not part of the installed package)."""
from __future__ import annotations

import argparse
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


def gemm_gflops(sizes=(2048, 3072, 4096), reps: int = 3, device: str = "cpu") -> float:
    """Best fp32 ``torch.mm`` throughput (GFLOP/s) over square sizes: the machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``model(x)`` (FlopCounterMode; also counts the fused CPU attention kernel, which
    torch's table misses). Count them on the reference model: the optimized paths use oneDNN ops that
    the counter does not know."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return counter.get_total_flops()


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", else /proc/cpuinfo's "model name")."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def inference_modes(model: torch.nn.Module, x: torch.Tensor, threads: int, skip=()) -> tuple:
    """``({name: callable}, {name: note})`` for the reference model, ``semask.optimize`` (on a copy),
    bf16 autocast (of the reference) and ONNX Runtime (CPU), each checked against the reference.
    On a GPU (``x`` on CUDA) the two CPU-only modes are left out."""
    import copy
    import tempfile
    from pathlib import Path

    import semask
    from semask.accel import _tune

    with torch.no_grad():
        ref = model(x)
    modes = {"reference fp32": lambda: model(x)}
    notes = {}
    if x.device.type != "cpu":
        skip = set(skip) | {"optimized", "onnx"}
        notes["cpu-only modes"] = "semask.optimize and ONNX Runtime (CPU) are not run on " + x.device.type
    if "optimized" not in skip:
        opt = semask.optimize(copy.deepcopy(model))
        with torch.no_grad():
            for _ in range(3 * _tune.TRIALS + 1):  # the per-shape measurements, then the kept paths
                out = opt(x)
        notes["optimized"] = f"max |diff| {(out - ref).abs().max().item():.1e}; kept fast paths: " + \
            f"{sum(1 for v in _tune.decisions().values() if v)}/{len(_tune.decisions())} measured calls"
        modes["semask.optimize fp32"] = lambda: opt(x)
    if "bf16" not in skip:
        def bf16() -> torch.Tensor:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return model(x)
        with torch.no_grad():
            out = bf16().float()
        notes["bf16"] = (f"max |diff| {(out - ref).abs().max().item():.2e} (max |logit| {ref.abs().max().item():.2f}), "
                         f"argmax agreement {(out.argmax(1) == ref.argmax(1)).float().mean().item():.4f}")
        modes["bf16 autocast"] = bf16
    if "onnx" not in skip:
        import onnxruntime as ort

        from semask.export import export_onnx

        path = Path(tempfile.mkdtemp()) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path, size=tuple(x.shape[-2:]), batch=x.shape[0])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # no busy-waiting after a run: ORT's spinning threads would steal the cores of the next mode
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}
        err = abs(sess.run(None, feed)[0] - ref.numpy()).max()
        notes["onnx"] = f"export {time.perf_counter() - t0:.0f} s, max |diff| {err:.1e}"
        modes["ONNX Runtime (CPU)"] = lambda: sess.run(None, feed)
    return modes, notes


def bench_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark shares: --size, --reps, --threads, --device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="square input size")
    ap.add_argument("--reps", type=int, default=reps, help="timed repetitions per candidate")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (GPU; CPU-only modes are left out)")
    return ap


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def peak_mib(fn: Callable[[], object], model: torch.nn.Module, device: torch.device) -> float:
    """Peak tensor memory (MiB) of one inference call (no grad), the model's parameters and buffers excluded
    (:class:`semask.profiling.PeakMemory`: ``torch.cuda.max_memory_allocated`` on a GPU)."""
    from semask.profiling import PeakMemory

    with torch.no_grad(), PeakMemory(device.type, exclude=list(model.parameters()) + list(model.buffers())) as mem:
        fn()
    return mem.peak / 2**20
