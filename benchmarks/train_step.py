"""Training step (forward + losses + backward) and inference throughput, time and peak memory, per
family and crop, against a baseline run in the same process (issue #17 benchmark).

    python benchmarks/train_step.py [--device cpu|cuda] [--families fpn,mit,mask2former]
                                    [--modes fp32,bf16,compile] [--reps 3] [--threads 0] [--infer]

Each family is compared with its plain counterpart: the same model with ``semantic_layers=False``
(no semantic layers, no semantic branch), so the ratio is the overhead of SeMask's semantic layers.
Peak memory is the peak of tensor memory created during one step (:class:`semask.profiling.PeakMemory`:
storages counted on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU), which depends on the model,
not on the machine. On a GPU machine, one command gives every number:

    python benchmarks/train_step.py --device cuda --modes fp32,bf16,compile --infer
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Tuple

import torch

import semask
from semask.profiling import PeakMemory
from _timing import device_name, interleaved_medians, load_note, setup_threads

# family -> (model name, kwargs, [(batch, crop), ...]); crops of the issue: the official 512 crop and a
# CPU-sized 256 one for FPN, 384 for Swin-L Mask2Former (ADE20K config)
FAMILIES: Dict[str, Tuple[str, dict, List[Tuple[int, int]]]] = {
    "fpn": ("semask_swin_tiny_fpn", dict(num_classes=150, loss_reduction="mmseg"), [(2, 256), (2, 512)]),
    "mit": ("semask_mit_b0_segformer", dict(num_classes=150), [(2, 256), (2, 512)]),
    "mask2former": ("semask_swin_large_mask2former", dict(num_classes=150), [(1, 384)]),
}


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Callable[[], None]:
    device = x.device

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            return model(images, labels)["loss"]

    fn = torch.compile(loss_fn) if mode == "compile" else loss_fn

    def step() -> None:
        model.zero_grad(set_to_none=True)
        fn(x, y).backward()

    return step


def peak_bytes(fn: Callable[[], None], model: torch.nn.Module, device: torch.device) -> int:
    with PeakMemory(device.type, exclude=list(model.parameters()) + list(model.buffers())) as mem:
        fn()
    return mem.peak


def bench_train(name: str, kwargs: dict, batch: int, crop: int, modes: List[str], reps: int,
                device: torch.device) -> None:
    torch.manual_seed(0)
    models = {
        "semask": semask.create_model(name, **kwargs).to(device).train(),
        "plain": semask.create_model(name, semantic_layers=False, **kwargs).to(device).train(),
    }
    k = kwargs["num_classes"]
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, k, (batch, crop, crop), device=device)
    for mode in modes:
        steps = {tag: make_step(m, x, y, mode) for tag, m in models.items()}
        times = interleaved_medians(steps, reps=reps, warmup=2 if mode == "compile" else 1)
        mem = {tag: peak_bytes(steps[tag], models[tag], device) for tag in steps}
        ms = {tag: 1e3 * statistics.median(t) for tag, t in times.items()}
        print(f"  train {mode:7s} B={batch} {crop}px: semask {ms['semask']:8.1f} ms ({batch * 1e3 / ms['semask']:6.2f} img/s, "
              f"{mem['semask'] / 2**20:7.0f} MiB) | plain {ms['plain']:8.1f} ms ({mem['plain'] / 2**20:7.0f} MiB) | "
              f"time x{ms['semask'] / ms['plain']:.2f}, memory x{mem['semask'] / max(mem['plain'], 1):.2f} of plain")


def bench_infer(name: str, kwargs: dict, crop: int, batches: List[int], reps: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = semask.create_model(name, **kwargs).to(device).eval()
    for b in batches:
        x = torch.randn(b, 3, crop, crop, device=device)
        with torch.no_grad():
            t = interleaved_medians({"m": lambda: model(x)}, reps=reps)["m"]
            mem = peak_bytes(lambda: model(x), model, device)
        ms = 1e3 * statistics.median(t)
        print(f"  infer fp32 B={b:2d} {crop}px: {ms:8.1f} ms ({b * 1e3 / ms:7.2f} img/s, {mem / 2**20:7.0f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--families", default="fpn,mit,mask2former")
    ap.add_argument("--modes", default="fp32", help="comma-separated: fp32, bf16 (autocast), compile")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--crops", default="", help="override the crops, e.g. 256 (batch as configured)")
    ap.add_argument("--infer", action="store_true", help="also inference throughput at batch 1, 8, 16")
    args = ap.parse_args()
    device = torch.device(args.device)
    setup_threads(args.threads)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {load_note()}")
    modes = [m for m in args.modes.split(",") if m]
    for fam in filter(None, args.families.split(",")):
        name, kwargs, shapes = FAMILIES[fam]
        if args.crops:
            shapes = [(shapes[0][0], int(c)) for c in args.crops.split(",")]
        print(f"{fam}: {name}")
        for batch, crop in shapes:
            bench_train(name, kwargs, batch, crop, modes, args.reps, device)
        if args.infer:
            bench_infer(name, kwargs, shapes[0][1], [1, 8, 16] if device.type == "cuda" else [1, 8], args.reps, device)


if __name__ == "__main__":
    main()
