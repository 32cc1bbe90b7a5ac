"""Streaming semantic-segmentation metrics, computed exactly as mmsegmentation does.

A (K, K) confusion matrix (rows: ground truth, columns: prediction) accumulates over images.
From it: per-class IoU = TP / (GT + Pred - TP) and Acc = TP / GT, aAcc = sum TP / sum GT,
mIoU / mAcc = nanmean over classes. A class absent from both ground truth and prediction has
IoU NaN (excluded from the mean); a class predicted but absent from the ground truth has IoU 0.
Pixels labelled ``ignore_index`` are skipped; ``reduce_zero_label`` maps raw labels 0 -> ignore,
k -> k - 1 first (ADE20K, COCO-Stuff-10k).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["SegmentationMetric", "confusion_matrix", "metrics_from_confusion", "format_metrics_table"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array of class ids, got {type(x).__name__}")
    if x.is_floating_point():
        raise TypeError(f"label maps must hold integer class ids, got dtype {x.dtype}; take logits.argmax(1) first")
    return x.long()


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255,
                     reduce_zero_label: bool = False) -> torch.Tensor:
    """(K, K) int64 counts: ``cm[t, p]`` = pixels with ground truth t predicted as p.

    ``pred`` and ``target`` are integer maps of the same shape (any number of dims).
    """
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(t.shape)} must have the same shape")
    if reduce_zero_label:  # mmseg: 0 -> 255, k -> k - 1, (255 - 1) -> 255
        t = t.clone()
        t[t == 0] = 255
        t = t - 1
        t[t == 254] = 255
    valid = t != ignore_index
    p, t = p[valid], t[valid]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"ground truth holds ids {bad} outside 0..{num_classes - 1} that are not ignore_index="
                         f"{ignore_index}; map them to {ignore_index} (or set reduce_zero_label for 1-based labels)")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predictions hold ids outside 0..{num_classes - 1}; is num_classes={num_classes} right?")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def metrics_from_confusion(cm: torch.Tensor) -> Dict[str, torch.Tensor]:
    """aAcc, mIoU, mAcc (0-d float64 tensors, fractions) and per-class ``IoU``/``Acc`` (K,) with NaN
    for classes that never occur (mmseg's ``mean_iou``/``eval_metrics``)."""
    cm = cm.double()
    tp = cm.diag()
    area_label, area_pred = cm.sum(1), cm.sum(0)
    union = area_label + area_pred - tp
    iou = tp / union  # 0/0 -> NaN: class absent from both
    acc = tp / area_label  # 0/0 -> NaN: class absent from the ground truth
    return dict(aAcc=tp.sum() / area_label.sum(), mIoU=iou.nanmean(), mAcc=acc.nanmean(), IoU=iou, Acc=acc)


class SegmentationMetric:
    """Streaming mIoU / aAcc / mAcc.

    >>> m = SegmentationMetric(num_classes=19)
    >>> m.update(pred, label)          # (H, W) or (B, H, W) integer maps, any number of times
    >>> m.compute()["mIoU"]

    In DDP call :meth:`all_reduce` before :meth:`compute` to sum the matrices of all ranks.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one image or a batch: integer maps of equal shape."""
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index, self.reduce_zero_label)

    def all_reduce(self) -> None:
        """Sum the confusion matrices of all processes (no-op without torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            t = self.confusion.cuda() if backend == "nccl" else self.confusion.clone()
            dist.all_reduce(t)
            self.confusion = t.cpu()

    def compute(self) -> Dict[str, torch.Tensor]:
        return metrics_from_confusion(self.confusion)


def format_metrics_table(metrics: Dict[str, torch.Tensor], class_names: Optional[Sequence[str]] = None) -> str:
    """A per-class IoU/Acc table (percent) followed by the summary line ``mIoU: xx.xx``."""
    iou, acc = metrics["IoU"], metrics["Acc"]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(len(iou))]
    width = max(12, max(len(n) for n in names) + 2)
    fmt = lambda v: "   nan" if torch.isnan(v) else f"{100 * float(v):6.2f}"  # noqa: E731
    lines = [f"{'class':<{width}} {'IoU':>6} {'Acc':>6}", "-" * (width + 14)]
    lines += [f"{n:<{width}} {fmt(i)} {fmt(a)}" for n, i, a in zip(names, iou, acc)]
    lines.append("-" * (width + 14))
    lines.append(f"aAcc: {100 * float(metrics['aAcc']):.2f}  mAcc: {100 * float(metrics['mAcc']):.2f}")
    lines.append(f"mIoU: {100 * float(metrics['mIoU']):.2f}")
    return "\n".join(lines)
