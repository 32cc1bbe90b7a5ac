"""Folder readers for the SeMask datasets and for any images + masks folder.

Every dataset returns sample dicts ``{"image": uint8 Tensor (3, H, W) RGB, "label": LongTensor
(H, W) with training ids and ``ignore_index`` (255) for unlabelled pixels, "path": str}`` passed
through the optional ``transforms`` (see :mod:`semask.data.transforms`). Raw label values are
mapped with a 256-entry lookup table: ``reduce_zero_label`` (ADE20K, COCO-Stuff-10k: 0 -> 255,
k -> k-1), Cityscapes labelIds -> trainIds, CamVid void 11 -> 255.

The image is a ``torchvision.tv_tensors.Image`` and the label a ``tv_tensors.Mask`` (plain tensors
otherwise), so torchvision v2 transforms given as ``transforms`` move both alike (a random flip or
crop of the image applies to its label; masks are resized with nearest neighbours).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .classes import get_dataset_meta
from .imageio import ImageReadError, read_image

__all__ = [
    "SegmentationFolder", "ADE20KDataset", "CityscapesDataset", "COCOStuff10kDataset", "CamVidDataset",
    "DATASET_FORMATS", "build_dataset", "check_label", "read_image", "ImageReadError", "collate_samples", "CITYSCAPES_LABEL_TO_TRAIN",
]

PathLike = Union[str, os.PathLike]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# cityscapesscripts labels.py: labelId -> trainId for the 19 evaluated classes (others ignored)
CITYSCAPES_LABEL_TO_TRAIN: Dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def _read_label(path: PathLike, lut: Optional[torch.Tensor]) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"label map {path} has mode {im.mode}; expected a single-channel PNG of class ids")
            arr = np.asarray(im).astype(np.int64)
    except (OSError, SyntaxError) as e:  # empty, truncated, not an image
        raise ImageReadError(f"label map {path} cannot be read: empty, truncated or not an image ({e})") from None
    label = torch.from_numpy(arr)
    if lut is not None:
        if label.max() >= len(lut) or label.min() < 0:
            raise ValueError(f"label map {path} has values outside 0..{len(lut) - 1}")
        label = lut[label]
    return label


def check_label(label: torch.Tensor, num_classes: int, ignore_index: int = 255, where: str = "labels") -> None:
    """Raise a ValueError naming the offending ids unless every value is in 0..K-1 or ``ignore_index``."""
    bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        ids = torch.unique(label[bad]).tolist()
        shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
        more = f", or use num_classes={max(ids) + 1}" if max(ids) >= num_classes else ""
        raise ValueError(
            f"{where} contain class ids {shown} outside 0..{num_classes - 1} (num_classes={num_classes}, "
            f"ignore_index={ignore_index}): map them to training ids or to {ignore_index} (e.g. a dataset "
            f"label_map or reduce_zero_label){more}")


def _lut(mapping: Optional[Dict[int, int]] = None, reduce_zero_label: bool = False, default: Optional[int] = None,
         ignore_index: int = 255) -> Optional[torch.Tensor]:
    """A 256-entry raw-value -> training-id table (None when it would be the identity)."""
    if mapping is None and not reduce_zero_label:
        return None
    lut = torch.arange(256) if default is None else torch.full((256,), default)
    if reduce_zero_label:  # mmseg: 0 -> 255, k -> k - 1, 255 stays 255
        lut = torch.cat([torch.tensor([ignore_index]), torch.arange(255)])
        lut[255] = ignore_index
    for k, v in (mapping or {}).items():
        lut[k] = v
    return lut


def collate_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack images and labels of equal size; keep other keys as lists."""
    out: Dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class SegmentationFolder(Dataset):
    """Images + masks matched by file stem (``foo.jpg`` <-> ``foo<seg_suffix>``).

    Args:
        img_dir: folder of images (searched recursively).
        ann_dir: folder of single-channel label PNGs (None: images only, e.g. for prediction).
        transforms: callable on sample dicts.
        img_suffix / seg_suffix: file-name endings that pair images with masks (the suffixes are
            stripped to get the common stem).
        label_map: raw value -> training id (e.g. CamVid ``{11: 255}``); unlisted values kept.
        reduce_zero_label: map 0 -> 255 and k -> k - 1 (ADE20K, COCO-Stuff-10k).
        classes / palette: metadata for tables and pictures.
    """

    def __init__(
        self,
        img_dir: PathLike,
        ann_dir: Optional[PathLike] = None,
        transforms: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
        img_suffix: Union[str, Sequence[str]] = IMAGE_EXTS,
        seg_suffix: str = ".png",
        label_map: Optional[Dict[int, int]] = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        classes: Optional[Sequence[str]] = None,
        palette: Optional[Sequence[Sequence[int]]] = None,
        lut: Optional[torch.Tensor] = None,
    ) -> None:
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.img_dir} does not exist")
        suffixes = tuple(x.lower() for x in ((img_suffix,) if isinstance(img_suffix, str) else img_suffix))
        images = sorted(p for p in self.img_dir.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
        if not images:
            raise FileNotFoundError(f"no images ending with {suffixes} under {self.img_dir}")
        self.images: List[Path] = images
        self.labels: Optional[List[Path]] = None
        if ann_dir is not None:
            ann = Path(ann_dir)
            if not ann.is_dir():
                raise FileNotFoundError(f"label folder {ann} does not exist")
            labels, missing = [], []
            for p in images:
                rel = p.relative_to(self.img_dir)
                stem = next((p.name[: -len(s)] for s in suffixes if p.name.lower().endswith(s)), p.stem)
                q = ann / rel.parent / (stem + seg_suffix)
                (labels if q.exists() else missing).append(q)
            if missing:
                raise FileNotFoundError(f"{len(missing)} images under {self.img_dir} have no label map, e.g. {missing[0]}")
            self.labels = labels
        self.transforms = transforms
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.lut = lut if lut is not None else _lut(label_map, reduce_zero_label, ignore_index=ignore_index)
        self.classes = tuple(classes) if classes is not None else None
        # label ids are checked against this when set (the classes' count by default)
        self.num_classes: Optional[int] = len(self.classes) if self.classes is not None else None
        self.palette = tuple(tuple(c) for c in palette) if palette is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Dict[str, Any]:
        """Sample ``i`` before transforms."""
        sample: Dict[str, Any] = {"image": tv_tensors.Image(read_image(self.images[i])), "path": str(self.images[i])}
        if self.labels is not None:
            label = _read_label(self.labels[i], self.lut)
            if tuple(label.shape) != tuple(sample["image"].shape[-2:]):
                raise ValueError(
                    f"label map {self.labels[i]} is {label.shape[0]}x{label.shape[1]} (HxW) but its image "
                    f"{self.images[i]} is {sample['image'].shape[1]}x{sample['image'].shape[2]} (after EXIF "
                    "orientation): a label map must have its image's size; fix the pairing or resize the label "
                    "with nearest-neighbour interpolation")
            if self.num_classes is not None:
                check_label(label, self.num_classes, self.ignore_index, where=f"label map {self.labels[i]}")
            sample["label"] = tv_tensors.Mask(label)
        return sample

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sample = self.load(i)
        return self.transforms(sample) if self.transforms is not None else sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images from {self.img_dir})"


