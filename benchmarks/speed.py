"""Inference speed of SeMask Swin-T FPN at 512x512 (batch 1, eval) across execution modes, in one run:
the reference model (eager fp32), ``semask.optimize``, bf16 autocast, ONNX Runtime (CPU) and optionally
channels-last and torch.compile (inductor), as latency ratios to the reference in the same process.

    python benchmarks/speed.py [--size 512] [--reps 8] [--threads 0] [--skip compile,channels_last,onnx]
        [--device cpu|cuda]

On a GPU (``--device cuda``) the CPU-only modes (``semask.optimize``, ONNX Runtime) are left out.

Timings of all modes are interleaved (round-robin) so load from other processes hits them alike.
"""
from __future__ import annotations

import copy
import time

import torch

import semask
from _timing import bench_parser, device_name, inference_modes, interleaved_medians, load_note, median_ms, setup_threads


def main() -> None:
    ap = bench_parser(__doc__, reps=8)
    ap.add_argument("--model", default="semask_swin_tiny_fpn")
    ap.add_argument("--skip", default="compile,channels_last",
                    help="comma-separated modes to skip: optimized,bf16,onnx,channels_last,compile")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    threads = setup_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = semask.create_model(args.model, num_classes=150).eval().to(device)
    x = torch.randn(1, 3, args.size, args.size, device=device)
    with torch.no_grad():
        ref = model(x)
    modes, notes = inference_modes(model, x, threads, skip)

    if "channels_last" not in skip:
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        modes["channels-last"] = lambda: model_cl(x_cl)
    if "compile" not in skip:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            err = (compiled(x) - ref).abs().max().item()
        notes["compiled"] = f"compile {time.perf_counter() - t0:.0f} s, max |diff| {err:.1e}"
        modes["compiled (inductor)"] = lambda: compiled(x)

    with torch.no_grad():
        times = interleaved_medians(modes, reps=args.reps, settle=1)
    base = median_ms(times["reference fp32"])
    print(f"{args.model} {args.size}x{args.size} batch 1, {args.reps} interleaved reps, torch {torch.__version__}, "
          f"{device_name(device)}")
    for k, v in times.items():
        ms = median_ms(v)
        print(f"  {k:22s} median {ms:8.1f} ms ({1e3 / ms:6.2f} img/s)   speed-up vs reference {base / ms:5.2f}x")
    for k, v in notes.items():
        print(f"  [{k}] {v}")
    print(f"  {load_note()}")


if __name__ == "__main__":
    main()
