"""Decode heads: Semantic-FPN, SegFormer, and the MaskFormer / Mask2Former / FaPN pixel and
transformer decoders (pure PyTorch: deformable attention and DCNv2 without compiled ops)."""
from .fapn import MSDeformAttnPixelFANDecoder, PixelFANDecoder
from .fpn import FPNHead, SemanticDecoder, upsample_sum
from .mask2former import MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder
from .maskformer import BasePixelDecoder, TransformerPredictor
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_grid_sample
from .segformer import SegFormerHead

__all__ = [
    "BasePixelDecoder",
    "FPNHead",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnPixelFANDecoder",
    "MultiScaleMaskedTransformerDecoder",
    "PixelFANDecoder",
    "SegFormerHead",
    "SemanticDecoder",
    "TransformerPredictor",
    "ms_deform_attn",
    "ms_deform_attn_grid_sample",
    "upsample_sum",
]
