"""SeMask Swin-T FPN at 512x512 (fp32, eval, batch 1): latency, FLOPs and achieved GFLOP/s against a
fp32 GEMM peak measured in the same run (issue #3 benchmark).

    python benchmarks/segmentor.py [--size 512] [--reps 10] [--threads 0] [--model semask_swin_tiny_fpn]

The malloc matters on the CPU: glibc's maps every block over 32 MB freshly and returns freed memory to
the kernel, so fresh memory is page-faulted back in on every call. The segmentor reuses its 157 MB
logits buffer once the previous result is dropped (``model.reuse_output``); the printed fault count
is what is left. Compare with the allocator PyTorch's performance guide recommends for CPU inference:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/segmentor.py
"""
from __future__ import annotations

import torch

import semask
from _timing import (
    allocator_note, bench_parser, count_flops, gemm_gflops, interleaved_medians, load_note, median_ms, minor_faults,
    setup_threads,
)


def main() -> None:
    ap = bench_parser(__doc__, reps=10)
    ap.add_argument("--model", default="semask_swin_tiny_fpn")
    ap.add_argument("--num-classes", type=int, default=150)
    args = ap.parse_args()
    threads = setup_threads(args.threads)
    torch.manual_seed(0)
    model = semask.create_model(args.model, num_classes=args.num_classes).eval()
    x = torch.randn(1, 3, args.size, args.size)
    gflop = count_flops(model, x) / 1e9

    peaks, lat = [], []
    with torch.no_grad():
        model(x)
        # interleave GEMM peak and model runs so both see the same machine load; an untimed model call
        # after each GEMM block (see interleaved_medians' settle): steady-state latency is measured
        for _ in range(max(1, args.reps // 5)):
            peaks.append(gemm_gflops(sizes=(2048, 3072), reps=2))
            lat += interleaved_medians({"model": lambda: model(x)}, reps=5, warmup=1)["model"]
        faults = minor_faults()
        model(x)
        faults = minor_faults() - faults
    peak = max(peaks)
    ms = median_ms(lat)
    achieved = gflop / (ms / 1e3)
    print(f"{args.model} {args.size}x{args.size} fp32 eval batch 1, {threads} threads, torch {torch.__version__}")
    print(f"  FLOPs (FlopCounterMode): {gflop:.2f} GFLOP")
    print(f"  latency: median {ms:.1f} ms over {len(lat)} runs (min {1e3 * min(lat):.1f} ms)")
    print(f"  fp32 GEMM peak (torch.mm 2048/3072, best): {peak:.1f} GFLOP/s")
    print(f"  achieved: {achieved:.1f} GFLOP/s = {100 * achieved / peak:.1f}% of GEMM peak (target >= 75%)")
    print(f"  {allocator_note()}: {faults} minor page faults per call ({faults * 4 / 1024:.0f} MB)")
    print(f"  {load_note()}")


if __name__ == "__main__":
    main()
