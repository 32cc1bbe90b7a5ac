"""semask: SeMask (Semantically Masked Transformers) segmentation models in plain PyTorch."""
from .version import __version__
from .core.registry import PretrainedCfg, get_pretrained_cfg, list_models, list_pretrained
from . import backbones  # noqa: F401  (registers the backbones in semask's and timm's registries)
from .backbones import mit as _mit  # noqa: F401  (the semask_mit_b* backbones)
from .models import fpn as _fpn  # noqa: F401  (registers the FPN segmentors)
from .models import generic as _generic  # noqa: F401  (SeMask-MiT, semask_fpn / semask_segformer)
from .models import mask_former as _mask_former  # noqa: F401  (MaskFormer / Mask2Former / FaPN / MSFaPN)
from .backbones.wrap import wrap
from .models.segmentor import SeMaskSegmentor
from .backbones import SeMaskSwinTransformer
from .layers import SemanticAttention, SemanticLayer
from .hub import HubMixin, create_model, from_pretrained, push_to_hub, save_pretrained
from .accel import optimize
from .inference import predict
from .metrics import SegmentationMetric

__all__ = [
    "__version__",
    "PretrainedCfg",
    "SeMaskSegmentor",
    "SeMaskSwinTransformer",
    "SemanticAttention",
    "SemanticLayer",
    "HubMixin",
    "from_pretrained",
    "push_to_hub",
    "save_pretrained",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "list_pretrained",
    "wrap",
    "predict",
    "optimize",
    "SegmentationMetric",
]
