"""SeMask Swin-L with the detectron2 mask-classification heads: MaskFormer, Mask2Former, and FaPN- /
MSFaPN-Mask2Former, in pure PyTorch (spec section 3).

The model is used like the FPN segmentors: ``model(images)`` -> per-class scores (B, K, H, W) at the
input size, ``model(images, labels)`` -> loss dict. Images are normalised RGB (as for every semask
model); internally they are zero-padded bottom/right to a multiple of 32 (detectron2's ImageList).
Module names follow the official checkpoints (``backbone.*``, ``sem_seg_head.pixel_decoder.*``,
``sem_seg_head.predictor.*``); ``D2_CONVERSION_RULES`` tells ``semask convert`` how to map an official
``{'model': ...}`` file.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones._base import check_image_input
from ..backbones.swin import SeMaskSwinTransformer, infer_swin_kwargs, swin_arch_kwargs
from ..core.mixin import HubMixin
from ..core.registry import (
    ConversionRules,
    PretrainedCfg,
    register_conversion_rules,
    register_model,
    register_pretrained_cfgs,
)
from ..data.classes import get_dataset_meta
from ..decoders.fapn import MSDeformAttnPixelFANDecoder, PixelFANDecoder
from ..decoders.fpn import SemanticDecoder
from ..decoders.mask2former import MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder
from ..decoders.maskformer import BasePixelDecoder, TransformerPredictor
from ..losses import resize_rows, row_slabs
from .criterion import HungarianMatcher, SetCriterion, semantic_targets
from .segmentor import SegmentorTrainingMixin

__all__ = ["SeMaskMaskFormer", "SemSegHead", "create_semask_mask_former", "infer_d2_kwargs", "D2_CONVERSION_RULES", "FAMILIES"]

_W, _G = False, True
# upper bound on the bytes of one slab of resized masks in semantic_inference (a memory bound)
_MASK_SLAB_BYTES = 16 << 20
FAMILIES = ("maskformer", "mask2former", "fapn", "msfapn")


class SemSegHead(nn.Module):
    """``sem_seg_head``: pixel decoder + transformer predictor (+ SeMask's parameter-free semantic head).

    The semantic head sums the prior maps upsampled to stride 4 and resizes x4 to the padded input,
    with ``align_corners=True`` everywhere (Q6).
    """

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module, predictor_input: str) -> None:
        super().__init__()
        if predictor_input not in ("res5", "multi_scale"):
            raise ValueError(f"predictor_input must be 'res5' or 'multi_scale', got {predictor_input!r}")
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.predictor_input = predictor_input
        self.sem_head = SemanticDecoder(align_corners=True)

    def semantic(self, priors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prior maps (strides 4..32) -> semantic logits (B, K, 4*H_2, 4*W_2)."""
        sem = self.sem_head(priors)
        return F.interpolate(sem, size=(sem.shape[-2] * 4, sem.shape[-1] * 4), mode="bilinear", align_corners=True)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[Dict[str, Any], torch.Tensor, List[torch.Tensor]]:
        """-> (predictions dict, mask_features, multi-scale features)."""
        mask_features, multi_scale = self.pixel_decoder(features)
        x = features[-1] if self.predictor_input == "res5" else multi_scale
        return self.predictor(x, mask_features), mask_features, multi_scale


class SeMaskMaskFormer(SegmentorTrainingMixin, HubMixin, nn.Module):
    """SeMask backbone + a MaskFormer-family head, with the official training criterion.

    * ``model(images)`` -> semantic scores (B, K, H, W) = ``softmax(cls)[..., :-1]`` x ``sigmoid(masks)``
      summed over queries (values in [0, Q], not logits; argmax gives the segmentation).
    * ``model(images, labels)`` / ``model.loss(images, labels)`` -> dict with ``loss`` (the total),
      the weighted terms (``loss_ce``, ``loss_mask``, ``loss_dice``, ``loss_cate`` and ``*_{i}`` for
      the auxiliary predictions); ``return_logits=True`` adds ``logits`` (the scores above, detached).
      Labels: (B, H, W) ints.
    * ``model.forward_all(images)`` -> every intermediate (features, priors, sem_pred, mask_features,
      multi_scale, pred_logits, pred_masks, aux_outputs).
    * ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (:class:`semask.core.mixin.HubMixin`)
      for models built by ``semask.create_model``.

    Args:
        backbone: a ``SeMaskSwinTransformer`` with out_indices (0, 1, 2, 3).
        sem_seg_head: the ``SemSegHead``.
        criterion: the ``SetCriterion`` (no state in checkpoints).
        num_classes: K.
        size_divisibility: the padded input is a multiple of this (32).
        ignore_index: ignored label value.
    """

    def __init__(self, backbone: SeMaskSwinTransformer, sem_seg_head: SemSegHead, criterion: SetCriterion,
                 num_classes: int, size_divisibility: int = 32, ignore_index: int = 255) -> None:
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.ignore_index = ignore_index

    @property
    def in_chans(self) -> int:
        return getattr(self.backbone, "in_chans", 3)

    def pad(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Zero-pad (..., H, W) at the bottom/right to multiples of ``size_divisibility``."""
        d = self.size_divisibility
        h, w = x.shape[-2:]
        ph, pw = (d - h % d) % d, (d - w % d) % d
        if ph == 0 and pw == 0:
            return x
        if x.is_floating_point():
            return F.pad(x, (0, pw, 0, ph), value=value)
        return F.pad(x, (0, pw, 0, ph), value=int(value))

    def forward_all(self, images: torch.Tensor, semantic: bool = True) -> Dict[str, Any]:
        """Every output of the network for normalised images (B, C, H, W) (see the class doc)."""
        check_image_input(images, self.in_chans, self.backbone.patch_embed.proj.weight.dtype)
        padded = self.pad(images)
        feats, priors = self.backbone(padded)
        # contiguous NCHW, the layout the official pixel decoders ran in (their deep mask heads amplify
        # the last-bit differences of NHWC convs past 1e-4)
        feats = [f.contiguous() for f in feats]
        preds, mask_features, multi_scale = self.sem_seg_head(feats)
        out: Dict[str, Any] = dict(features=feats, priors=priors, mask_features=mask_features,
                                   multi_scale=multi_scale, image_size=tuple(images.shape[-2:]),
                                   padded_size=tuple(padded.shape[-2:]), **preds)
        out["sem_pred"] = self.sem_seg_head.semantic(priors) if semantic and len(priors) else None
        return out

    @staticmethod
    def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, image_size: Tuple[int, int],
                           padded_size: Tuple[int, int]) -> torch.Tensor:
        """Masks bilinearly resized to the padded size and cropped to ``image_size``, then
        ``einsum(softmax(cls)[..., :-1], sigmoid(masks))`` -> (B, K, H, W)."""
        h, w = image_size
        probs = pred_logits.softmax(-1)[..., :-1]
        mh, mw = pred_masks.shape[-2:]
        scale = padded_size[0] // mh
        if (scale < 2 or tuple(padded_size) != (mh * scale, mw * scale) or torch.compiler.is_compiling()
                or torch.compiler.is_exporting() or torch.jit.is_tracing()):
            masks = F.interpolate(pred_masks, size=padded_size, mode="bilinear", align_corners=False)[..., :h, :w]
            return torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())
        # slabs of output rows: the (B, Q, H, W) resized masks never exist whole (at training and test
        # sizes they are larger than the output itself)
        b, q = pred_masks.shape[:2]
        out = probs.new_empty(b, probs.shape[-1], h, w)
        for r0, r1 in row_slabs(-(-h // scale), b * q * padded_size[1] * 4 * scale, _MASK_SLAB_BYTES):
            rows = resize_rows(pred_masks, r0, r1, scale, padded_size[1])[:, :, :h - r0 * scale, :w]
            out[:, :, r0 * scale:r0 * scale + rows.shape[2]] = torch.einsum("bqc,bqhw->bchw", probs, rows.sigmoid())
        return out

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, return_logits: bool = False):
        """images (B, C, H, W) -> scores (B, K, H, W); with labels, the loss dict (see the class doc)."""
        if labels is not None:
            return self.loss(images, labels, return_logits=return_logits)
        out = self.forward_all(images, semantic=False)
        return self.semantic_inference(out["pred_logits"], out["pred_masks"], out["image_size"], out["padded_size"])

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
             return_logits: bool = False) -> Dict[str, torch.Tensor]:
        """Training losses (Hungarian matching per decoder layer; point sampling uses ``generator``);
        ``return_logits`` adds the detached (B, K, H, W) semantic ``logits`` (for metrics)."""
        if labels.ndim == 4:
            labels = labels.squeeze(1)
        if labels.ndim != 3 or labels.is_floating_point():
            raise ValueError(f"labels must be integer class maps of shape (B, H, W) or (B, 1, H, W), got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        if labels.shape[0] != images.shape[0] or labels.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"labels {tuple(labels.shape)} must match the images' batch and size {tuple(images.shape)}")
        out = self.forward_all(images)
        padded_labels = self.pad(labels.long(), self.ignore_index)
        targets = semantic_targets(padded_labels, self.ignore_index)
        losses = self.criterion(out, targets, out["sem_pred"], padded_labels, generator)
        if return_logits:
            with torch.no_grad():  # for metrics (detached: the official training step never computes them)
                losses["logits"] = self.semantic_inference(out["pred_logits"], out["pred_masks"],
                                                           out["image_size"], out["padded_size"])
        return losses

    def reset_classifier(self, num_classes: int) -> None:
        """Re-initialise only the class-dependent tensors (class head, semantic q/k) for ``num_classes``."""
        pred = self.sem_seg_head.predictor
        old = pred.class_embed
        pred.class_embed = nn.Linear(old.in_features, num_classes + 1).to(old.weight.device, old.weight.dtype)
        pred.num_classes = num_classes
        self.num_classes = num_classes
        self.backbone.reset_classes(num_classes)
        crit = self.criterion
        crit.num_classes = num_classes
        crit.empty_weight = torch.ones(num_classes + 1, device=crit.empty_weight.device)
        crit.empty_weight[-1] = crit.eos_coef


def create_semask_mask_former(
    family: str,
    num_classes: int = 150,
    backbone_variant: str = "semask_swin_large",
    sem_global: Optional[Sequence[bool]] = None,
    sem_window_size: Optional[int] = None,
    conv_dim: int = 256,
    mask_dim: int = 256,
    hidden_dim: int = 256,
    num_queries: int = 100,
    nheads: int = 8,
    dim_feedforward: int = 2048,
    dec_layers: Optional[int] = None,
    enc_layers: int = 6,
    dropout: Optional[float] = None,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    ignore_index: int = 255,
    **backbone_kwargs: Any,
) -> SeMaskMaskFormer:
    """Build a SeMask mask-classification model.

    Args:
        family: ``maskformer``, ``mask2former``, ``fapn`` or ``msfapn``.
        num_classes: K.
        backbone_variant: SeMask Swin size preset; ``backbone_kwargs`` override it.
        sem_global: per-stage global (True) / windowed (False) semantic layers. Default: the official
            tree's rule (MaskFormer W W W G; Mask2Former W W W G for K=150, else all W; FaPN/MSFaPN W W G G).
        sem_window_size: window of the windowed semantic layers (default: the Swin window).
        conv_dim, mask_dim: pixel-decoder width and mask-embedding size (256, 256).
        hidden_dim, num_queries, nheads, dim_feedforward: transformer decoder (256, 100, 8, 2048).
        dec_layers: decoder layers (MaskFormer 6; Mask2Former family 9, i.e. the official DEC_LAYERS - 1).
        enc_layers: deformable encoder layers (Mask2Former, MSFaPN: 6).
        dropout: transformer dropout (MaskFormer 0.1, others 0.0).
        num_points, oversample_ratio, importance_sample_ratio: training point sampling (Mask2Former family).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if sem_global is None:
        if family == "maskformer":
            sem_global = (_W, _W, _W, _G)
        elif family == "mask2former":
            sem_global = (_W, _W, _W, _G) if num_classes == 150 else (_W,) * 4
        else:
            sem_global = (_W, _W, _G, _G)
    arch = {**swin_arch_kwargs(backbone_variant), "pretrain_img_size": 384, **backbone_kwargs}
    arch["sem_global"] = tuple(sem_global)
    if sem_window_size is not None:
        arch["sem_window_size"] = sem_window_size
    arch.setdefault("out_indices", (0, 1, 2, 3))
    if tuple(arch["out_indices"]) != (0, 1, 2, 3):
        raise ValueError("the MaskFormer-family heads need all four backbone stages: out_indices=(0, 1, 2, 3)")
    backbone = SeMaskSwinTransformer(num_classes=num_classes, **arch)
    chans = [f["num_chs"] for f in backbone.feature_info]
    if family == "maskformer":
        pixel = BasePixelDecoder(chans, conv_dim, mask_dim)
        predictor: nn.Module = TransformerPredictor(
            chans[-1], num_classes, hidden_dim, num_queries, nheads, 0.1 if dropout is None else dropout,
            dim_feedforward, 6 if dec_layers is None else dec_layers, mask_dim)
        head = SemSegHead(pixel, predictor, "res5")
        matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points=0)
        criterion = SetCriterion(num_classes, matcher, 1.0, 20.0, 1.0, 0.4, 0.1, "focal", ignore_index=ignore_index)
    else:
        drop = 0.0 if dropout is None else dropout
        if family == "fapn":
            pixel = PixelFANDecoder(chans, conv_dim, mask_dim)
        else:
            cls = MSDeformAttnPixelDecoder if family == "mask2former" else MSDeformAttnPixelFANDecoder
            pixel = cls(chans, conv_dim, mask_dim, nheads, enc_layers, 1024, drop)
        predictor = MultiScaleMaskedTransformerDecoder(
            conv_dim, num_classes, hidden_dim, num_queries, nheads, dim_feedforward,
            9 if dec_layers is None else dec_layers, mask_dim)
        head = SemSegHead(pixel, predictor, "multi_scale")
        matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=num_points)
        criterion = SetCriterion(num_classes, matcher, 2.0, 5.0, 5.0, 0.4, 0.1, "point", num_points,
                                 oversample_ratio, importance_sample_ratio, ignore_index)
    return SeMaskMaskFormer(backbone, head, criterion, num_classes, 32, ignore_index)


