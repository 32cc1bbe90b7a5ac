"""ImageNet initialisation of a model's SeMask backbone (``pretrained_backbone=``).

Each backbone owns its checkpoint mapping in its own file (:func:`semask.backbones.swin.load_swin_imagenet`
with ``checkpoint_filter_fn`` for timm's Swin weights, :func:`semask.backbones.mit.load_mit_pretrained`
for SegFormer's MiT weights); this module finds the backbone inside a model and dispatches.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

import torch.nn as nn

from ..backbones.mit import SeMaskMiT, load_mit_pretrained
from ..backbones.swin import (
    IMAGENET_SOURCES,
    SeMaskSwinTransformer,
    default_imagenet_source,
    find_swin_backbone,
    load_swin_imagenet,
    timm_swin_to_semask,
)

__all__ = ["IMAGENET_SOURCES", "default_imagenet_source", "find_swin_backbone", "timm_swin_to_semask",
           "load_imagenet_backbone", "has_imagenet_backbone", "is_imagenet_backbone"]


def is_imagenet_backbone(model: nn.Module) -> bool:
    """True when ``model`` is a SeMask Swin or MiT backbone."""
    return isinstance(model, (SeMaskSwinTransformer, SeMaskMiT))


def has_imagenet_backbone(model: nn.Module) -> bool:
    """True when ``model`` holds a SeMask Swin or MiT backbone (whose ImageNet weights are known)."""
    return any(isinstance(m, (SeMaskSwinTransformer, SeMaskMiT)) for m in model.modules())


def load_imagenet_backbone(
    model: nn.Module,
    source: Union[bool, str, os.PathLike] = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, List[str]]:
    """Load ImageNet weights into the SeMask backbone of ``model`` (a backbone or a segmentor).

    Args:
        model: the model; its backbone is found by type (Swin: timm's Swin weights; MiT: ``nvidia/mit-bX``).
        source: True (the weights of the backbone's size), an ``hf-hub:org/repo[@rev]`` id, or a path
            to a weights file (``.safetensors``; ``.pth`` / ``.bin`` are read with ``weights_only=True``).
        cache_dir: Hub cache (default ``$HF_HUB_CACHE``).
    Semantic layers, per-stage norms and heads keep their (official) initialisation. Returns
    ``dict(loaded=..., not_loaded=..., ignored=..., adapted=...)`` (backbone-relative keys; empty for MiT).
    """
    if any(isinstance(m, SeMaskMiT) for m in model.modules()):  # SegFormer's MiT weights (nvidia/mit-bX)
        load_mit_pretrained(model, source, cache_dir=cache_dir)
        return dict(loaded=[], not_loaded=[], ignored=[], adapted=[])
    return load_swin_imagenet(model, source, cache_dir=cache_dir)
