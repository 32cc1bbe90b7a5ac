"""Loading, saving and converting weights (safetensors only; nothing is unpickled)."""
from .io import create_from_hub, load_pretrained, save_pretrained

__all__ = ["create_from_hub", "load_pretrained", "save_pretrained"]