# --------------------------------------------------------------------------------------------------
# Official detectron2 checkpoints -> our state dict (rules for semask.hub.convert, `semask convert`)


def _count(keys: Sequence[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_d2_kwargs(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Builder kwargs that the tensor shapes of a detectron2-family state dict determine (backbone
    sizes, decoder widths, queries, layer counts; heads only where the deformable encoder shows them).
    The semantic W/G pattern, semantic window and (MaskFormer/FaPN) head counts are not visible."""
    out = infer_swin_kwargs(sd, "backbone.")
    keys = list(sd)
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    mf = sd.get(pd + "mask_features.weight")
    if mf is not None:
        out.update(mask_dim=mf.shape[0], conv_dim=mf.shape[1])
    q = sd.get(pr + "query_embed.weight")
    if q is not None:
        out.update(num_queries=q.shape[0], hidden_dim=q.shape[1])
    for ffn in (pr + "transformer_ffn_layers.0.linear1.weight", pr + "transformer.decoder.layers.0.linear1.weight"):
        if ffn in sd:
            out["dim_feedforward"] = sd[ffn].shape[0]
    layers = _count(keys, re.escape(pr) + r"transformer_ffn_layers\.(\d+)\.") or \
        _count(keys, re.escape(pr) + r"transformer\.decoder\.layers\.(\d+)\.")
    if layers:
        out["dec_layers"] = layers
    enc = _count(keys, re.escape(pd) + r"transformer\.encoder\.layers\.(\d+)\.")
    if enc:
        out["enc_layers"] = enc
        off = sd.get(pd + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight")
        if off is not None:  # heads * 3 levels * 4 points * (x, y)
            out["nheads"] = off.shape[0] // (MSDeformAttnPixelDecoder.num_encoder_levels * 4 * 2)
    return out


D2_CONVERSION_RULES = ConversionRules(
    family="SeMask detectron2 (MaskFormer / Mask2Former / FaPN / MSFaPN)",
    required=("backbone.patch_embed.proj.weight", "sem_seg_head.predictor.class_embed.weight"),
    class_keys=((r"sem_seg_head\.predictor\.class_embed\.weight", 1), (r"backbone\..*\.mlp_cls_[qk]\.weight", 0)),
    infer=infer_d2_kwargs,
    # pre-v2 detectron2 heads stored the pixel decoder directly under sem_seg_head.*
    rename=(("sem_seg_head.predictor.", "sem_seg_head.predictor."),
            ("sem_seg_head.pixel_decoder.", "sem_seg_head.pixel_decoder."),
            ("sem_seg_head.", "sem_seg_head.pixel_decoder.")),
    drop=(r"criterion\..*", r"pixel_(mean|std)"),
    # FaPN / MSFaPN: align_l.offset.norm is layer_l.norm officially (Q11); stored once here
    tied=((r"sem_seg_head\.pixel_decoder\.align_(\d+)\.offset\.norm\.(weight|bias)",
           r"sem_seg_head.pixel_decoder.layer_\1.norm.\2"),),
    hints=(("decode_head.", "it looks like an mmseg SeMask-FPN checkpoint; choose a semask_swin_*_fpn --model"),),
)
register_conversion_rules("semask_swin_*_maskformer", D2_CONVERSION_RULES)
register_conversion_rules("semask_swin_*_mask2former", D2_CONVERSION_RULES)


# --------------------------------------------------------------------------------------------------
# Registered models and tags

@register_model(aliases=["semask_swin_l_maskformer"])
def semask_swin_large_maskformer(**kwargs: Any) -> SeMaskMaskFormer:
    """SeMask Swin-L MaskFormer (218.7M params at K=150)."""
    return create_semask_mask_former("maskformer", **kwargs)


@register_model(aliases=["semask_swin_l_mask2former"])
def semask_swin_large_mask2former(**kwargs: Any) -> SeMaskMaskFormer:
    """SeMask Swin-L Mask2Former (222.6M params at K=150)."""
    return create_semask_mask_former("mask2former", **kwargs)


@register_model(aliases=["semask_swin_l_fapn_mask2former"])
def semask_swin_large_fapn_mask2former(**kwargs: Any) -> SeMaskMaskFormer:
    """SeMask Swin-L FaPN-Mask2Former (226.7M params at K=150)."""
    return create_semask_mask_former("fapn", **kwargs)


@register_model(aliases=["semask_swin_l_msfapn_mask2former"])
def semask_swin_large_msfapn_mask2former(**kwargs: Any) -> SeMaskMaskFormer:
    """SeMask Swin-L MSFaPN-Mask2Former (223.9M params at K=150)."""
    return create_semask_mask_former("msfapn", **kwargs)


_GDRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_D2_NOTES = ("Converted from the official SeMask detectron2 checkpoint (Picsart-AI-Research/SeMask-Segmentation). "
             "The code here is a clean re-implementation, but these weights come from CC BY-NC 4.0 "
             "MaskFormer/Mask2Former-era training code: treat them as research-only (non-commercial). "
             "Backbone pretrained on ImageNet-22k at 384px.")


def _d2_tag(dataset: str, gdrive: str, miou: float, miou_ms: float, arch_kwargs: Dict[str, Any]) -> PretrainedCfg:
    classes, palette = get_dataset_meta(dataset)
    city = dataset == "cityscapes"
    return PretrainedCfg(
        source_url=_GDRIVE.format(gdrive), num_classes=len(classes), arch_kwargs=arch_kwargs, dataset=dataset,
        class_names=classes, palette=palette, crop_size=(512, 1024) if city else (640, 640),
        test_scale=(2048, 1024) if city else (2560, 640), reduce_zero_label=not city, license="cc-by-nc-4.0",
        metrics=dict(miou=miou, miou_ms=miou_ms), notes=_D2_NOTES,
    )


register_pretrained_cfgs("semask_swin_large_maskformer", {
    "ade20k": _d2_tag("ade20k", "1KgKQLGv9CcBqeEvOEDdxQ-O6lpMfHBLw", 54.75, 56.15, dict(sem_global=(_W, _W, _W, _G))),
})
register_pretrained_cfgs("semask_swin_large_mask2former", {
    "ade20k": _d2_tag("ade20k", "1hN1I4Wv7_1FCPOsfA-5PELn6Xn3b_R8a", 56.41, 57.52, dict(sem_global=(_W, _W, _W, _G))),
    # Cityscapes: K=19 -> all windowed, and the YAML keeps the default semantic window 7 under Swin window 12
    "cityscapes": _d2_tag("cityscapes", "14fZQWQuBUu2qlpy3wyQ42xs6gQNg2DZX", 83.97, 84.98,
                          dict(sem_global=(_W,) * 4, sem_window_size=7)),
})
register_pretrained_cfgs("semask_swin_large_fapn_mask2former", {
    "ade20k": _d2_tag("ade20k", "1njy_RSEXiyx29O_xFraHqsItTHOtw_qc", 56.88, 58.25, dict(sem_global=(_W, _W, _G, _G))),
})
register_pretrained_cfgs("semask_swin_large_msfapn_mask2former", {
    "ade20k": _d2_tag("ade20k", "1DQ9KltSLDj47H2jYnCtVwyBf7KPR9SM_", 57.00, 58.25, dict(sem_global=(_W, _W, _G, _G))),
})
