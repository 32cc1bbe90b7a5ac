"""Helpers shared by the predict / eval / train / demo commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..inference import model_cfg, normalization, normalize_images
from ..data.transforms import keep_ratio_size, resize_image

# per dataset format: (keep-ratio training/test scale (long, short) or None for native size)
FORMAT_SCALES: Dict[str, Optional[Tuple[int, int]]] = {
    "ade20k": (2048, 512), "coco_stuff10k": (2048, 512), "cityscapes": (2048, 1024), "camvid": None,
    "folder": None, "synthetic": None,
}


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="registered name[.tag], e.g. semask_swin_tiny_fpn.ade20k")
    p.add_argument("--pretrained", default=None, help="weights: a model folder, a .safetensors file or hf-hub:ORG/REPO")


def add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true", help="multi-scale (0.5-1.75) + flip test-time augmentation")
    p.add_argument("--sliding", action="store_true", help="sliding-window inference with --crop/--stride")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None, help="sliding-window crop")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=None, help="sliding-window stride")
    p.add_argument("--no-resize", action="store_true", help="skip the tag's keep-ratio test resize")
    p.add_argument("--batch-size", type=int, default=1, help="images (or crops) per forward pass")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def inference_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(tta=args.tta, mode="slide" if args.sliding else "whole", autocast=args.amp,
                              batch_size=args.batch_size, resize=not args.no_resize)
    if args.crop:
        kw["crop_size"] = tuple(args.crop)
    if args.stride:
        kw["stride"] = tuple(args.stride)
    return kw


def pick_device(name: Optional[str]) -> torch.device:
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: Optional[str], pretrained: Optional[str], num_classes: Optional[int] = None,
               **kwargs: Any) -> nn.Module:
    """``create_model(name, pretrained=...)``; with no name, rebuild what the folder / repo saved."""
    import semask

    if not name:
        if not pretrained:
            raise SystemExit("error: give --model NAME (and/or --pretrained DIR|hf-hub:ID)")
        from ..hub import from_pretrained

        return from_pretrained(pretrained, num_classes, **kwargs)
    return semask.create_model(name, pretrained=pretrained or False, num_classes=num_classes, **kwargs)


def class_meta(model: nn.Module, num_classes: int) -> Tuple[List[str], List[Tuple[int, int, int]]]:
    """Class names and palette from the model's cfg (or its dataset's), else generated ones."""
    from ..data.classes import get_dataset_meta
    from ..viz import default_palette

    cfg = model_cfg(model)
    names, palette = cfg.get("class_names"), cfg.get("palette")
    if (not names or not palette) and cfg.get("dataset"):
        try:
            ds_names, ds_pal = get_dataset_meta(cfg["dataset"])
            names, palette = names or ds_names, palette or ds_pal
        except ValueError:
            pass
    if not names or len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    if not palette or len(palette) < num_classes:
        palette = default_palette(num_classes)
    return list(names), [tuple(int(c) for c in col) for col in palette]


@torch.inference_mode()
def semantic_priors(model: nn.Module, image: torch.Tensor, resize: bool = True) -> List[torch.Tensor]:
    """Per-stage prior logits (K, h_i, w_i) of one (3, H, W) 0..255 image (empty when the model has
    none), fed as ``predict`` feeds it (tag normalisation and test resize)."""
    if not hasattr(model, "forward_all"):
        return []
    cfg = model_cfg(model)
    x = image.float()[None].to(next(model.parameters()).device)
    if resize and cfg.get("test_scale"):
        x = resize_image(x, keep_ratio_size(*x.shape[-2:], cfg["test_scale"]))
    was = model.training
    model.eval()
    try:
        out = model.forward_all(normalize_images(x, *normalization(cfg)))
    finally:
        model.train(was)
    return [p[0].float().cpu() for p in (out.get("priors") or [])]


def prediction_pictures(image: torch.Tensor, label: torch.Tensor, priors: Sequence[torch.Tensor],
                        names: Sequence[str], palette: Sequence[Sequence[int]],
                        truth: Optional[torch.Tensor] = None, zoom: int = 1) -> Dict[str, np.ndarray]:
    """``labels`` (colour map), ``overlay``, ``priors`` (stage maps side by side, absent without
    priors) and ``panel`` (image | [truth] | prediction | priors, with a legend); ``zoom`` enlarges
    the panel tiles (nearest) for small images."""
    from .. import viz

    h, w = label.shape
    img = viz._hwc_image(image)
    out = {"labels": viz.colorize(label, palette), "overlay": viz.overlay(img, label, palette)}
    present = set(label.unique().tolist()) | (set(truth.unique().tolist()) if truth is not None else set())
    for p in priors:
        present |= set(p.argmax(0).unique().tolist())
    present = sorted(present)
    foot = viz.legend(names, palette, width=max(4 * w * zoom, 360), present=[c for c in present if c != 255])
    stage_maps = viz.prior_maps(priors, palette, size=(h, w)) if priors else []
    stage_titles = [f"prior {i + 1} (1/{4 * 2 ** i})" for i in range(len(stage_maps))]
    if stage_maps:
        out["priors"] = viz.make_panel(stage_maps, stage_titles, footer=foot)
    big = lambda a: a.repeat(zoom, axis=0).repeat(zoom, axis=1) if zoom > 1 else a  # noqa: E731
    stage_maps = [big(m) for m in stage_maps]
    tiles = [big(img)] + ([big(viz.colorize(truth, palette))] if truth is not None else []) + [big(out["labels"])] + stage_maps
    titles = ["image"] + (["ground truth"] if truth is not None else []) + ["prediction"] + stage_titles
    out["panel"] = viz.make_panel(tiles, titles, footer=foot)
    return out


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