def _split_dir(root: Path, names: Sequence[str], what: str) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"{root} has none of {list(names)}: not a {what} folder")


class CamVidDataset(SegmentationFolder):
    """CamVid (SegNet 11 classes): ``root/<split>/images/*.jpg|png`` + ``root/<split>/labels/*.png``;
    label 11 (void) -> 255."""

    def __init__(self, root: PathLike, split: str = "train", transforms=None) -> None:
        base = _split_dir(Path(root), [split], f"CamVid (expected {root}/{split}/images and labels)")
        classes, palette = get_dataset_meta("camvid")
        super().__init__(base / "images", base / "labels", transforms, label_map={11: 255},
                         classes=classes, palette=palette)


class ADE20KDataset(SegmentationFolder):
    """ADEChallengeData2016: ``images/{training,validation}/*.jpg`` + ``annotations/.../*.png``,
    ``reduce_zero_label`` (150 classes)."""

    SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

    def __init__(self, root: PathLike, split: str = "train", transforms=None) -> None:
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if split not in self.SPLITS:
            raise ValueError(f"ADE20K split must be one of {sorted(self.SPLITS)}, got {split!r}")
        s = self.SPLITS[split]
        classes, palette = get_dataset_meta("ade20k")
        super().__init__(_split_dir(root / "images", [s], "ADE20K"), root / "annotations" / s, transforms,
                         img_suffix=".jpg", reduce_zero_label=True, classes=classes, palette=palette)


