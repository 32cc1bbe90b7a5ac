"""The official (mmseg) training and test transforms, as composable callables on sample dicts.

A sample is ``{"image": Tensor (3, H, W), "label": LongTensor (H, W) or absent, ...}``. Images are
uint8 or float in 0..255 RGB until :class:`Normalize`. Randomness comes from torch's global
generator, so ``torch.manual_seed`` (and DataLoader worker seeding) makes pipelines reproducible.
Resizing follows mmcv: bilinear without antialiasing for images, nearest for labels.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..core.registry import IMAGENET_MEAN_255, IMAGENET_STD_255

__all__ = [
    "Compose", "Resize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion", "Normalize", "Pad",
    "ToFloat", "keep_ratio_size", "resize_image", "resize_label", "train_transforms",
]

Sample = Dict[str, Any]
Size = Tuple[int, int]


def _pair(v: Union[int, Sequence[int]]) -> Size:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair (H, W), got {v!r}")
    return (int(v[0]), int(v[1]))


def keep_ratio_size(h: int, w: int, scale: Sequence[float]) -> Size:
    """mmcv ``imrescale``: the largest (H, W) with long edge <= max(scale), short edge <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize of a (..., C, H, W) image (float result, 0..255 kept; no antialiasing, like cv2)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    x = image.float()
    squeeze = x.ndim == 3
    out = F.interpolate(x[None] if squeeze else x, size=size, mode="bilinear", align_corners=False)
    return out[0] if squeeze else out


def resize_label(label: torch.Tensor, size: Size) -> torch.Tensor:
    """Nearest resize of an (H, W) label map (torch 'nearest' = cv2 INTER_NEAREST)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)


def _check_pair(sample: Sample, where: str) -> None:
    """A label map must have its image's size: resizing one to the other would silently misalign them."""
    label = sample.get("label")
    if label is not None and tuple(label.shape[-2:]) != tuple(sample["image"].shape[-2:]):
        path = f" ({sample['path']})" if sample.get("path") else ""
        raise ValueError(
            f"{where}: the label map is {tuple(label.shape[-2:])} but the image is "
            f"{tuple(sample['image'].shape[-2:])} (H, W){path}; a label map must have its image's size "
            "(fix the image/label pairing, or resize the label with nearest-neighbour interpolation first)")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t!r},\n" for t in self.transforms) + ")"


