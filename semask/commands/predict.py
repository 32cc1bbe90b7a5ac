"""``semask predict IMAGE... --model NAME[.tag] [--pretrained DIR|hf-hub:ID] --out DIR``.

Writes per image ``<stem>_labels.png`` (colour label map), ``<stem>_overlay.png`` (blended on
the image), ``<stem>_priors.png`` (argmax of each stage's semantic prior, side by side) and
``<stem>_ids.png`` (raw class ids, single channel).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_inference_args, add_model_args, class_meta, inference_kwargs, load_model, pick_device, \
    prediction_pictures, semantic_priors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    add_model_args(p, required=False)
    p.add_argument("--out", required=True, help="output folder")
    add_inference_args(p)


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    import semask
    from ..data.datasets import read_image
    from ..viz import save

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: image {missing[0]} does not exist")
    if not args.pretrained:
        print("note: no --pretrained given, so the model has random weights", flush=True)
    model = semask.optimize(load_model(args.model, args.pretrained).to(pick_device(args.device)).eval())
    k = int(getattr(model, "num_classes", 0)) or None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = inference_kwargs(args)
    for path in args.images:
        image = read_image(path)
        label = semask.predict(model, image, **kw)
        names, palette = class_meta(model, k or int(label.max()) + 1)
        priors = semantic_priors(model, image, resize=not args.no_resize)
        pics = prediction_pictures(image, label, priors, names, palette)
        stem = Path(path).stem
        save(pics["labels"], out / f"{stem}_labels.png")
        save(pics["overlay"], out / f"{stem}_overlay.png")
        if "priors" in pics:
            save(pics["priors"], out / f"{stem}_priors.png")
        Image.fromarray(label.to(torch.uint8 if label.max() < 256 else torch.int32).numpy()).save(out / f"{stem}_ids.png")
        ids, counts = label.unique(return_counts=True)
        top = sorted(zip(counts.tolist(), ids.tolist()), reverse=True)[:5]
        share = ", ".join(f"{names[i]} {100 * c / label.numel():.0f}%" for c, i in top)
        print(f"{path}: {tuple(label.shape)} -> {out / stem}_{{labels,overlay,priors,ids}}.png  [{share}]")
    return 0

