"""SeMask Swin-T FPN at 512x512 (eval, batch 1): latency of the reference model, ``semask.optimize``,
bf16 autocast and ONNX Runtime in one run (ratios vs the reference), FLOPs and achieved GFLOP/s
against a fp32 GEMM peak measured in the same run.

    python benchmarks/segmentor.py [--size 512] [--reps 10] [--threads 0] [--model semask_swin_tiny_fpn]
        [--skip optimized,bf16,onnx] [--device cpu|cuda]

On a GPU (``--device cuda``) it times the reference model and bf16 autocast (the other modes are
CPU-only) and reports images/s and ``torch.cuda.max_memory_allocated``.

The malloc matters on the CPU: glibc's maps every block over 32 MB freshly and returns freed memory to
the kernel, so fresh memory is page-faulted back in on every call (the printed fault count). Compare
with the allocator PyTorch's performance guide recommends for CPU inference:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/segmentor.py
"""
from __future__ import annotations

import torch

import semask
from _timing import (
    allocator_note, bench_parser, count_flops, device_name, gemm_gflops, inference_modes, interleaved_medians,
    load_note, median_ms, minor_faults, peak_mib, setup_threads,
)


def main() -> None:
    ap = bench_parser(__doc__, reps=10)
    ap.add_argument("--model", default="semask_swin_tiny_fpn")
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--skip", default="", help="comma-separated modes to skip: optimized,bf16,onnx")
    args = ap.parse_args()
    threads = setup_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = semask.create_model(args.model, num_classes=args.num_classes).eval().to(device)
    x = torch.randn(1, 3, args.size, args.size, device=device)
    gflop = count_flops(model, x) / 1e9
    modes, notes = inference_modes(model, x, threads, set(filter(None, args.skip.split(","))))

    peaks = []
    lat = {k: [] for k in modes}
    with torch.no_grad():
        # interleave GEMM peak and model runs so both see the same machine load
        for _ in range(max(1, args.reps // 5)):
            peaks.append(gemm_gflops(sizes=(2048, 3072), reps=2, device=device))
            for k, v in interleaved_medians(modes, reps=5, warmup=1, settle=1).items():
                lat[k] += v
        faults = {}
        for k, fn in modes.items():
            fn()
            f0 = minor_faults()
            fn()
            faults[k] = minor_faults() - f0
    # (ONNX Runtime's own allocations are invisible to torch)
    mem = {k: f"peak {peak_mib(fn, model, device):6.0f} MiB" for k, fn in modes.items() if not k.startswith("ONNX")}
    peak = max(peaks)
    base = median_ms(lat["reference fp32"])
    print(f"{args.model} {args.size}x{args.size} eval batch 1, torch {torch.__version__}, {device_name(device)}")
    print(f"  FLOPs (FlopCounterMode, reference): {gflop:.2f} GFLOP; fp32 GEMM peak (torch.mm 2048/3072, best): "
          f"{peak:.1f} GFLOP/s")
    for k, v in lat.items():
        ms = median_ms(v)
        print(f"  {k:22s} median {ms:7.1f} ms (min {1e3 * min(v):7.1f})  {base / ms:5.2f}x reference  "
              f"{gflop / (ms / 1e3):6.1f} GFLOP/s = {100 * gflop / (ms / 1e3) / peak:5.1f}% of GEMM peak  "
              f"{1e3 / ms:6.2f} img/s  {mem.get(k, 'peak n/a')}  {faults[k]} minor faults/call")
    for k, v in notes.items():
        print(f"  [{k}] {v}")
    print(f"  {allocator_note() if device.type == 'cpu' else 'GPU'}; {load_note()}")


if __name__ == "__main__":
    main()
