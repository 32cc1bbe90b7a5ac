"""Encoder-decoder segmentor: a SeMask backbone, a decode head and the light semantic decoder."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones._base import official_no_weight_decay, submodule_group_matcher
from ..decoders.fpn import SemanticDecoder
from ..core.mixin import HubMixin
from ..layers import SemanticAttention
from ..losses import ohem_weights, segmentation_ce, upsampled_ce

__all__ = ["SeMaskSegmentor", "SegmentorTrainingMixin"]


class SegmentorTrainingMixin:
    """timm's optimizer-factory hooks and gradient checkpointing for a model with a ``backbone``."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        """timm's parameter groups (``create_optimizer_v2(model, layer_decay=...)``): the backbone's
        block groups, then the decoder as the last group."""
        return submodule_group_matcher(self, "backbone.", coarse)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names without weight decay (official rule: position tables and every norm)."""
        return official_no_weight_decay(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's blocks in the backward pass (less memory, same gradients)."""
        self.backbone.set_grad_checkpointing(enable)


class SeMaskSegmentor(SegmentorTrainingMixin, HubMixin, nn.Module):
    """Backbone ``(features, priors)`` + decode head + semantic branch, with the official losses.

    * ``model(images)`` -> logits (B, K, H, W) at the input size (bilinear, align_corners False):
      the official ``encode_decode``.
    * ``model(images, labels)`` / ``model.loss(images, labels)`` -> dict with ``loss`` (the total),
      ``loss_ce`` (main CE, optional OHEM) and ``loss_cate`` (``sem_loss_weight`` x semantic CE);
      ``return_logits=True`` adds the detached full-size ``logits`` (for metrics). Labels are
      (B, H, W) or (B, 1, H, W) ints with ``ignore_index`` pixels.
    * ``model.forward_all(images)`` -> dict with ``features``, ``priors``, ``head_seg``,
      ``head_sem`` (stride 4) and ``logits``.
    * ``semask.optimize(model)`` turns on the opt-in CPU inference fast paths (same outputs).
    * ``model.save_pretrained(dir)`` / ``model.push_to_hub(repo)`` / ``SeMaskSegmentor.from_pretrained(dir_or_repo)``
      (:class:`semask.core.mixin.HubMixin`).

    Args:
        backbone: returns ``(features, priors)``; must expose ``feature_info`` and ``num_classes``.
        decode_head: maps the feature list to stride-4 logits.
        num_classes: K.
        sem_loss_weight: weight of the semantic CE (0.4 officially).
        loss_reduction: ``"valid"`` (mean over labelled pixels) or ``"mmseg"`` (official: mean over
            all pixels, ignored ones counting 0).
        ohem: None, or ``dict(min_kept=100000, thresh=None)`` for OHEM on the main loss.
        ignore_index: label value ignored by the losses.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        num_classes: int,
        sem_loss_weight: float = 0.4,
        loss_reduction: str = "valid",
        ohem: Optional[Dict[str, Any]] = None,
        ignore_index: int = 255,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if loss_reduction not in ("valid", "mmseg"):
            raise ValueError(f"loss_reduction must be 'valid' or 'mmseg', got {loss_reduction!r}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.semantic_decoder = SemanticDecoder(align_corners)
        self.num_classes = num_classes
        self.sem_loss_weight = sem_loss_weight
        self.loss_reduction = loss_reduction
        self.ohem = dict(ohem) if ohem else None
        self.ignore_index = ignore_index
        self.align_corners = align_corners

    @property
    def in_chans(self) -> int:
        return getattr(self.backbone, "in_chans", 3)

    @property
    def has_semantic_layers(self) -> bool:
        return any(isinstance(m, SemanticAttention) for m in self.backbone.modules())

    def forward_all(self, images: torch.Tensor) -> Dict[str, Any]:
        feats, priors = self.backbone(images)
        head_seg = self.decode_head(feats)
        out: Dict[str, Any] = dict(features=feats, priors=priors, head_seg=head_seg)
        out["head_sem"] = self.semantic_decoder(priors) if len(priors) else None
        out["logits"] = self._resize(head_seg, images.shape[-2:])
        return out

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, return_logits: bool = False):
        """images (B, C, H, W) -> logits (B, K, H, W); with labels, the loss dict (see class doc)."""
        if labels is not None:
            return self.loss(images, labels, return_logits)
        return self._resize(self.decode_head(self._features(images)), images.shape[-2:])

    def _resize(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        # stride-4 logits -> the image size (the official ``encode_decode``), returned as contiguous
        # NCHW whatever the head's layout (the stride-4 copy is small)
        return F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=self.align_corners)

    def _features(self, images: torch.Tensor) -> List[torch.Tensor]:
        # the prior maps are not needed for the logits: backbones that can skip them (ours) do
        backbone = self.backbone
        if "with_priors" in inspect.signature(backbone.forward).parameters:
            return backbone(images, with_priors=False)[0]
        return backbone(images)[0]

    def compute_losses(
        self, head_seg: torch.Tensor, head_sem: Optional[torch.Tensor], labels: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Losses from stride-4 logits and full-size labels (both logits are resized to the labels)."""
        if labels.ndim == 4:
            labels = labels.squeeze(1)
        if labels.ndim != 3 or labels.is_floating_point():
            raise ValueError(
                f"labels must be integer class maps of shape (B, H, W) or (B, 1, H, W), got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        labels = labels.long()
        if not torch.compiler.is_compiling():  # (a data-dependent branch would break a compiled graph)
            self._check_labels(labels, head_seg.shape[1])
        if self.ohem is not None:
            seg = F.interpolate(head_seg, size=labels.shape[-2:], mode="bilinear", align_corners=self.align_corners)
            weight = ohem_weights(seg, labels, ignore_index=self.ignore_index, **self.ohem)
            losses = {"loss_ce": segmentation_ce(seg, labels, self.ignore_index, self.loss_reduction, weight)}
        else:
            # the resize to the labels and the CE run together in row slabs (no full-size logits kept)
            losses = {"loss_ce": upsampled_ce(head_seg, labels, self.ignore_index, self.loss_reduction,
                                              self.align_corners)}
        if head_sem is not None and self.sem_loss_weight:
            losses["loss_cate"] = self.sem_loss_weight * upsampled_ce(
                head_sem, labels, self.ignore_index, self.loss_reduction)
        losses["loss"] = sum(losses.values())
        return losses

    def _check_labels(self, labels: torch.Tensor, k: int) -> None:
        # a clear error instead of cross_entropy's "Target 7 is out of bounds" (or a CUDA assert)
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= k))
        if bool(bad.any()):
            ids = torch.unique(labels[bad]).tolist()
            more = f", or build the model with num_classes={max(ids) + 1}" if max(ids) >= k else ""
            raise ValueError(
                f"labels contain class ids {ids[:10]} outside 0..{k - 1} (num_classes={k}, ignore_index="
                f"{self.ignore_index}): map them to training ids or to {self.ignore_index}{more}")

    def loss(self, images: torch.Tensor, labels: torch.Tensor, return_logits: bool = False) -> Dict[str, torch.Tensor]:
        """Training step: dict with ``loss``, ``loss_ce``, ``loss_cate`` and, with ``return_logits``,
        the detached (B, K, H, W) ``logits`` (off by default: the official step never computes them and
        they are the largest tensor of the step)."""
        if labels.shape[0] != images.shape[0] or labels.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must match the images' batch and size {tuple(images.shape)}"
            )
        feats, priors = self.backbone(images)
        head_seg = self.decode_head(feats)
        head_sem = self.semantic_decoder(priors) if len(priors) else None
        losses = self.compute_losses(head_seg, head_sem, labels)
        if return_logits:
            with torch.no_grad():  # for metrics (detached: the losses never need full-size logits)
                losses["logits"] = self._resize(head_seg, images.shape[-2:])
        return losses

    def reset_classifier(self, num_classes: int) -> None:
        """Rebuild only the class-dependent tensors (classifier, semantic q/k) for ``num_classes``."""
        self.num_classes = num_classes
        head = self.decode_head
        old = head.conv_seg
        head.conv_seg = nn.Conv2d(old.in_channels, num_classes, 1).to(old.weight.device, old.weight.dtype)
        nn.init.normal_(head.conv_seg.weight, std=0.01)
        nn.init.zeros_(head.conv_seg.bias)
        head.num_classes = num_classes
        if hasattr(self.backbone, "reset_classes"):
            self.backbone.reset_classes(num_classes)

    def param_groups(self, weight_decay: float, no_decay_keywords: Sequence[str] = (
            "absolute_pos_embed", "relative_position_bias_table", "norm")) -> List[Dict[str, Any]]:
        """AdamW groups with the official (mmseg) no-decay rule: substring match on parameter names."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if any(k in name for k in no_decay_keywords) else decay).append(p)
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
