"""Set-prediction losses of the MaskFormer family: Hungarian matching of queries to ground-truth
segments, class CE with a down-weighted "no object", mask losses (MaskFormer: focal + dice on full
masks; Mask2Former: BCE + dice on importance-sampled points), deep supervision, and SeMask's 0.4
semantic CE (spec section 3)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..losses import upsampled_ce

__all__ = [
    "point_sample", "uncertain_point_coords", "sigmoid_focal_loss", "dice_loss", "sigmoid_ce_loss",
    "HungarianMatcher", "SetCriterion", "semantic_targets",
]

Target = Dict[str, torch.Tensor]  # {"labels": (T,) int64, "masks": (T, H, W) float/bool}


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (N, C, H, W) maps at (N, P, 2) normalised (x, y) in [0, 1] -> (N, C, P)
    (``align_corners=False``, zero outside)."""
    return F.grid_sample(inputs, 2.0 * coords.unsqueeze(2) - 1.0, mode="bilinear", align_corners=False).squeeze(3)


def uncertain_point_coords(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """PointRend's training point selection for (N, 1, H, W) mask logits -> (N, num_points, 2):
    ``importance_sample_ratio`` of the points are the most uncertain (smallest |logit|) out of
    ``num_points * oversample_ratio`` random ones, the rest are uniform random."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()  # (N, num_sampled)
    k = int(importance_sample_ratio * num_points)
    # the k most uncertain in any order (the losses average over the points): unsorted top-k selects the
    # same points as the official sorted one (up to ties), in less than half the time on a CPU
    idx = uncertainty.topk(k, dim=1, sorted=False).indices
    picked = coords.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    rest = num_points - k
    if rest > 0:
        picked = torch.cat([picked, torch.rand(n, rest, 2, device=logits.device, generator=generator)], dim=1)
    return picked


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet focal loss of (N, P) logits, mean over P, summed over N, divided by ``num_masks``."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """1 - (2|p t| + 1) / (|p| + |t| + 1) of (N, P) logits, summed over N, divided by ``num_masks``."""
    p = inputs.sigmoid().flatten(1)
    loss = 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary CE of (N, P) logits, mean over P, summed over N, divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def _pairwise_dice(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = inputs.sigmoid()
    num = 2 * p @ targets.T
    return 1 - (num + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


def _pairwise_bce(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / inputs.shape[1]


def _pairwise_focal(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    prob = inputs.sigmoid()
    pos = (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = prob ** gamma * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    if alpha >= 0:
        pos, neg = pos * alpha, neg * (1 - alpha)
    return (pos @ targets.T + neg @ (1 - targets).T) / inputs.shape[1]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments minimising
    ``cost_class * (-p[class]) + cost_mask * mask_cost + cost_dice * dice_cost`` (scipy's
    ``linear_sum_assignment``).

    Args:
        cost_class, cost_mask, cost_dice: cost weights.
        num_points: 0 = compare full masks (MaskFormer: GT masks nearest-resized to the prediction,
            focal cost); > 0 = compare both at the same ``num_points`` uniform random points
            (Mask2Former: BCE cost).
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int = 0) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, target: Target,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(Q, T) matching cost for one image: logits (Q, K+1), masks (Q, H, W)."""
        labels = target["labels"]
        cost_class = -logits.float().softmax(-1)[:, labels]
        tgt = target["masks"].to(masks.dtype)
        if self.num_points > 0:
            coords = torch.rand(1, self.num_points, 2, device=masks.device, generator=generator)
            out = point_sample(masks[:, None].float(), coords.expand(masks.shape[0], -1, -1))[:, 0]
            tgt = point_sample(tgt[:, None].float(), coords.expand(tgt.shape[0], -1, -1))[:, 0]
            cost_mask = _pairwise_bce(out, tgt)
        else:
            tgt = F.interpolate(tgt[:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0].flatten(1)
            out = masks.float().flatten(1)
            cost_mask = _pairwise_focal(out, tgt)
        cost_dice = _pairwise_dice(out, tgt)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Target],
                generator: Optional[torch.Generator] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (query indices, target indices) of the matched pairs (min(Q, T) pairs)."""
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as e:  # training-only dependency
            raise ImportError("Hungarian matching needs scipy: pip install 'semask[train]' (or scipy)") from e
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            c = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], target, generator)
            i, j = linear_sum_assignment(c.cpu().numpy())
            indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices


def semantic_targets(labels: torch.Tensor, ignore_index: int = 255) -> List[Target]:
    """Per image, one binary mask per class present in (B, H, W) int labels (ignored pixels excluded),
    as the official semantic dataset mapper builds them."""
    targets = []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != ignore_index]
        targets.append({"labels": classes.long(), "masks": (lab[None] == classes[:, None, None]).float()})
    return targets


class SetCriterion(nn.Module):
    """The SeMask set criterion.

    ``forward(outputs, targets, sem_pred=None, sem_labels=None)`` -> dict of *weighted* losses
    (``loss_ce``, ``loss_mask``, ``loss_dice``, ``loss_cate`` for the final prediction and
    ``loss_ce_{i}``, ``loss_mask_{i}``, ``loss_dice_{i}`` for every auxiliary one) plus ``loss``, their sum.

    Args:
        num_classes: K.
        matcher: a ``HungarianMatcher``.
        class_weight, mask_weight, dice_weight, cate_weight: loss weights (MaskFormer 1/20/1/0.4,
            Mask2Former family 2/5/5/0.4).
        eos_coef: CE weight of the "no object" class (0.1).
        mask_loss: ``"focal"`` (MaskFormer: focal + dice on full-resolution masks) or ``"point"``
            (Mask2Former: BCE + dice on ``num_points`` importance-sampled points).
        num_points, oversample_ratio, importance_sample_ratio: point sampling (12544, 3.0, 0.75).
        ignore_index: ignored label of the semantic CE.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, cate_weight: float = 0.4, eos_coef: float = 0.1, mask_loss: str = "point",
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if mask_loss not in ("focal", "point"):
            raise ValueError(f"mask_loss must be 'focal' or 'point', got {mask_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight, "loss_cate": cate_weight}
        self.eos_coef = eos_coef
        self.mask_loss = mask_loss
        self.num_points, self.oversample_ratio, self.importance_sample_ratio = num_points, oversample_ratio, importance_sample_ratio
        self.ignore_index = ignore_index
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)  # not in checkpoints

    def init_non_persistent_buffers(self) -> None:
        """Re-create ``empty_weight`` (not in checkpoints) after a meta-device build + ``to_empty``."""
        self.empty_weight.fill_(1.0)
        self.empty_weight[-1] = self.eos_coef

    def loss_labels(self, logits: torch.Tensor, targets: Sequence[Target], indices) -> torch.Tensor:
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"][tgt.to(logits.device)]
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight.to(logits.device))

    def loss_masks(self, masks: torch.Tensor, targets: Sequence[Target], indices, num_masks: float,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        src = torch.cat([masks[b, s.to(masks.device)] for b, (s, _) in enumerate(indices)])
        tgt = torch.cat([targets[b]["masks"][t.to(masks.device)] for b, (_, t) in enumerate(indices)]).to(src.dtype)
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        if self.mask_loss == "focal":
            src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
            tgt = tgt.flatten(1)
            return sigmoid_focal_loss(src, tgt, num_masks), dice_loss(src, tgt, num_masks)
        src, tgt = src[:, None], tgt[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator)
            point_labels = point_sample(tgt, coords)[:, 0]
        point_logits = point_sample(src, coords)[:, 0]
        return sigmoid_ce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    def _num_masks(self, targets: Sequence[Target], device: torch.device) -> float:
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(n.item() / world, 1.0)

    def forward(self, outputs: Dict[str, object], targets: Sequence[Target], sem_pred: Optional[torch.Tensor] = None,
                sem_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]
        num_masks = self._num_masks(targets, logits.device)
        w = self.weights
        losses: Dict[str, torch.Tensor] = {}
        preds = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        for suffix, out in preds:
            indices = self.matcher(out, targets, generator)
            losses["loss_ce" + suffix] = w["loss_ce"] * self.loss_labels(out["pred_logits"], targets, indices)
            lm, ld = self.loss_masks(out["pred_masks"], targets, indices, num_masks, generator)
            losses["loss_mask" + suffix] = w["loss_mask"] * lm
            losses["loss_dice" + suffix] = w["loss_dice"] * ld
        if sem_pred is not None and sem_labels is not None and w["loss_cate"]:
            # mean over valid pixels (PyTorch's ignore_index reduction), final prediction only; the resize
            # to the labels and the CE run together in row slabs
            losses["loss_cate"] = w["loss_cate"] * upsampled_ce(sem_pred, sem_labels, self.ignore_index, "valid")
        losses["loss"] = sum(losses.values())
        return losses
