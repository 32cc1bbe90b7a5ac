"""``semask demo``: SeMask end to end in about two minutes on a laptop CPU, offline.

1. builds a small SeMask Swin FPN model from scratch,
2. scores it on held-out scenes (it knows nothing yet),
3. trains it on procedurally generated street-like scenes (or ``--data DIR --format FMT``),
4. scores it again, saves it with ``save_pretrained`` and reloads it with
   ``create_model(..., pretrained=folder)``,
5. draws image | ground truth | prediction | the semantic prior map of every stage.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

# a small SeMask Swin: every stage has its semantic layer, like the full-size models
DEMO_MODEL = "semask_swin_tiny_fpn"
DEMO_KWARGS = dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6), window_size=4, fpn_channels=32,
                   drop_path_rate=0.0, decoder_dropout=0.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="semask_demo", help="output folder (default: ./semask_demo)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default 150; 30 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run (CI): fewer iterations and scenes")
    p.add_argument("--data", default=None, help="train on a dataset folder instead of the built-in scenes")
    p.add_argument("--format", default="folder", choices=["camvid", "ade20k", "cityscapes", "coco_stuff10k", "folder"],
                   help="layout of --data")
    p.add_argument("--size", type=int, default=64, help="scene / crop size in pixels")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    import semask
    from ..data.datasets import build_dataset
    from ..data.synthetic import SyntheticScenes
    from ..data.transforms import Compose, Normalize, RandomFlip, train_transforms
    from ..hub import save_pretrained
    from ..metrics import format_metrics_table
    from ..train import TrainConfig, Trainer, evaluate, set_dataset_cfg
    from ..viz import save
    from ._common import prediction_pictures, semantic_priors

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iters = args.iters or (30 if args.quick else 150)
    size = args.size
    if args.data:
        probe = build_dataset(args.format, args.data, "train")
        names = list(probe.classes or [])
        palette = list(probe.palette or [])
        h, w = probe.load(0)["image"].shape[-2:]
        scale = (max(h, w), min(h, w))
        train_set = build_dataset(args.format, args.data, "train",
                                  transforms=train_transforms(size, scale, (0.5, 1.0), cat_max_ratio=1.0))
        val_set = build_dataset(args.format, args.data, "val")
        what = f"{len(train_set)} images from {args.data}"
    else:
        names, palette = list(SyntheticScenes.classes), list(SyntheticScenes.palette)
        train_set = SyntheticScenes(48 if args.quick else 256, (size, size), "train", args.seed,
                                    transforms=Compose([RandomFlip(0.5), Normalize()]))
        val_set = SyntheticScenes(8 if args.quick else 32, (size, size), "val", args.seed)
        what = f"{len(train_set)} generated street scenes ({size}x{size} px)"
    if not names:
        raise SystemExit("error: the dataset has no class names; use semask train for --format folder data")
    k = len(names)

    model = semask.create_model(DEMO_MODEL, num_classes=k, **DEMO_KWARGS)
    set_dataset_cfg(model, "synthetic" if not args.data else args.format, names, palette, (size, size))
    n_params = sum(p.numel() for p in model.parameters())
    _say("SeMask demo: semantic segmentation with semantic-prior attention, all on this machine")
    _say(f"  model : {DEMO_MODEL} scaled down to {n_params / 1e6:.2f}M parameters, {k} classes "
         f"({', '.join(names)})")
    _say(f"  data  : {what}; {len(val_set)} held-out images for scoring")
    _say(f"  output: {out.resolve()}")
    _say()

    eval_kw = dict(batch_size=16, resize=False)
    before = evaluate(model, val_set, k, **eval_kw)
    _say(f"[1/4] untrained model        mIoU {100 * float(before['mIoU']):5.1f}%   (guessing)")

    cfg = TrainConfig(iters=iters, batch_size=args.batch_size, lr=args.lr, weight_decay=0.01,
                      warmup_iters=min(20, iters // 10), num_workers=0, seed=args.seed,
                      progress=not args.no_progress)
    _say(f"[2/4] training {iters} iterations of {args.batch_size} images (AdamW, poly lr, CE + 0.4 x semantic CE) ...")
    trainer = Trainer(model, train_set, cfg, num_classes=k)
    res = trainer.fit()
    after = evaluate(model, val_set, k, **eval_kw)
    _say(f"      trained model          mIoU {100 * float(after['mIoU']):5.1f}%   "
         f"({res.seconds:.0f} s, {res.images_per_s:.0f} images/s, loss {res.history[0]['loss']:.2f} -> "
         f"{res.history[-1]['loss']:.2f})")
    _say("\n" + "\n".join("      " + line for line in format_metrics_table(after, names).splitlines()))

    model_dir = out / "model"
    save_pretrained(model, model_dir)
    reloaded = semask.create_model(DEMO_MODEL, pretrained=str(model_dir)).eval()
    samples = [val_set[i] for i in range(min(4, len(val_set)))]
    images = [s["image"] for s in samples]
    preds = semask.predict(model, images, resize=False, batch_size=4)
    preds_reloaded = semask.predict(reloaded, images, resize=False, batch_size=4)
    same = all(torch.equal(a, b) for a, b in zip(preds, preds_reloaded))
    _say(f"[3/4] saved to {model_dir}/ (config.json + model.safetensors) and reloaded with "
         f"create_model({DEMO_MODEL!r}, pretrained=...): predictions {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit("error: the reloaded model predicts differently")

    pic_dir = out / "predictions"
    pic_dir.mkdir(exist_ok=True)
    for i, (s, pred) in enumerate(zip(samples, preds_reloaded)):
        priors = semantic_priors(reloaded, s["image"], resize=False)
        pics = prediction_pictures(s["image"], pred, priors, names, palette, truth=s["label"],
                                   zoom=max(1, 192 // max(s["image"].shape[-2:])))
        save(pics["panel"], pic_dir / f"scene_{i}.png")
    _say(f"[4/4] pictures: {pic_dir}/scene_*.png  (image | ground truth | prediction | prior of stage 1..4:")
    _say("      each stage's semantic layer predicts classes from its own features; deeper stages are coarser)")
    _say()
    gain = 100 * (float(after["mIoU"]) - float(before["mIoU"]))
    _say(f"mIoU before: {100 * float(before['mIoU']):.1f}%  after: {100 * float(after['mIoU']):.1f}%  "
         f"(+{gain:.1f} points) in {time.perf_counter() - t_start:.0f} s")
    _say(f"next: semask predict IMAGE --model {DEMO_MODEL} --pretrained {model_dir} --out preds/")
    return 0

