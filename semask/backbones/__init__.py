"""SeMask backbones."""
from .swin import SeMaskSwinTransformer, SwinBlock

__all__ = ["SeMaskSwinTransformer", "SwinBlock"]
