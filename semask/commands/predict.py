"""``semask predict IMAGE... --model NAME[.tag] [--pretrained DIR|hf-hub:ID] --out DIR``.

Writes per image ``<stem>_labels.png`` (colour label map), ``<stem>_overlay.png`` (blended on
the image), ``<stem>_priors.png`` (argmax of each stage's semantic prior, side by side) and
``<stem>_ids.png`` (raw class ids, single channel).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_inference_args, add_model_args, class_meta, inference_kwargs, load_model, pick_device, \
    prediction_pictures, semantic_priors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files or folders (every image in a folder, recursively)")
    add_model_args(p, required=False)
    p.add_argument("--out", required=True, help="output folder")
    add_inference_args(p)


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    import semask
    from ..data.datasets import IMAGE_EXTS, read_image
    from ..data.imageio import ImageReadError
    from ..viz import save

    missing = [p for p in args.images if not Path(p).exists()]
    if missing:
        raise SystemExit(f"error: image {missing[0]} does not exist")
    inputs = []  # (path, output stem: folder inputs keep their relative sub-folders)
    for arg in map(Path, args.images):
        if not arg.is_dir():
            inputs.append((arg, arg.stem))
            continue
        found = sorted(q for q in arg.rglob("*") if q.is_file() and q.name.lower().endswith(IMAGE_EXTS))
        if not found:
            raise SystemExit(f"error: folder {arg} has no images ({', '.join(IMAGE_EXTS)})")
        inputs += [(q, str(q.relative_to(arg).with_suffix(""))) for q in found]
    if not args.pretrained:
        print("note: no --pretrained given, so the model has random weights", flush=True)
    model = semask.optimize(load_model(args.model, args.pretrained).to(pick_device(args.device)).eval())
    k = int(getattr(model, "num_classes", 0)) or None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = inference_kwargs(args)
    skipped = []
    for path, stem in inputs:
        try:
            image = read_image(path)
        except ImageReadError as e:  # one unreadable file does not abort the batch
            print(f"semask predict: warning: skipped: {e}", file=sys.stderr, flush=True)
            skipped.append(path)
            continue
        label = semask.predict(model, image, **kw)
        names, palette = class_meta(model, k or int(label.max()) + 1)
        priors = semantic_priors(model, image, resize=not args.no_resize)
        pics = prediction_pictures(image, label, priors, names, palette)
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        save(pics["labels"], out / f"{stem}_labels.png")
        save(pics["overlay"], out / f"{stem}_overlay.png")
        if "priors" in pics:
            save(pics["priors"], out / f"{stem}_priors.png")
        Image.fromarray(label.to(torch.uint8 if label.max() < 256 else torch.int32).numpy()).save(out / f"{stem}_ids.png")
        ids, counts = label.unique(return_counts=True)
        top = sorted(zip(counts.tolist(), ids.tolist()), reverse=True)[:5]
        share = ", ".join(f"{names[i]} {100 * c / label.numel():.0f}%" for c, i in top)
        print(f"{path}: {tuple(label.shape)} -> {out / stem}_{{labels,overlay,priors,ids}}.png  [{share}]")
    if skipped:
        print(f"semask predict: {len(skipped)} of {len(inputs)} images could not be read and were skipped",
              file=sys.stderr)
        return 1
    return 0

