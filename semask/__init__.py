"""semask: SeMask (Semantically Masked Transformers) segmentation models in plain PyTorch."""
from .version import __version__
from .models import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    list_models,
    list_pretrained,
)
from . import backbones  # noqa: F401  (registers the backbones in semask's and timm's registries)
from .models import fpn as _fpn  # noqa: F401  (registers the FPN segmentors)
from .models.segmentor import SeMaskSegmentor
from .backbones import SeMaskSwinTransformer
from .layers import SemanticAttention, SemanticLayer

__all__ = [
    "__version__",
    "PretrainedCfg",
    "SeMaskSegmentor",
    "SeMaskSwinTransformer",
    "SemanticAttention",
    "SemanticLayer",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "list_pretrained",
]
