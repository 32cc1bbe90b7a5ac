"""Segmentation losses: cross-entropy with the official reductions, and mmseg's OHEM pixel sampler."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["segmentation_ce", "ohem_weights"]


def ohem_weights(
    logits: torch.Tensor, labels: torch.Tensor, min_kept: int = 100_000, thresh: Optional[float] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """mmseg's ``OHEMPixelSampler``: a (B, H, W) 0/1 weight that keeps the hardest valid pixels.

    With ``thresh=None`` the ``min_kept * B`` valid pixels with the largest CE are kept; with a
    threshold, pixels whose ground-truth probability is below ``max(thresh, p_(min_kept))`` are kept.
    """
    with torch.no_grad():
        b = labels.shape[0]
        valid = labels != ignore_index
        weight = torch.zeros_like(labels, dtype=logits.dtype)
        if not valid.any():
            return weight
        if thresh is not None:
            prob = logits.softmax(1).gather(1, labels.clamp_max(logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
            sorted_prob, _ = prob[valid].sort()
            kth = sorted_prob[min(min_kept * b, sorted_prob.numel() - 1)] if sorted_prob.numel() else sorted_prob.new_zeros(())
            weight[valid & (prob < max(float(kth), thresh))] = 1.0
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
            flat = loss[valid]
            keep = min(min_kept * b, flat.numel())
            idx = flat.topk(keep).indices
            w = torch.zeros_like(flat)
            w[idx] = 1.0
            weight[valid] = w
        return weight


def segmentation_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "valid",
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pixel cross-entropy of (B, K, H, W) logits against (B, H, W) or (B, 1, H, W) int labels.

    Logits are bilinearly resized (align_corners False) to the label size first.
    ``reduction``: ``"valid"`` averages over non-ignored pixels (PyTorch default, detectron2 trees);
    ``"mmseg"`` averages over *all* pixels, ignored ones counting 0 (the official mmseg-0.11 loss).
    ``weight``: optional per-pixel (B, H, W) weights (OHEM), applied before the reduction.
    """
    if labels.ndim == 4:
        labels = labels.squeeze(1)
    labels = labels.long()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        loss = loss * weight
    if reduction == "mmseg":
        return loss.mean()
    if reduction == "valid":
        return loss.sum() / (labels != ignore_index).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'valid' or 'mmseg', got {reduction!r}")
