"""``semask eval --model NAME --pretrained DIR --format FMT --data DIR --split val``: per-class IoU
table and ``mIoU: <value>`` (percent, computed as mmsegmentation does)."""
from __future__ import annotations

import argparse
import time

import semask

from ._common import add_inference_args, add_model_args, class_meta, inference_kwargs, pick_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, required=False)
    p.add_argument("--format", required=True, choices=["camvid", "ade20k", "cityscapes", "coco_stuff10k", "folder", "synthetic"],
                   help="dataset layout")
    p.add_argument("--data", default=None, help="dataset root folder")
    p.add_argument("--split", default="val", help="split to evaluate (val, test, ...)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    add_inference_args(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.datasets import SegmentationFolder, build_dataset
    from ..train import evaluate
    from ._common import load_model

    if args.data is None and args.format != "synthetic":
        raise SystemExit("error: --data DIR is required for --format " + args.format)
    if not args.pretrained:
        print("note: no --pretrained given, so the model has random weights", flush=True)
    model = semask.optimize(load_model(args.model, args.pretrained).to(pick_device(args.device)).eval())
    ds = build_dataset(args.format, args.data, args.split)
    if isinstance(ds, SegmentationFolder):
        ds.num_classes = int(model.num_classes)  # label ids >= K fail naming the file
    if args.max_images:
        ds = torch.utils.data.Subset(ds, range(min(args.max_images, len(ds))))
    k = int(model.num_classes)
    t0 = time.perf_counter()
    metrics = evaluate(model, ds, k, progress=True, **inference_kwargs(args))
    names, _ = class_meta(model, k)
    from ..metrics import format_metrics_table

    print(format_metrics_table(metrics, names))
    print(f"({len(ds)} images, {time.perf_counter() - t0:.1f} s)")
    return 0
