"""SeMask segmentors over any backbone, and SeMask-MiT + SegFormer head models.

* ``semask_fpn`` / ``semask_segformer``: ``backbone=`` a timm model name (wrapped with
  :func:`semask.wrap`), a semask backbone name (``"semask_mit_b2"``, ``"semask_swin_tiny"``), a timm
  model instance, or an already built SeMask backbone (``forward -> (features, priors)``).
* ``semask_mit_b{0..5}_segformer``: SeMask MiT with SegFormer's all-MLP head (256 channels for
  B0/B1, 768 for B2-B5, as in SegFormer).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch.nn as nn

from ..backbones import mit as _mit  # noqa: F401  (registers the semask_mit_b* backbones)
from ..backbones.wrap import wrap
from ..decoders.fpn import FPNHead
from ..decoders.segformer import SegFormerHead
from ..core.registry import get_entrypoint, list_models, register_model
from .segmentor import SeMaskSegmentor

__all__ = ["build_semask_backbone", "create_segmentor"]


def build_semask_backbone(
    backbone: Union[str, nn.Module], num_classes: int, pretrained: Any = False, **kwargs: Any
) -> nn.Module:
    """A backbone returning ``(features, priors)`` with K = ``num_classes``.

    ``backbone``: a semask backbone name (built with ``kwargs``; ``pretrained`` as its entry point takes
    it, e.g. True / a SegFormer checkpoint for ``semask_mit_b*``), a timm name (:func:`semask.wrap`;
    ``pretrained``: True loads timm's default weights, a path / ``hf-hub:`` id the user's, through
    semask's safe loader), a timm instance (wrapped), or a SeMask backbone
    instance (used as is).
    """
    if isinstance(backbone, str):
        if backbone in list_models(kind="backbone"):
            extra = dict(pretrained=pretrained) if pretrained else {}
            return get_entrypoint(backbone)(num_classes=num_classes, **extra, **kwargs)
        return wrap(backbone, num_classes, pretrained=pretrained, **kwargs)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a model name or nn.Module, got {type(backbone).__name__}")
    if pretrained:
        raise TypeError("pretrained_backbone applies to a backbone given by name, not to a module instance")
    if hasattr(backbone, "reset_classes") and hasattr(backbone, "feature_info") and hasattr(backbone, "num_classes"):
        if kwargs:
            raise TypeError(f"backbone options {sorted(kwargs)} cannot be applied to an already built SeMask backbone")
        if backbone.num_classes != num_classes:
            raise ValueError(f"the backbone's semantic layers have {backbone.num_classes} classes but num_classes="
                             f"{num_classes}; call backbone.reset_classes({num_classes}) first or pass the same K")
        return backbone
    return wrap(backbone, num_classes, **kwargs)


def create_segmentor(
    backbone: Union[str, nn.Module],
    decoder: str = "fpn",
    num_classes: int = 150,
    decoder_channels: int = 256,
    decoder_dropout: float = 0.1,
    sem_loss_weight: float = 0.4,
    loss_reduction: str = "valid",
    ohem: Optional[Dict[str, Any]] = None,
    ignore_index: int = 255,
    pretrained_backbone: Any = False,
    **backbone_kwargs: Any,
) -> SeMaskSegmentor:
    """SeMask backbone + decode head (``"fpn"``: Semantic-FPN, ``"segformer"``: all-MLP) + the light
    semantic decoder and the losses of the SeMask FPN models. ``pretrained_backbone`` and
    ``backbone_kwargs`` go to :func:`build_semask_backbone`."""
    bb = build_semask_backbone(backbone, num_classes, pretrained_backbone, **backbone_kwargs)
    chans = [f["num_chs"] for f in bb.feature_info]
    strides = [f["reduction"] for f in bb.feature_info]
    if decoder == "fpn":
        if any(s != strides[0] * 2 ** i for i, s in enumerate(strides)):
            raise ValueError(f"the FPN head needs levels at strides s, 2s, 4s, ...; this backbone outputs {strides}")
        head: nn.Module = FPNHead(chans, num_classes, decoder_channels, strides, decoder_dropout)
    elif decoder == "segformer":
        head = SegFormerHead(chans, num_classes, decoder_channels, decoder_dropout)
    else:
        raise ValueError(f"decoder must be 'fpn' or 'segformer', got {decoder!r}")
    return SeMaskSegmentor(bb, head, num_classes, sem_loss_weight, loss_reduction, ohem, ignore_index)


@register_model(backbone_weights_at_build=True)
def semask_fpn(backbone: Union[str, nn.Module] = "convnext_tiny", fpn_channels: int = 256, **kwargs: Any) -> SeMaskSegmentor:
    """Semantic-FPN SeMask segmentor over any backbone (``backbone=`` timm/semask name or module)."""
    return create_segmentor(backbone, "fpn", decoder_channels=fpn_channels, **kwargs)


@register_model(backbone_weights_at_build=True)
def semask_segformer(backbone: Union[str, nn.Module] = "semask_mit_b0", **kwargs: Any) -> SeMaskSegmentor:
    """SegFormer-head SeMask segmentor over any backbone (``backbone=`` timm/semask name or module)."""
    return create_segmentor(backbone, "segformer", **kwargs)


def _register_mit(b: int, channels: int) -> None:
    variant = f"semask_mit_b{b}"

    def entry(num_classes: int = 150, decoder_channels: int = channels, **kwargs: Any) -> SeMaskSegmentor:
        return create_segmentor(variant, "segformer", num_classes, decoder_channels, **kwargs)

    entry.__name__ = f"{variant}_segformer"
    entry.__qualname__ = entry.__name__
    entry.__doc__ = (f"SeMask MiT-B{b} + SegFormer head ({channels} channels). ``pretrained_backbone``: False, "
                     f"True (nvidia/mit-b{b} from the Hub), or a SegFormer checkpoint file / state dict.")
    register_model(entry, backbone_weights_at_build=True)


for _b, _ch in [(0, 256), (1, 256), (2, 768), (3, 768), (4, 768), (5, 768)]:
    _register_mit(_b, _ch)
