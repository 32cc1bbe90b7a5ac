"""Reusable SeMask building blocks."""
from .semantic import SemanticAttention, SemanticLayer
from .window import pad_to_multiple, shifted_window_mask, window_partition, window_reverse

__all__ = [
    "SemanticAttention",
    "SemanticLayer",
    "pad_to_multiple",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]
