"""``semask.predict``: images in, label maps at the original size out.

Handles the tag's normalisation and keep-ratio test resize, whole-image or sliding-window
inference (mmseg's ``slide_inference``: overlapping crops, logits averaged by a count map) and
multi-scale + flip test-time augmentation (softmax probabilities averaged over the augmented
views, each resized back to the original size, like mmseg's ``aug_test``). Works with every
semask segmentor: ``model(images (B, 3, H, W)) -> logits (B, K, H, W)``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import accel
from .data.imageio import pil_to_array, read_image
from .data.transforms import keep_ratio_size, resize_image
from .core.registry import IMAGENET_MEAN_255, IMAGENET_STD_255

__all__ = ["predict", "to_image_tensor", "TTA_SCALES", "model_cfg", "normalization", "normalize_images",
           "resolve_autocast"]

TTA_SCALES: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
ImageInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Any]  # Any: PIL.Image.Image


def model_cfg(model: nn.Module) -> Dict[str, Any]:
    """The model's pretrained cfg as a dict ({} when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        return {}
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


def normalization(cfg: Dict[str, Any]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` in 0..255 pixel units from a pretrained cfg dict, whose values are in timm's
    0..1 units (configs saved by older versions hold 0..255 values: taken as they are); ImageNet's
    statistics when the cfg has none."""
    mean = tuple(float(v) for v in cfg.get("mean") or IMAGENET_MEAN_255)
    std = tuple(float(v) for v in cfg.get("std") or IMAGENET_STD_255)
    if max(mean) <= 1.0 and max(std) <= 1.0:
        mean, std = tuple(v * 255 for v in mean), tuple(v * 255 for v in std)
    return mean, std


def to_image_tensor(image: ImageInput) -> torch.Tensor:
    """One image -> float (3, H, W) RGB in 0..255.

    Accepts a path, a PIL image, an (H, W, 3) / (H, W) array (uint8 0..255, float 0..1) or a
    (3, H, W) tensor (uint8 0..255, float 0..1 as in torchvision).
    """
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).exists():
            raise FileNotFoundError(f"image file {image} does not exist")
        return read_image(image).float()
    if type(image).__module__.startswith("PIL"):
        image = pil_to_array(image)  # EXIF orientation, alpha, 16-bit and float modes as for files
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"numpy images must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # copy: PIL arrays are read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"cannot read an image from {type(image).__name__}; pass a path, PIL image, array or tensor")
    if image.ndim != 3 or image.shape[0] != 3:
        hint = " (channels-last? use .permute(2, 0, 1))" if image.ndim == 3 and image.shape[-1] == 3 else ""
        raise ValueError(f"image tensors must be (3, H, W), got {tuple(image.shape)}{hint}")
    if image.dtype == torch.uint8:
        return image.float()
    if not image.is_floating_point():
        raise TypeError(f"image tensors must be uint8 (0..255) or float (0..1), got {image.dtype}")
    if image.numel() and (float(image.max()) > 1.0 + 1e-3 or float(image.min()) < -1e-3):
        raise ValueError("float images must be in 0..1 (torchvision convention); pass uint8 for 0..255 data "
                         "or divide by 255")
    return image.float() * 255.0


def _as_list(images: Any) -> Tuple[List[torch.Tensor], bool]:
    """(list of (3, H, W) float tensors, whether the input was a single image)."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [to_image_tensor(im) for im in images], False
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return [to_image_tensor(im) for im in images], False
    return [to_image_tensor(images)], True


def normalize_images(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) 0..255 -> (x - mean) / std with 0..255-unit mean/std."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resolve_autocast(autocast: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if autocast is None or autocast is False:
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
    if autocast not in table:
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16' (or the torch dtype), got {autocast!r}")
    return table[autocast]


def _windows(size: int, crop: int, stride: int) -> List[int]:
    """mmseg's window starts: stride steps, the last window pushed back to end at the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


def _run(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])


_CUDA_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (MemoryError, _CUDA_OOM)) or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                         or "can't allocate memory" in text))


def _run_whole(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Whole-image logits; out of memory -> sliding windows of the tag's crop size (else 512)."""
    try:
        return _run(model, x, batch_size)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
    crop = model_cfg(model).get("crop_size") or 512
    crop = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    if x.shape[-2] <= crop[0] and x.shape[-1] <= crop[1]:
        raise MemoryError(f"out of memory predicting a {tuple(x.shape[-2:])} image even below the "
                          f"{crop} crop size; use a smaller batch_size or resize the image")
    warnings.warn(f"out of memory on the whole {x.shape[-2]}x{x.shape[-1]} image: falling back to sliding "
                  f"windows of {crop[0]}x{crop[1]} (pass mode='slide' to choose the crop)", RuntimeWarning)
    stride = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    return _slide_logits(model, x, crop, stride, batch_size)


def _slide_logits(model: nn.Module, x: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int],
                  batch_size: int) -> torch.Tensor:
    """Sliding-window logits (B, K, H, W): crops gathered and scattered back with flat indices."""
    b, c, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    ys = torch.tensor(_windows(h, ch, stride[0]), device=x.device)
    xs = torch.tensor(_windows(w, cw, stride[1]), device=x.device)
    oy, ox = torch.meshgrid(ys, xs, indexing="ij")
    dy = torch.arange(ch, device=x.device)[:, None] * w
    dx = torch.arange(cw, device=x.device)[None, :]
    idx = ((oy.reshape(-1, 1, 1) * w + ox.reshape(-1, 1, 1)) + dy + dx).reshape(-1)  # (n * ch * cw,)
    n = oy.numel()
    crops = x.flatten(2)[:, :, idx].reshape(b, c, n, ch, cw).permute(0, 2, 1, 3, 4).reshape(b * n, c, ch, cw)
    logits = _run(model, crops, batch_size)
    k = logits.shape[1]
    logits = logits.reshape(b, n, k, ch * cw).permute(0, 2, 1, 3).reshape(b, k, -1)
    acc = torch.zeros(b, k, h * w, device=x.device, dtype=logits.dtype).index_add_(2, idx, logits)
    count = torch.bincount(idx, minlength=h * w).to(logits.dtype)
    return (acc / count).reshape(b, k, h, w)


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: Union[ImageInput, Sequence[ImageInput]],
    *,
    mode: str = "whole",
    crop_size: Optional[Union[int, Tuple[int, int]]] = None,
    stride: Optional[Union[int, Tuple[int, int]]] = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    tta: bool = False,
    resize: Union[bool, Tuple[int, int], None] = True,
    return_probs: bool = False,
    autocast: Union[None, str, torch.dtype] = None,
    batch_size: int = 1,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    optimize: bool = True,
) -> Any:
    """Segment images; returns label maps (H, W) int64 at each image's original size.

    Args:
        model: a semask segmentor (``model(x) -> (B, K, H, W)`` logits); put in eval mode for the call.
        images: one image or a list (paths, PIL images, HWC uint8 arrays, (3, H, W) tensors, or a
            (B, 3, H, W) tensor). uint8 data is 0..255, float data 0..1.
        mode: ``"whole"`` or ``"slide"`` (overlapping ``crop_size`` windows moved by ``stride``;
            defaults: the tag's crop size and 2/3 of it).
        scales: test-scale ratios (``tta=True`` means ``TTA_SCALES`` and ``flip=True``, the paper's ms+flip).
        flip: also predict the mirrored image.
        resize: True applies the tag's keep-ratio ``test_scale`` (e.g. ADE20K (2048, 512)); a
            (long, short) pair sets it; False/None feeds images at their size (times ``scales``).
        return_probs: also return class probabilities (K, H, W) (softmax, averaged over views).
        autocast: None, ``"bf16"`` (CPU/GPU) or ``"fp16"`` (GPU).
        batch_size: images (or crops) per forward pass; same-size images are batched together.
        mean: override the tag's normalisation mean (0..255 units).
        std: override the tag's normalisation std (0..255 units).
        optimize: run the CPU fast paths of :func:`semask.optimize` (same outputs); a model that is
            not optimized yet is optimized for the call and restored afterwards.

    With ``mode="whole"``, an image whose forward pass runs out of memory is predicted again with
    sliding windows (the tag's crop size, else 512), with a warning.

    Returns:
        A LongTensor (H, W) for a single image, else a list; with ``return_probs`` a tuple
        ``(labels, probs)`` shaped the same way.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model_cfg(model)
    cfg_mean, cfg_std = normalization(cfg)
    mean = tuple(mean if mean is not None else cfg_mean)
    std = tuple(std if std is not None else cfg_std)
    test_scale = cfg.get("test_scale") if resize is True else (tuple(resize) if resize else None)
    if tta:
        scales, flip = TTA_SCALES, True
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive ratios, got {scales}")
    crop = stride_hw = None
    if mode == "slide":
        crop = crop_size if crop_size is not None else cfg.get("crop_size")
        if crop is None:
            raise ValueError("mode='slide' needs crop_size (the model has no pretrained cfg with one)")
        crop = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        stride_hw = stride if stride is not None else (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
        stride_hw = (stride_hw, stride_hw) if isinstance(stride_hw, int) else tuple(stride_hw)
    dtype = resolve_autocast(autocast)
    device = next(model.parameters()).device

    tensors, single = _as_list(images)
    labels: List[Optional[torch.Tensor]] = [None] * len(tensors)
    probs: List[Optional[torch.Tensor]] = [None] * len(tensors)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
    was_training = model.training
    model.eval()
    restore = optimize and device.type == "cpu" and not accel.is_optimized(model)
    if restore:
        accel.optimize(model)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with amp:
            for (h, w), members in groups.items():
                for j in range(0, len(members), batch_size):
                    ids = members[j:j + batch_size]
                    x = torch.stack([tensors[i] for i in ids]).to(device)
                    out = _predict_batch(model, x, mode, crop, stride_hw, scales, flip, test_scale, mean, std,
                                         batch_size, soft=return_probs or len(scales) > 1 or flip)
                    for k, i in enumerate(ids):
                        labels[i] = out[k].argmax(0).cpu()
                        if return_probs:
                            probs[i] = out[k].cpu()
    finally:
        model.train(was_training)
        if restore:
            accel.restore(model)
    if single:
        return (labels[0], probs[0]) if return_probs else labels[0]
    return (labels, probs) if return_probs else labels


def _predict_batch(model: nn.Module, x: torch.Tensor, mode: str, crop, stride, scales: Sequence[float], flip: bool,
                   test_scale, mean, std, batch_size: int, soft: bool) -> torch.Tensor:
    """(B, 3, H, W) 0..255 -> (B, K, H, W): logits (single view) or averaged probabilities."""
    h, w = x.shape[-2:]
    total: Optional[torch.Tensor] = None
    views = 0
    for r in scales:
        if test_scale is not None:
            size = keep_ratio_size(h, w, (int(test_scale[0] * r), int(test_scale[1] * r)))
        else:
            size = (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5)))
        xs = normalize_images(resize_image(x, size), mean, std)
        for flipped in (False, True) if flip else (False,):
            inp = xs.flip(-1) if flipped else xs
            if mode == "slide":
                logits = _slide_logits(model, inp, crop, stride, batch_size)
            else:
                logits = _run_whole(model, inp, batch_size)
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False) \
                if logits.shape[-2:] != (h, w) else logits
            if flipped:
                logits = logits.flip(-1)
            out = logits.softmax(1) if soft else logits
            total = out if total is None else total + out
            views += 1
    return total / views if views > 1 else total

