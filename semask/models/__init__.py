"""Model assembly, registry and pretrained configs."""
from ._registry import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    list_models,
    list_pretrained,
    register_model,
    register_pretrained_cfgs,
)

__all__ = [
    "PretrainedCfg",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "list_pretrained",
    "register_model",
    "register_pretrained_cfgs",
]
