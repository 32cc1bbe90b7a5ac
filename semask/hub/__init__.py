"""Loading, saving and publishing weights (safetensors only; nothing is unpickled)."""
from .hf import hub_download, parse_hub_name
from .io import create_from_hub, from_pretrained, load_pretrained, push_to_hub, read_model_dir, save_pretrained
from .mixin import HubMixin
from .timm_init import load_imagenet_backbone, timm_swin_to_semask

__all__ = [
    "HubMixin",
    "create_from_hub",
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
