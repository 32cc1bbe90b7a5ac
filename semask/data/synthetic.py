"""Procedurally generated street-like scenes: the built-in data set of ``semask demo``.

Each scene has a sky, a horizon, grass, a road narrowing towards the horizon, buildings standing
on the horizon and round trees. Colours are jittered per scene and per pixel, so a model must use
shape and context, not only colour. Scene ``i`` of a split is a pure function of ``(seed, split,
i)``: no files, no network, identical on every machine.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ["SCENE_CLASSES", "SCENE_PALETTE", "SyntheticScenes", "make_scene"]

SCENE_CLASSES: Tuple[str, ...] = ("sky", "building", "road", "grass", "tree")
SCENE_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (70, 130, 180), (180, 80, 60), (128, 64, 128), (152, 251, 152), (30, 110, 30),
)
# mean RGB of each class in the rendered image (different from the palette used for drawing labels)
_BASE = torch.tensor([[120.0, 170.0, 230.0], [150.0, 110.0, 90.0], [105.0, 105.0, 110.0],
                      [110.0, 170.0, 80.0], [50.0, 110.0, 55.0]])
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_029}


def _u(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def make_scene(size: Tuple[int, int] = (64, 64), generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One scene: (uint8 image (3, H, W), label (H, W) int64 in 0..4)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    h, w = size
    yy = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) / h
    xx = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) / w
    horizon = float(_u(g, 0.35, 0.6))
    label = torch.where(yy < horizon, 0, 3)  # sky above, grass below
    # road: a trapezoid from the bottom edge to a vanishing point on the horizon
    vx, half = float(_u(g, 0.3, 0.7)), float(_u(g, 0.25, 0.45))
    t = ((yy - horizon) / (1 - horizon)).clamp(min=0)
    label = torch.where((yy >= horizon) & ((xx - vx).abs() < half * t + 0.01), 2, label)
    # buildings standing on the horizon
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        x0, bw, top = float(_u(g, -0.1, 0.9)), float(_u(g, 0.12, 0.3)), float(_u(g, 0.05, horizon - 0.1))
        label = torch.where((xx >= x0) & (xx < x0 + bw) & (yy >= top) & (yy < horizon + 0.02), 1, label)
    # round trees in front
    for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
        cx, cy, r = float(_u(g, 0, 1)), float(_u(g, horizon - 0.15, horizon + 0.05)), float(_u(g, 0.05, 0.12))
        label = torch.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 4, label)
    colours = _BASE + 25 * (torch.rand(5, 3, generator=g) - 0.5)  # per-scene colour jitter
    img = colours[label].permute(2, 0, 1)
    img = img * (0.85 + 0.3 * yy)  # lighting gradient
    # buildings get windows (a texture cue), everything gets pixel noise
    windows = ((xx * w).long() % 4 < 2) & ((yy * h).long() % 5 < 2) & (label == 1)
    img = torch.where(windows, img * 0.6, img)
    img = img + 12 * torch.randn(3, h, w, generator=g)
    return img.clamp(0, 255).round().to(torch.uint8), label.long()


class SyntheticScenes(Dataset):
    """``num_images`` procedurally generated scenes of ``size`` (H, W) with 5 classes.

    Returns the same sample dicts as the folder datasets (``image`` uint8 (3, H, W), ``label``
    (H, W), ``path``), passed through ``transforms``.
    """

    classes = SCENE_CLASSES
    palette = SCENE_PALETTE
    ignore_index = 255
    reduce_zero_label = False

    def __init__(self, num_images: Optional[int] = None, size: Tuple[int, int] = (64, 64), split: str = "train",
                 seed: int = 0, transforms: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> None:
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        self.num_images = num_images if num_images is not None else (256 if split == "train" else 32)
        self.size = (int(size[0]), int(size[1]))
        self.split = split
        self.seed = seed
        self.transforms = transforms

    def __len__(self) -> int:
        return self.num_images

    def load(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"scene {i} out of range (0..{self.num_images - 1})")
        g = torch.Generator().manual_seed(self.seed * 7_919 + _SPLIT_OFFSET[self.split] + i)
        image, label = make_scene(self.size, g)
        return {"image": image, "label": label, "path": f"synthetic/{self.split}/{i:05d}"}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sample = self.load(i)
        return self.transforms(sample) if self.transforms is not None else sample
