"""Reusable SeMask building blocks."""
from .semantic import SemanticAttention, SemanticLayer
from .window import (
    cached_shifted_window_mask,
    merge_index,
    pad_to_multiple,
    padded_size,
    shifted_window_mask,
    tokens_to_windows,
    window_index,
    window_partition,
    window_reverse,
    windows_to_tokens,
)

__all__ = [
    "SemanticAttention",
    "SemanticLayer",
    "cached_shifted_window_mask",
    "merge_index",
    "pad_to_multiple",
    "padded_size",
    "shifted_window_mask",
    "tokens_to_windows",
    "window_index",
    "window_partition",
    "window_reverse",
    "windows_to_tokens",
]
