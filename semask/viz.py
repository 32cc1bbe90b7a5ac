"""Pictures of predictions: colour label maps, overlays, per-stage semantic prior maps, panels."""
from __future__ import annotations

import colorsys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .data.imageio import pil_to_array

__all__ = ["default_palette", "colorize", "overlay", "prior_maps", "make_panel", "legend", "save"]

Palette = Sequence[Sequence[int]]


def default_palette(num_classes: int) -> List[Tuple[int, int, int]]:
    """K well-separated colours (golden-ratio hue steps), identical on every run."""
    out = []
    for i in range(num_classes):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.35 * ((i // 7) % 2), 0.95 - 0.3 * ((i // 3) % 2))
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(label, palette: Palette, ignore_index: int = 255, ignore_color: Tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB; ``ignore_index`` pixels get ``ignore_color``."""
    lab = _np(label).astype(np.int64)
    table = np.zeros((256 if lab.max(initial=0) < 256 else lab.max() + 1, 3), dtype=np.uint8)
    table[:] = ignore_color
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    table[: len(pal)] = pal
    if ignore_index < len(table):
        table[ignore_index] = ignore_color
    return table[lab]


def _hwc_image(image) -> np.ndarray:
    """A (3, H, W) tensor / (H, W, 3) array / PIL image -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return pil_to_array(image)  # the readers' conversion (EXIF orientation, 16-bit, float, alpha)
    arr = _np(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return np.clip(arr, 0, 255).astype(np.uint8)


def overlay(image, label, palette: Palette, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Blend the colour label map over the image (ignored pixels show the image)."""
    img = _hwc_image(image).astype(np.float32)
    col = colorize(label, palette, ignore_index).astype(np.float32)
    mask = (_np(label) != ignore_index)[..., None]
    out = np.where(mask, (1 - alpha) * img + alpha * col, img)
    return out.round().astype(np.uint8)


def prior_maps(priors: Sequence[torch.Tensor], palette: Palette, size: Optional[Tuple[int, int]] = None) -> List[np.ndarray]:
    """Per-stage semantic priors (K, h_i, w_i) -> list of colour argmax maps, each nearest-resized
    to ``size`` (H, W) so coarse stages show their real resolution as blocks."""
    out = []
    for p in priors:
        lab = p.float().argmax(0)
        if size is not None:
            lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
        out.append(colorize(lab, palette))
    return out


def legend(class_names: Sequence[str], palette: Palette, width: int, present: Optional[Sequence[int]] = None) -> np.ndarray:
    """A strip of colour swatches with class names (only ``present`` ids when given)."""
    ids = list(present) if present is not None else list(range(len(class_names)))
    ids = [i for i in ids if 0 <= i < len(class_names)][:40]
    cell_w, cell_h = 120, 16
    cols = max(1, width // cell_w)
    rows = max(1, -(-len(ids) // cols))
    im = Image.new("RGB", (max(width, cell_w), rows * cell_h + 4), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for n, i in enumerate(ids):
        x, y = (n % cols) * cell_w + 2, (n // cols) * cell_h + 2
        d.rectangle([x, y + 2, x + 12, y + 12], fill=tuple(int(c) for c in palette[i]), outline=(0, 0, 0))
        d.text((x + 16, y + 1), str(class_names[i])[:16], fill=(0, 0, 0))
    return np.asarray(im)


def make_panel(tiles: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, gap: int = 4,
               footer: Optional[np.ndarray] = None) -> np.ndarray:
    """Tiles side by side (padded to a common height) with a title above each; optional footer."""
    h = max(t.shape[0] for t in tiles)
    title_h = 14 if titles else 0
    total_w = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (total_w, h + title_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    x = 0
    for k, t in enumerate(tiles):
        canvas.paste(Image.fromarray(np.ascontiguousarray(t)), (x, title_h))
        if titles:
            d.text((x + 2, 1), titles[k], fill=(0, 0, 0))
        x += t.shape[1] + gap
    arr = np.asarray(canvas)
    if footer is not None:
        fw = np.full((footer.shape[0], arr.shape[1], 3), 255, dtype=np.uint8)
        fw[:, : min(footer.shape[1], arr.shape[1])] = footer[:, : arr.shape[1]]
        arr = np.concatenate([arr, fw], 0)
    return arr


def save(arr: np.ndarray, path) -> None:
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
