"""Segmentors (FPN / SegFormer heads, MaskFormer family) and their pretrained tags.

Registering them only needs the leaf registry (:mod:`semask.core.registry`); ``create_model`` is in
:mod:`semask.hub.factory` (also ``semask.create_model``).
"""
from ..core.registry import (
    PretrainedCfg,
    get_pretrained_cfg,
    list_models,
    list_pretrained,
    register_model,
    register_pretrained_cfgs,
)

__all__ = [
    "PretrainedCfg",
    "get_pretrained_cfg",
    "list_models",
    "list_pretrained",
    "register_model",
    "register_pretrained_cfgs",
]