class CityscapesDataset(SegmentationFolder):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/<split>/<city>/
    *_gtFine_labelTrainIds.png`` when present (mmseg's converted files), otherwise
    ``*_gtFine_labelIds.png`` mapped to the 19 trainIds on the fly."""

    def __init__(self, root: PathLike, split: str = "train", transforms=None) -> None:
        root = Path(root)
        img_dir = _split_dir(root / "leftImg8bit", [split], "Cityscapes")
        ann_dir = root / "gtFine" / split
        train_ids = next(ann_dir.rglob("*_gtFine_labelTrainIds.png"), None) is not None
        classes, palette = get_dataset_meta("cityscapes")
        lut = None if train_ids else _lut(CITYSCAPES_LABEL_TO_TRAIN, default=255)
        super().__init__(img_dir, ann_dir, transforms, img_suffix="_leftImg8bit.png",
                         seg_suffix="_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png",
                         lut=lut, classes=classes, palette=palette)


class COCOStuff10kDataset(SegmentationFolder):
    """COCO-Stuff-10k as converted by mmseg's tool: ``images/{train2014,test2014}/*.jpg`` +
    ``annotations/.../*_labelTrainIds.png``, ``reduce_zero_label`` (171 classes)."""

    SPLITS = {"train": "train2014", "val": "test2014", "test": "test2014"}

    def __init__(self, root: PathLike, split: str = "train", transforms=None) -> None:
        root = Path(root)
        s = self.SPLITS.get(split, split)
        classes, palette = get_dataset_meta("coco_stuff")
        super().__init__(_split_dir(root / "images", [s], "COCO-Stuff-10k"), root / "annotations" / s, transforms,
                         img_suffix=".jpg", seg_suffix="_labelTrainIds.png", reduce_zero_label=True,
                         classes=classes, palette=palette)


def _folder(root: PathLike, split: str = "train", transforms=None) -> SegmentationFolder:
    """Generic layout: ``root/<split>/{images,masks|labels}`` or ``root/{images,masks|labels}``."""
    root = Path(root)
    base = root / split if (root / split).is_dir() else root
    img_dir = _split_dir(base, ["images", "img", "imgs"], "images + masks")
    ann_dir = _split_dir(base, ["masks", "labels", "annotations", "ann"], "images + masks")
    return SegmentationFolder(img_dir, ann_dir, transforms)


DATASET_FORMATS: Dict[str, Callable[..., SegmentationFolder]] = {
    "camvid": CamVidDataset,
    "ade20k": ADE20KDataset,
    "cityscapes": CityscapesDataset,
    "coco_stuff10k": COCOStuff10kDataset,
    "folder": _folder,
}


def build_dataset(fmt: str, root: PathLike, split: str = "train", transforms=None) -> SegmentationFolder:
    """A dataset reader by format name (``camvid``, ``ade20k``, ``cityscapes``, ``coco_stuff10k``,
    ``folder``, or ``synthetic`` for the built-in scenes; ``root`` is then ignored)."""
    if fmt == "synthetic":
        from .synthetic import SyntheticScenes

        return SyntheticScenes(split=split, transforms=transforms)  # type: ignore[return-value]
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {sorted(DATASET_FORMATS)} or 'synthetic'")
    return DATASET_FORMATS[fmt](root, split, transforms)