class Resize:
    """Keep-ratio resize to ``scale`` = (long, short) edge limits, times a random ratio.

    ``ratio_range=(lo, hi)`` draws the ratio uniformly (mmseg ``ratio_range``); ``ratios=[...]``
    picks one from a list (the SeMask fork's list mode, e.g. ADE20K's 0.5..1.75). With neither,
    the ratio is 1. ``keep_ratio=False`` resizes to exactly ``scale`` read as (W, H), like mmcv.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Optional[Tuple[float, float]] = None,
                 ratios: Optional[Sequence[float]] = None, keep_ratio: bool = True) -> None:
        if ratio_range is not None and ratios is not None:
            raise ValueError("give either ratio_range=(lo, hi) or ratios=[...], not both")
        self.scale = tuple(scale)
        self.ratio_range = ratio_range
        self.ratios = tuple(ratios) if ratios is not None else None
        self.keep_ratio = keep_ratio

    def _ratio(self) -> float:
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            return lo + (hi - lo) * float(torch.rand(()))
        if self.ratios is not None:
            return self.ratios[int(torch.randint(len(self.ratios), ()))]
        return 1.0

    def __call__(self, sample: Sample) -> Sample:
        _check_pair(sample, "Resize")
        r = self._ratio()
        scale = (int(self.scale[0] * r), int(self.scale[1] * r))
        h, w = sample["image"].shape[-2:]
        size = keep_ratio_size(h, w, scale) if self.keep_ratio else (scale[1], scale[0])
        sample = dict(sample, image=resize_image(sample["image"], size))
        if sample.get("label") is not None:
            sample["label"] = resize_label(sample["label"], size)
        return sample

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, ratio_range={self.ratio_range}, ratios={self.ratios})"


class RandomCrop:
    """Random crop of at most ``crop_size``; with ``cat_max_ratio < 1`` retries (up to 10 times,
    like mmseg) until no single class covers more than that share of the crop's labelled pixels."""

    def __init__(self, crop_size: Union[int, Sequence[int]], cat_max_ratio: float = 1.0, ignore_index: int = 255) -> None:
        self.crop_size = _pair(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _box(self, h: int, w: int) -> Tuple[int, int, int, int]:
        ch, cw = self.crop_size
        y = int(torch.randint(max(h - ch, 0) + 1, ()))
        x = int(torch.randint(max(w - cw, 0) + 1, ()))
        return y, min(y + ch, h), x, min(x + cw, w)

    def __call__(self, sample: Sample) -> Sample:
        _check_pair(sample, "RandomCrop")
        h, w = sample["image"].shape[-2:]
        box = self._box(h, w)
        label = sample.get("label")
        if self.cat_max_ratio < 1.0 and label is not None:
            for _ in range(10):
                crop = label[box[0]:box[1], box[2]:box[3]]
                counts = torch.bincount(crop[crop != self.ignore_index].flatten().long())
                counts = counts[counts > 0]
                if counts.numel() > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._box(h, w)
        y1, y2, x1, x2 = box
        sample = dict(sample, image=sample["image"][..., y1:y2, x1:x2])
        if label is not None:
            sample["label"] = label[y1:y2, x1:x2]
        return sample

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: Sample) -> Sample:
        _check_pair(sample, "RandomFlip")
        if float(torch.rand(())) >= self.prob:
            return sample
        sample = dict(sample, image=sample["image"].flip(-1))
        if sample.get("label") is not None:
            sample["label"] = sample["label"].flip(-1)
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB 0..255 -> H in degrees [0, 360), S in [0, 1], V in 0..255."""
    r, g, b = img.unbind(0)
    v, _ = img.max(0)
    c = v - img.min(0).values
    s = torch.where(v > 0, c / v.clamp_min(1e-8), torch.zeros_like(v))
    cs = c.clamp_min(1e-8)
    hue = torch.where(v == r, (g - b) / cs, torch.where(v == g, 2.0 + (b - r) / cs, 4.0 + (r - g) / cs))
    hue = torch.where(c > 0, (hue * 60.0) % 360.0, torch.zeros_like(hue))
    return torch.stack([hue, s, v])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    k = (torch.tensor([5.0, 3.0, 1.0], device=hsv.device)[:, None, None] + h / 60.0) % 6.0
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on 0..255 RGB: random brightness, contrast (before or after),
    saturation and hue, each with probability 0.5, values clipped to 0..255 after each step."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(2, ()))

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def _contrast(self, img: torch.Tensor) -> torch.Tensor:
        if self._coin():
            img = (img * self._uniform(*self.contrast_range)).clamp(0, 255)
        return img

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"].float()
        if self._coin():
            img = (img + self._uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_first = self._coin()
        if contrast_first:
            img = self._contrast(img)
        do_sat, do_hue = self._coin(), self._coin()
        if do_sat or do_hue:
            hsv = _rgb_to_hsv(img)
            if do_sat:
                hsv[1] = (hsv[1] * self._uniform(*self.saturation_range)).clamp(0, 1)
            if do_hue:  # mmseg shifts OpenCV's 0..180 hue by an int in [-18, 18]: 2 degrees per step
                hsv[0] = (hsv[0] + 2.0 * int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()))) % 360.0
            img = _hsv_to_rgb(hsv).clamp(0, 255)
        if not contrast_first:
            img = self._contrast(img)
        return dict(sample, image=img)

    def __repr__(self) -> str:
        return f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, hue_delta={self.hue_delta})"


class ToFloat:
    """Cast the image to float32 (0..255 kept)."""

    def __call__(self, sample: Sample) -> Sample:
        return dict(sample, image=sample["image"].float())


class Normalize:
    """(image - mean) / std with per-channel mean/std in 0..255 RGB units."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN_255, std: Sequence[float] = IMAGENET_STD_255) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        return dict(sample, image=(sample["image"].float() - self.mean) / self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class Pad:
    """Pad bottom/right to ``size`` (image with ``pad_val``, label with ``seg_pad_val``)."""

    def __init__(self, size: Union[int, Sequence[int]], pad_val: float = 0.0, seg_pad_val: int = 255) -> None:
        self.size = _pair(size)
        self.pad_val = pad_val
        self.seg_pad_val = seg_pad_val

    def __call__(self, sample: Sample) -> Sample:
        _check_pair(sample, "Pad")
        h, w = sample["image"].shape[-2:]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if not (ph or pw):
            return sample
        sample = dict(sample, image=F.pad(sample["image"], (0, pw, 0, ph), value=self.pad_val))
        if sample.get("label") is not None:
            sample["label"] = F.pad(sample["label"], (0, pw, 0, ph), value=self.seg_pad_val)
        return sample

    def __repr__(self) -> str:
        return f"Pad(size={self.size}, seg_pad_val={self.seg_pad_val})"


def train_transforms(
    crop_size: Union[int, Sequence[int]] = 512,
    scale: Optional[Sequence[int]] = (2048, 512),
    ratio_range: Optional[Tuple[float, float]] = (0.5, 2.0),
    ratios: Optional[Sequence[float]] = None,
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
    ignore_index: int = 255,
) -> Compose:
    """The official training pipeline: Resize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion
    -> Normalize -> Pad (image 0, label ``ignore_index``). ``scale=None`` skips the resize."""
    ts: List[Callable[[Sample], Sample]] = []
    if scale is not None:
        ts.append(Resize(scale, ratio_range=None if ratios is not None else ratio_range, ratios=ratios))
    ts += [RandomCrop(crop_size, cat_max_ratio, ignore_index), RandomFlip(flip_prob)]
    if photometric:
        ts.append(PhotoMetricDistortion())
    ts += [Normalize(mean, std), Pad(crop_size, 0.0, ignore_index)]
    return Compose(ts)

