"""``semask train --model NAME --num-classes K --format FMT --data DIR --iters N --batch-size B
--crop H W --out DIR``: finetune (or train from scratch) and write a loadable model folder.

Multi-GPU / multi-node: ``torchrun --nproc_per_node 8 -m semask.cli train ...`` (the batch size is
per process). ``--resume OUT/last_checkpoint`` continues an interrupted run.
"""
from __future__ import annotations

import argparse
import json

from ._common import FORMAT_SCALES, add_model_args, class_meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--pretrained-backbone", action="store_true", help="start from timm's ImageNet Swin weights")
    p.add_argument("--model-kwargs", default="{}", help='architecture overrides as JSON, e.g. \'{"embed_dim": 32}\'')
    p.add_argument("--num-classes", type=int, default=None, help="classes K (default: the dataset's)")
    p.add_argument("--format", required=True, choices=["camvid", "ade20k", "cityscapes", "coco_stuff10k", "folder", "synthetic"])
    p.add_argument("--data", default=None, help="dataset root folder")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="split evaluated during/after training ('' to skip)")
    p.add_argument("--max-val-images", type=int, default=None, help="evaluate on the first N validation images")
    p.add_argument("--iters", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="images per process and micro-step")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per iteration")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=(512, 512), help="training crop")
    p.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                   help="keep-ratio resize scale for training and testing (default: the dataset's; native size for camvid/folder)")
    p.add_argument("--ratio-range", type=float, nargs=2, default=(0.5, 2.0), help="random resize ratio range")
    p.add_argument("--cat-max-ratio", type=float, default=0.75, help="RandomCrop max share of one class")
    p.add_argument("--no-photometric", action="store_true", help="disable PhotoMetricDistortion")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up (default: min(1500, iters/10))")
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute Swin blocks (less memory)")
    p.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed")
    p.add_argument("--eval-interval", type=int, default=0)
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--resume", default=None, help="checkpoint folder (OUT/last_checkpoint) to continue from")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder (model folder + last_checkpoint/ + train_log.json)")


def run(args: argparse.Namespace) -> int:
    import torch

    import semask
    from ..data.datasets import SegmentationFolder, build_dataset
    from ..data.transforms import train_transforms
    from ..inference import model_cfg, normalization
    from ..metrics import format_metrics_table
    from ..train import TrainConfig, Trainer, init_distributed, set_dataset_cfg

    if args.data is None and args.format != "synthetic":
        raise SystemExit("error: --data DIR is required for --format " + args.format)
    rank, world, _ = init_distributed()
    try:
        overrides = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --model-kwargs is not valid JSON ({e})")
    probe = build_dataset(args.format, args.data, args.train_split)
    k = args.num_classes or (len(probe.classes) if getattr(probe, "classes", None) else None)
    if k is None:
        raise SystemExit("error: --num-classes K is required for --format folder")
    torch.manual_seed(args.seed)  # --seed also fixes the initialisation (torch seeds each process randomly)
    model = semask.create_model(args.model, pretrained=args.pretrained or False, num_classes=k,
                                pretrained_backbone=args.pretrained_backbone, **overrides)
    cfg = model_cfg(model)
    mean, std = normalization(cfg)  # 0..255 units for the training pipeline
    scale = tuple(args.scale) if args.scale else FORMAT_SCALES.get(args.format)
    if scale is None and args.format in ("camvid", "folder", "synthetic"):
        h, w = probe.load(0)["image"].shape[-2:]  # native size: augment around it
        scale = (max(h, w), min(h, w))
    tf = train_transforms(tuple(args.crop), scale, tuple(args.ratio_range), cat_max_ratio=args.cat_max_ratio,
                          photometric=not args.no_photometric, mean=mean, std=std)
    train_set = build_dataset(args.format, args.data, args.train_split, transforms=tf)
    val_set = build_dataset(args.format, args.data, args.val_split) if args.val_split else None
    for ds in (train_set, val_set):  # label ids >= K fail on load, naming the file (not inside the loss)
        if isinstance(ds, SegmentationFolder):
            ds.num_classes = k
    if val_set is not None and args.max_val_images:
        val_set = torch.utils.data.Subset(val_set, range(min(args.max_val_images, len(val_set))))
    names = list(probe.classes) if getattr(probe, "classes", None) and len(probe.classes) == k else None
    if names is None:
        names, _ = class_meta(model, k)
    palette = list(getattr(probe, "palette", None) or class_meta(model, k)[1])[:k]
    test_scale = tuple(args.scale) if args.scale else FORMAT_SCALES.get(args.format)
    set_dataset_cfg(model, args.format, names, palette, tuple(args.crop), test_scale,
                    reduce_zero_label=bool(getattr(probe, "reduce_zero_label", False)))
    warmup = args.warmup_iters if args.warmup_iters is not None else min(1500, args.iters // 10)
    tcfg = TrainConfig(iters=args.iters, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_iters=warmup, clip_grad=args.clip_grad, amp=args.amp,
                       grad_checkpointing=args.grad_checkpointing, freeze_bn=args.freeze_bn,
                       eval_interval=args.eval_interval, save_interval=args.save_interval, num_workers=args.workers,
                       seed=args.seed, progress=not args.no_progress)
    trainer = Trainer(model, train_set, tcfg, val_set=val_set, out_dir=args.out, num_classes=k, resume=args.resume)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"training {args.model} ({n / 1e6:.2f}M params, K={k}) on {len(train_set)} {args.format} images, "
              f"{args.iters} iterations x {args.batch_size * args.accum_steps * world} images, crop {tuple(args.crop)}")
    result = trainer.fit()
    if rank == 0:
        print(f"{result.images_per_s:.2f} training images/s; model saved to {args.out}")
        if val_set is not None:
            print(format_metrics_table(trainer.last_metrics, names))
    return 0
