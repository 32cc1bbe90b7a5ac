"""Finetune a SeMask model on CamVid (or any images + masks folder) with a plain PyTorch loop.

Copy this file and adapt it: everything is visible here (data, model, optimizer, schedule, AMP,
evaluation, saving). For multi-GPU training, resumable checkpoints and progress bars use
``semask train`` (or ``torchrun --nproc_per_node N -m semask.cli train ...``), which runs the same
recipe.

    python examples/finetune.py --data ../shared/data/camvid --iters 2000 --out camvid_model
"""
import argparse
import contextlib
import json

import torch
from torch.utils.data import DataLoader

import semask
from semask.data import CamVidDataset, collate_samples
from semask.data.transforms import train_transforms
from semask.train import set_dataset_cfg

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="../shared/data/camvid", help="CamVid root (train/ and val/ folders)")
parser.add_argument("--model", default="semask_swin_tiny_fpn")
parser.add_argument("--pretrained", default=None, help="start from a model folder or hf-hub:ORG/REPO")
parser.add_argument("--model-kwargs", default="{}", help='e.g. \'{"embed_dim": 32, "depths": [2, 2, 2, 2]}\'')
parser.add_argument("--iters", type=int, default=2000)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation")
parser.add_argument("--crop", type=int, nargs=2, default=(360, 480))
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--weight-decay", type=float, default=0.01)
parser.add_argument("--warmup-iters", type=int, default=100)
parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
parser.add_argument("--grad-checkpointing", action="store_true")
parser.add_argument("--eval-every", type=int, default=500)
parser.add_argument("--eval-images", type=int, default=None, help="score on the first N val images")
parser.add_argument("--out", default="camvid_model")
args = parser.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)

# 1. data: the official augmentations (random resize 0.5-2x, crop, flip, colour jitter, normalise, pad)
train_set = CamVidDataset(args.data, "train", transforms=train_transforms(
    crop_size=args.crop, scale=(480, 360), ratio_range=(0.5, 2.0), cat_max_ratio=0.75))
val_set = CamVidDataset(args.data, "val")  # raw images: semask.predict normalises them
loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True, num_workers=2,
                    collate_fn=collate_samples)
num_classes = len(train_set.classes)

# 2. model: new classifier and semantic-layer class tokens for 11 classes, everything else kept
model = semask.create_model(args.model, pretrained=args.pretrained or False, num_classes=num_classes,
                            **json.loads(args.model_kwargs)).to(device)
# record classes, colours and the test policy (native size) in the config saved with the weights
set_dataset_cfg(model, "camvid", train_set.classes, train_set.palette, crop_size=args.crop, test_scale=None)
if args.grad_checkpointing:
    model.backbone.set_grad_checkpointing(True)

# 3. optimizer: AdamW without weight decay on norms / position biases; poly decay after a linear warm-up
optimizer = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr)


def lr_factor(it):
    warmup = min(1.0, (it + 1) / args.warmup_iters) if args.warmup_iters else 1.0
    return warmup * (1 - it / args.iters)


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")


def evaluate():
    n = args.eval_images or len(val_set)
    metric = semask.SegmentationMetric(num_classes)
    for i in range(n):
        sample = val_set[i]
        metric.update(semask.predict(model, sample["image"], autocast=args.amp), sample["label"])
    return metric.compute()


# 4. train: one iteration = one optimizer step over accum_steps batches
batches = iter(loader)
for it in range(args.iters):
    model.train()
    for _ in range(args.accum_steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        images, labels = batch["image"].to(device), batch["label"].to(device)
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with amp:
            losses = model(images, labels)  # {"loss", "loss_ce", "loss_cate" (semantic prior CE), "logits"}
        scaler.scale(losses["loss"] / args.accum_steps).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if it % 20 == 0:
        print(f"iter {it:5d}  loss {losses['loss'].item():.3f} (semantic {losses['loss_cate'].item():.3f})  "
              f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
    if (it + 1) % args.eval_every == 0 or it + 1 == args.iters:
        m = evaluate()
        print(f"iter {it + 1}: val mIoU {100 * m['mIoU']:.2f}  aAcc {100 * m['aAcc']:.2f}", flush=True)

# 5. save: config.json + model.safetensors; reload with semask.create_model(args.model, pretrained=args.out)
semask.save_pretrained(model, args.out)
print(f"saved to {args.out}")
