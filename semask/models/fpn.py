"""SeMask-FPN segmentation models: SeMask Swin backbone + Semantic-FPN head + light semantic decoder."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch

from ..backbones.swin import infer_swin_kwargs, swin_arch_kwargs
from ..core.registry import (
    ConversionRules,
    PretrainedCfg,
    register_conversion_rules,
    register_model,
    register_pretrained_cfgs,
)
from ..data.classes import get_dataset_meta
from .generic import create_segmentor
from .segmentor import SeMaskSegmentor

__all__ = ["FPN_CONVERSION_RULES", "create_swin_fpn", "infer_fpn_kwargs"]

_W, _G = False, True


def create_swin_fpn(backbone_variant: str, num_classes: int = 150, fpn_channels: int = 256, **kwargs: Any
                    ) -> SeMaskSegmentor:
    """A SeMask Swin FPN segmentor: ``semask_swin_{tiny,...}`` backbone (``kwargs`` override its size
    preset) + Semantic-FPN head; segmentor options (``decoder_dropout``, ``sem_loss_weight``,
    ``loss_reduction``, ``ohem``, ``ignore_index``) as in :func:`semask.models.generic.create_segmentor`."""
    return create_segmentor(backbone_variant, "fpn", num_classes, decoder_channels=fpn_channels, **kwargs)


@register_model(aliases=["semask_swin_t_fpn"])
def semask_swin_tiny_fpn(**kwargs: Any) -> SeMaskSegmentor:
    """SeMask Swin-T FPN (35M params at K=150)."""
    return create_swin_fpn("semask_swin_tiny", **kwargs)


@register_model(aliases=["semask_swin_s_fpn"])
def semask_swin_small_fpn(**kwargs: Any) -> SeMaskSegmentor:
    """SeMask Swin-S FPN (56M params at K=150)."""
    return create_swin_fpn("semask_swin_small", **kwargs)


@register_model(aliases=["semask_swin_b_fpn"])
def semask_swin_base_fpn(**kwargs: Any) -> SeMaskSegmentor:
    """SeMask Swin-B FPN (96M params at K=150)."""
    return create_swin_fpn("semask_swin_base", **kwargs)


@register_model(aliases=["semask_swin_l_fpn"])
def semask_swin_large_fpn(**kwargs: Any) -> SeMaskSegmentor:
    """SeMask Swin-L FPN (211M params at K=150)."""
    return create_swin_fpn("semask_swin_large", **kwargs)


# --------------------------------------------------------------------------------------------------
# Pretrained tags: one per checkpoint released in the official README (all 12 FPN checkpoints).
# * sem_global: the windowed/global pattern the official code hard-coded for that checkpoint
#   (spec section 1.4, FPN tree: embed_dim in {96, 192} and K > 19 -> W W G G, otherwise W W W W;
#   the COCO-Stuff configs leave the backbone K at 150, so they follow the K > 19 branch too).
#   Shapes cannot tell it, so it must come from here.
# * ohem: mmseg's OHEM sampler (min_kept 100000) was used for L-ADE20K and all COCO-Stuff models.
# * loss_reduction stays "valid" (mean over labelled pixels); pass loss_reduction="mmseg" to get the
#   official loss exactly (mean over all pixels, ignored ones counting 0).
# * metrics: the paper's / README's mIoU, single-scale ("miou") and multi-scale + flip ("miou_ms").

_GDRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_OFFICIAL_NOTES = ("Converted from the official SeMask-FPN checkpoint (Picsart-AI-Research/SeMask-Segmentation, "
                   "Apache-2.0). Official loss: create_model(..., loss_reduction='mmseg').")

# dataset -> size -> (Google Drive file id, crop, mIoU, mIoU ms+flip), from the official README tables
_RELEASES: Dict[str, Dict[str, Tuple[str, int, float, float]]] = {
    "ade20k": {
        "tiny": ("1L0daUHWQGNGCXHF-cKWEauPSyBV0GLOR", 512, 42.06, 43.36),
        "small": ("1QhDG4SyGFtWL5kP9BbBoyPqTuFu7fH_y", 512, 45.92, 47.63),
        "base": ("1PXCEhrrUy5TJC4dUp7YDQvaapnMzGT6C", 512, 49.35, 50.98),
        "large": ("1u5flfAQCiQJbMZbZPIlGUGTYBz9Ca7rE", 640, 51.89, 53.52),
    },
    "cityscapes": {
        "tiny": ("1_JBOJQSUVes-CWs075XyPnuNfG5psELr", 768, 74.92, 76.56),
        "small": ("1WyT207dZmdwETBUR6aeiqOVfQdUIV_fN", 768, 77.13, 79.14),
        "base": ("1-LzVB6XzD7IR0zzE5qmE0EM4ZTv429b4", 768, 77.70, 79.73),
        "large": ("1R9DDCmucQ_a_6ZkMGufEZCzJ-_qVMqCB", 768, 78.53, 80.39),
    },
    "coco_stuff10k": {
        "tiny": ("1qhXsJ8H64JPI_DW7CNzhxpHSEG2sKaIl", 512, 37.53, 38.88),
        "small": ("1ddXSMQu5ClkbLNMyQdyT0ATaOr86vIkL", 512, 40.72, 42.27),
        "base": ("1pGWI7U9bZJoe4ZaDx7ktWELx-uVN7rL0", 512, 44.63, 46.30),
        "large": ("1F6B9x9pX-SYEth7hdtxeNUeQ3XncOH7G", 640, 47.47, 48.54),
    },
}
_NUM_CLASSES = {"ade20k": 150, "cityscapes": 19, "coco_stuff10k": 171}


def _fpn_tag(size: str, dataset: str) -> PretrainedCfg:
    arch = f"semask_swin_{size}_fpn"
    gdrive, crop, miou, miou_ms = _RELEASES[dataset][size]
    k = _NUM_CLASSES[dataset]
    embed = swin_arch_kwargs(f"semask_swin_{size}")["embed_dim"]
    sem_global = (_W, _W, _G, _G) if embed in (96, 192) and k > 19 else (_W,) * 4
    arch_kwargs: Dict[str, Any] = dict(sem_global=sem_global)
    if dataset == "coco_stuff10k" or (dataset == "ade20k" and size == "large"):
        arch_kwargs["ohem"] = dict(min_kept=100_000)
    classes, palette = get_dataset_meta(dataset)
    city = dataset == "cityscapes"
    return PretrainedCfg(
        hf_hub_id=f"semask/{arch}.{dataset}",
        source_url=_GDRIVE.format(gdrive),
        num_classes=k,
        arch_kwargs=arch_kwargs,
        dataset=dataset,
        class_names=classes,
        palette=palette,
        crop_size=(crop, crop),
        test_scale=(2048, 1024) if city else (4 * crop, crop),
        reduce_zero_label=not city,
        license="apache-2.0",
        metrics=dict(miou=miou, miou_ms=miou_ms),
        notes=_OFFICIAL_NOTES + (" Backbone pretrained on ImageNet-22k at 384px." if size in ("base", "large") else ""),
    )


for _size in ("tiny", "small", "base", "large"):
    register_pretrained_cfgs(f"semask_swin_{_size}_fpn", {ds: _fpn_tag(_size, ds) for ds in _RELEASES})


# --------------------------------------------------------------------------------------------------
# Official mmseg SeMask-FPN checkpoints -> our state dict (rules for semask.hub.convert, `semask convert`):
# module names match one to one, so only the architecture has to be read off the shapes.


def infer_fpn_kwargs(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Builder kwargs that the shapes of an mmseg SeMask-FPN state dict determine (backbone sizes and
    the FPN width); the semantic W/G pattern is not visible."""
    out = infer_swin_kwargs(sd, "backbone.")
    seg = sd.get("decode_head.conv_seg.weight")
    if seg is not None:
        out["fpn_channels"] = seg.shape[1]
    return out


FPN_CONVERSION_RULES = ConversionRules(
    family="SeMask-FPN (mmseg)",
    required=("backbone.patch_embed.proj.weight", "decode_head.conv_seg.weight"),
    class_keys=((r"decode_head\.conv_seg\.weight", 0), (r"backbone\..*\.mlp_cls_[qk]\.weight", 0)),
    infer=infer_fpn_kwargs,
    hints=(("sem_seg_head.", "it looks like a detectron2 checkpoint (MaskFormer / Mask2Former / FaPN); "
                            "choose the matching --model"),),
)
register_conversion_rules("semask_swin_*_fpn", FPN_CONVERSION_RULES)
