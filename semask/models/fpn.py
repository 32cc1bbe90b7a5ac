"""SeMask-FPN segmentation models: SeMask Swin backbone + Semantic-FPN head + light semantic decoder."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..backbones.swin import SeMaskSwinTransformer, swin_arch_kwargs
from ..decoders.fpn import FPNHead
from ._registry import PretrainedCfg, register_model, register_pretrained_cfgs
from .segmentor import SeMaskSegmentor

__all__ = ["create_swin_fpn"]

_W, _G = False, True


def create_swin_fpn(
    backbone_variant: str,
    num_classes: int = 150,
    fpn_channels: int = 256,
    decoder_dropout: float = 0.1,
    sem_loss_weight: float = 0.4,
    loss_reduction: str = "valid",
    ohem: Optional[Dict[str, Any]] = None,
    ignore_index: int = 255,
    **backbone_kwargs: Any,
) -> SeMaskSegmentor:
    """Build a SeMask Swin FPN segmentor; ``backbone_kwargs`` override the size preset."""
    backbone = SeMaskSwinTransformer(num_classes=num_classes, **{**swin_arch_kwargs(backbone_variant), **backbone_kwargs})
    info = backbone.feature_info
    head = FPNHead([f["num_chs"] for f in info], num_classes, fpn_channels,
                   [f["reduction"] for f in info], decoder_dropout)
    return SeMaskSegmentor(backbone, head, num_classes, sem_loss_weight, loss_reduction, ohem, ignore_index)


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


# Pretrained tags. The windowed/global pattern is the one the official code hard-coded for that
# checkpoint (FPN tree: embed_dim in {96, 192} and K > 19 -> W W G G, otherwise W W W W).
for _arch, _embed in [("semask_swin_tiny_fpn", 96), ("semask_swin_small_fpn", 96),
                      ("semask_swin_base_fpn", 128), ("semask_swin_large_fpn", 192)]:
    _wide = _embed in (96, 192)
    register_pretrained_cfgs(_arch, {
        "ade20k": PretrainedCfg(num_classes=150, dataset="ade20k", reduce_zero_label=True,
                                arch_kwargs=dict(sem_global=(_W, _W, _G, _G) if _wide else (_W,) * 4)),
        "cityscapes": PretrainedCfg(num_classes=19, dataset="cityscapes", crop_size=(768, 768),
                                    test_scale=(2048, 1024), arch_kwargs=dict(sem_global=(_W,) * 4)),
        "coco_stuff10k": PretrainedCfg(num_classes=171, dataset="coco_stuff10k", reduce_zero_label=True,
                                       arch_kwargs=dict(sem_global=(_W, _W, _G, _G) if _wide else (_W,) * 4)),
    })
