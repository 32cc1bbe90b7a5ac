"""SeMask Swin-T backbone vs timm's plain Swin-T at 512x512 (fp32, eval, batch 1): median latencies
in one run and their ratio (issue #2 benchmark; target: semantic layers cost <= 10% over plain Swin).

    python benchmarks/backbone.py [--size 512] [--reps 10] [--threads 0] [--device cpu|cuda]

Also times our own backbone without semantic layers (``semantic_layers=False``), which separates
the cost of the semantic layers from implementation differences with timm, and both with
``semask.optimize`` (the opt-in CPU fast paths; not on a GPU).
"""
from __future__ import annotations

import copy

import timm
import torch

import semask
from _timing import bench_parser, count_flops, device_name, interleaved_medians, load_note, median_ms, setup_threads


def main() -> None:
    args = bench_parser(__doc__, reps=10).parse_args()
    setup_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {
        "semask_swin_tiny (ours, K=150)": semask.create_model("semask_swin_tiny", num_classes=150),
        "ours without semantic layers": semask.create_model("semask_swin_tiny", semantic_layers=False),
        "timm swin_tiny_patch4_window7_224": timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, features_only=True, img_size=args.size),
    }
    models = {k: m.eval().to(device) for k, m in models.items()}
    x = torch.randn(1, 3, args.size, args.size, device=device)
    gflops = {k: count_flops(m, x) / 1e9 for k, m in models.items()}
    for k in ("semask_swin_tiny (ours, K=150)", "ours without semantic layers") if device.type == "cpu" else ():
        models[f"{k}, optimized"] = semask.optimize(copy.deepcopy(models[k]))
        gflops[f"{k}, optimized"] = gflops[k]
    with torch.no_grad():
        for m in models.values():  # the optimized paths' per-shape measurements
            for _ in range(10):
                m(x)
        times = interleaved_medians({k: (lambda m=m: m(x)) for k, m in models.items()}, reps=args.reps)
    ms = {k: median_ms(v) for k, v in times.items()}
    ref = ms["timm swin_tiny_patch4_window7_224"]
    print(f"Swin-T backbones {args.size}x{args.size} fp32 eval batch 1, {args.reps} interleaved reps, "
          f"torch {torch.__version__}, timm {timm.__version__}, {device_name(device)}")
    for k in models:
        print(f"  {k:47s} median {ms[k]:8.1f} ms ({1e3 / ms[k]:6.2f} img/s, {gflops[k]:.1f} GFLOP)  "
              f"ratio to timm {ms[k] / ref:.3f}")
    ours = ms["semask_swin_tiny (ours, K=150)"]
    print(f"  semantic-layer overhead vs timm plain Swin: {100 * (ours / ref - 1):+.1f}% (target <= +10%); "
          f"vs our plain baseline: {100 * (ours / ms['ours without semantic layers'] - 1):+.1f}%")
    print(f"  {load_note()}")


if __name__ == "__main__":
    main()
