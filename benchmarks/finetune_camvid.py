"""SeMask Swin-T FPN vs the same model without semantic layers, trained from scratch on CamVid.

A small echo of the paper's ablation: both models get the same budget (iterations, batch, crop
360x480, official augmentations, AdamW + poly), then are scored on CamVid val. Also reports
training images/s and the peak memory of a training step with and without gradient
checkpointing. Every measurement runs in a fresh process, so peak RSS (CPU) / peak allocated
memory (CUDA) belongs to that configuration alone.

    python benchmarks/finetune_camvid.py --data ../shared/data/camvid --iters 2000 --batch-size 8
    python benchmarks/finetune_camvid.py --iters 4 --batch-size 2 --eval-images 8   # smoke run
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _job(kind: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: 'train' (fit + eval) or 'memory' (a few steps, peak memory)."""
    import torch
    from torch.utils.data import Subset

    import semask
    from semask.data import CamVidDataset
    from semask.data.transforms import train_transforms
    from semask.train import TrainConfig, Trainer, evaluate

    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    torch.manual_seed(opts["seed"])
    model = semask.create_model("semask_swin_tiny_fpn", num_classes=11, semantic_layers=opts["semantic"],
                                drop_path_rate=0.2)
    tf = train_transforms((360, 480), (480, 360), (0.5, 2.0), cat_max_ratio=0.75)
    train_set = CamVidDataset(opts["data"], "train", transforms=tf)
    iters = opts["iters"] if kind == "train" else opts["memory_iters"]
    cfg = TrainConfig(iters=iters, batch_size=opts["batch_size"], lr=opts["lr"], weight_decay=0.01,
                      warmup_iters=min(100, iters // 10), grad_checkpointing=opts.get("ckpt", False),
                      num_workers=opts["workers"], progress=kind == "train" and opts["progress"], amp=opts["amp"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    base_rss = _rss_mb()
    trainer = Trainer(model, train_set, cfg, num_classes=11)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = trainer.fit()
    out: Dict[str, Any] = dict(images_per_s=res.images_per_s, seconds=res.seconds,
                               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                               final_loss=res.history[-1]["loss"])
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        out["peak_mem_mb"] = _rss_mb()
        out["peak_mem_over_model_mb"] = _rss_mb() - base_rss
    if kind == "train":
        val = CamVidDataset(opts["data"], "val")
        val = Subset(val, range(min(opts["eval_images"], len(val)))) if opts["eval_images"] else val
        t0 = time.perf_counter()
        m = evaluate(model, val, 11, batch_size=2, resize=False)
        out.update(miou=100 * float(m["mIoU"]), aacc=100 * float(m["aAcc"]), eval_s=time.perf_counter() - t0,
                   eval_images=len(val))
    return out


def _fresh(kind: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_job, kind, opts).result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--iters", type=int, default=200, help="training iterations per model")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument("--eval-images", type=int, default=0, help="score on the first N val images (0: all 101)")
    p.add_argument("--memory-iters", type=int, default=2, help="steps of the memory runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    opts = dict(data=a.data, iters=a.iters, batch_size=a.batch_size, lr=a.lr, amp=a.amp, eval_images=a.eval_images,
                memory_iters=a.memory_iters, device=a.device, threads=a.threads, workers=a.workers, seed=a.seed,
                progress=not a.no_progress)
    print(f"CamVid from scratch, crop 360x480, {a.iters} iterations x {a.batch_size} images, {a.device}, "
          f"{a.threads} threads", flush=True)
    results: Dict[str, Any] = {"settings": opts}
    for name, semantic in (("semask", True), ("no_semantic_layers", False)):
        r = _fresh("train", dict(opts, semantic=semantic))
        results[name] = r
        print(f"  {name:<20} mIoU {r['miou']:6.2f}  aAcc {r['aacc']:6.2f}  {r['images_per_s']:.2f} train img/s  "
              f"{r['params_m']:.1f}M params  final loss {r['final_loss']:.3f}", flush=True)
    if not a.skip_memory:
        for ckpt in (False, True):
            r = _fresh("memory", dict(opts, semantic=True, ckpt=ckpt))
            results[f"memory_ckpt_{ckpt}"] = r
            extra = f" ({r['peak_mem_over_model_mb']:.0f} MB above the process before training)" \
                if "peak_mem_over_model_mb" in r else ""
            print(f"  grad checkpointing {str(ckpt):<5}  peak memory {r['peak_mem_mb']:.0f} MB{extra}  "
                  f"{r['images_per_s']:.2f} img/s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
