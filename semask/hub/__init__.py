"""Creating, loading, saving and publishing models (safetensors only; nothing is unpickled).

:mod:`semask.hub.factory` (``create_model``, ``from_pretrained``) sits on top of the model files and of
the loading code (:mod:`semask.hub.io`, :mod:`semask.hub.timm_init`, :mod:`semask.core`).
"""
from ..core.folder import push_to_hub, read_model_dir, save_pretrained
from ..core.hf import hub_download, parse_hub_name
from ..core.mixin import HubMixin
from .factory import create_model, from_pretrained
from .io import create_from_hub, load_pretrained
from .timm_init import load_imagenet_backbone, timm_swin_to_semask

__all__ = [
    "HubMixin",
    "create_from_hub",
    "create_model",
    "from_pretrained",
    "hub_download",
    "load_imagenet_backbone",
    "load_pretrained",
    "parse_hub_name",
    "push_to_hub",
    "read_model_dir",
    "save_pretrained",
    "timm_swin_to_semask",
]
