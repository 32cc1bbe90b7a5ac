"""Mask2Former benchmarks (issue #6): our multi-scale deformable attention (one weighted gather-sum,
``F.embedding_bag``) vs the per-level ``F.grid_sample`` loop formula (same process, interleaved, so the
ratio is robust to machine load), then
the whole SeMask Swin-L Mask2Former (ADE20K config) at 640x640, batch 1, eval: latency and peak memory.

    python benchmarks/mask2former.py [--size 640] [--reps 3] [--attn-reps 10] [--threads 0]
        [--device cpu|cuda] [--skip-model]

Peak memory: CUDA -> ``torch.cuda.max_memory_allocated``; CPU -> RSS high-water mark (VmHWM, reset
just before the measured call) of a fresh subprocess, with glibc returning large blocks on free, minus
its RSS before the call (so inputs and weights are excluded and reported apart).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from _timing import interleaved_medians, load_note, median_ms, setup_threads


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _reset_peak() -> None:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """RSS high-water mark (VmHWM). Unlike ``ru_maxrss`` it does not inherit the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention_inputs(size: int, device: str, heads: int = 8, dim: int = 256, points: int = 4, batch: int = 1):
    """Inputs of one encoder layer's deformable attention at the Swin-L Mask2Former shapes:
    levels stride 32/16/8 of a ``size``-pixel image, every token a query."""
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    n_tok = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(0)
    value = torch.randn(batch, n_tok, heads, dim // heads, generator=g)
    ref = torch.rand(batch, n_tok, 1, 1, 1, 2, generator=g)
    loc = (ref + 0.05 * torch.randn(batch, n_tok, heads, 3, points, 2, generator=g)).clamp(-0.1, 1.1)
    attn = torch.rand(batch, n_tok, heads, 3, points, generator=g).softmax(-1)
    return shapes, value.to(device), loc.to(device), attn.to(device)


def bench_attention(args) -> dict:
    from semask.decoders.ms_deform_attn import ms_deform_attn, ms_deform_attn_grid_sample

    shapes, value, loc, attn = attention_inputs(args.size, args.device)
    res = {"shapes": shapes, "queries": value.shape[1]}
    with torch.no_grad():
        err = (ms_deform_attn(value, shapes, loc, attn) - ms_deform_attn_grid_sample(value, shapes, loc, attn)).abs().max()
        times = interleaved_medians({
            "ours": lambda: ms_deform_attn(value, shapes, loc, attn),
            "grid_sample": lambda: ms_deform_attn_grid_sample(value, shapes, loc, attn),
        }, args.attn_reps)
    res["max_abs_diff"] = float(err)
    res["fwd_ms"] = {k: median_ms(v) for k, v in times.items()}
    # forward + backward (training): gradients w.r.t. value, locations and weights
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]

    def step(fn):
        def run():
            out = fn(leaves[0], shapes, leaves[1], leaves[2])
            out.sum().backward()
        return run

    times = interleaved_medians({"ours": step(ms_deform_attn), "grid_sample": step(ms_deform_attn_grid_sample)},
                                max(1, args.attn_reps // 2))
    res["fwd_bwd_ms"] = {k: median_ms(v) for k, v in times.items()}
    return res


def attn_memory_child(args) -> None:
    """Runs in a subprocess: peak RSS growth of one forward+backward of one attention implementation."""
    from semask.decoders import ms_deform_attn as mda

    fn = mda.ms_deform_attn if args._child == "attn-ours" else mda.ms_deform_attn_grid_sample
    shapes, value, loc, attn = attention_inputs(args.size, "cpu")
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    before = _rss_mb()
    _reset_peak()
    fn(leaves[0], shapes, leaves[1], leaves[2]).sum().backward()
    print(json.dumps({"peak_mb": _peak_mb() - before}))


def _child(args, kind: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, "--size", str(args.size), "--reps",
           str(args.reps), "--threads", str(threads), "--device", args.device]
    # glibc: serve every large allocation with mmap and return it on free, so RSS follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_model_child(args) -> None:
    """Runs in a subprocess: builds the full model, times it, prints one JSON line."""
    import semask
    from _timing import time_once

    setup_threads(args.threads)
    torch.manual_seed(0)
    rss0 = _rss_mb()
    model = semask.create_model("semask_swin_large_mask2former.ade20k").eval().to(args.device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, args.size, args.size, device=args.device)
    rss_weights = _rss_mb()
    _reset_peak()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for i in range(args.reps + 1):  # the first call is a warm-up
            t = time_once(lambda: model(x))
            if i:
                times.append(t)
    out = {"params_m": params / 1e6, "latency_ms": median_ms(times), "all_ms": [round(1e3 * t, 1) for t in times],
           "weights_rss_mb": rss_weights - rss0}
    if args.device == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        out["peak_rss_mb"] = _peak_mb()
        out["activations_peak_mb"] = out["peak_rss_mb"] - rss_weights
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--reps", type=int, default=3, help="full-model repetitions (after one warm-up)")
    ap.add_argument("--attn-reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child == "model":
        bench_model_child(args)
        return
    if args._child:
        attn_memory_child(args)
        return
    threads = setup_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {threads} threads; {load_note()}")
    a = bench_attention(args)
    f, fb = a["fwd_ms"], a["fwd_bwd_ms"]
    print(f"MSDeformAttn core, levels {a['shapes']}, {a['queries']} queries, 8 heads x 32 ch, 4 points "
          f"(max |ours - reference| = {a['max_abs_diff']:.1e})")
    print(f"  forward          ours {f['ours']:8.1f} ms   grid_sample loop {f['grid_sample']:8.1f} ms   "
          f"speed-up x{f['grid_sample'] / f['ours']:.2f}")
    print(f"  forward+backward ours {fb['ours']:8.1f} ms   grid_sample loop {fb['grid_sample']:8.1f} ms   "
          f"speed-up x{fb['grid_sample'] / fb['ours']:.2f}")
    if args.device == "cpu":
        mem = {k: _child(args, f"attn-{k}", threads)["peak_mb"] for k in ("ours", "grid")}
        print(f"  peak memory of forward+backward (RSS growth): ours {mem['ours']:.0f} MB, "
              f"grid_sample loop {mem['grid']:.0f} MB")
    if args.skip_model:
        return
    res = _child(args, "model", threads)
    mem = (f"peak GPU memory {res['peak_mem_mb']:.0f} MB" if "peak_mem_mb" in res else
           f"peak RSS {res['peak_rss_mb']:.0f} MB (weights {res['weights_rss_mb']:.0f} MB, "
           f"forward +{res['activations_peak_mb']:.0f} MB)")
    print(f"SeMask Swin-L Mask2Former (ADE20K, {res['params_m']:.1f}M params), {args.size}x{args.size}, batch 1, "
          f"fp32 eval: {res['latency_ms']:.0f} ms median of {res['all_ms']} ms; {mem}")


if __name__ == "__main__":
    main()
