"""The one image reader behind training, evaluation and ``predict``: file or PIL image -> uint8 RGB.

``Image.convert("RGB")`` alone destroys images that are not 8-bit: Pillow clips a 16-bit grey PNG
(mode ``I;16``) to 255 (almost all white) and a float TIFF (mode ``F``) to 0/1 (black). Here each
mode is read as a user expects:

* EXIF orientation is applied (photos from phones display upright, as in image viewers);
* alpha is dropped (RGBA, LA, PA, transparent palettes: the colour channels are kept, not blended);
* palette, grayscale, CMYK, YCbCr and other colour modes are converted by Pillow;
* 16-bit integer images (``I;16*``, and ``I`` with values in 0..65535) are scaled to 8 bits
  (``round(v / 257)``, so 65535 -> 255);
* float images (``F``) must hold intensities in 0..1 and are scaled by 255 (the torchvision
  convention); other value ranges, NaN or inf have no sensible reading and raise.

Files that are empty, truncated or not images raise :class:`ImageReadError` naming the file.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image", "pil_to_array"]

PathLike = Union[str, os.PathLike]

_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "RGBA"}


class ImageReadError(ValueError):
    """An image file that cannot be read (empty, truncated, not an image, or no sensible RGB reading)."""


def _sixteen_to_8bit(arr: np.ndarray) -> np.ndarray:
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)


def pil_to_array(im: Image.Image, name: str = "image", exif: bool = True) -> np.ndarray:
    """A PIL image -> (H, W, 3) uint8 RGB array (see the module docstring for each mode)."""
    if exif:
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        im = im.convert(_ALPHA_MODES[mode])
        if im.mode == "RGBA":
            im = im.convert("RGB")
        mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(f"{name} is a 32-bit integer image with values in [{arr.min()}, {arr.max()}]; "
                                 "only 8-bit and 16-bit (0..65535) integer images have an RGB reading: "
                                 "rescale it and save it as 8-bit or 16-bit")
        grey = _sixteen_to_8bit(arr)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if arr.size and not np.isfinite(arr).all():
            raise ImageReadError(f"{name} is a float image with NaN or inf values; fix or mask them first")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageReadError(f"{name} is a float image with values in [{lo:.4g}, {hi:.4g}]; semask reads "
                                 "float images as 0..1 intensities: rescale it to 0..1 or save it as 8-bit")
        grey = np.round(arr * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    try:  # L, 1, CMYK, YCbCr, LAB, HSV, ...
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise ImageReadError(f"{name} has image mode {mode!r}, which has no RGB conversion ({e}); "
                             "save it as an 8-bit RGB or grayscale PNG/JPEG") from None


def read_image(path: PathLike) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor (EXIF orientation applied, alpha dropped,
    16-bit scaled to 8-bit, 0..1 float scaled by 255); raises :class:`ImageReadError` naming the file
    when it is empty, truncated or not a readable image."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file {path} does not exist")
    if os.path.isdir(path):
        raise ImageReadError(f"{path} is a folder, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"image file {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            arr = pil_to_array(im, name=f"image {path}")
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"image file {path} is not an image Pillow can read (corrupt, or an unsupported "
                             "format)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken headers, decoder errors
        raise ImageReadError(f"image file {path} is truncated or corrupt ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
