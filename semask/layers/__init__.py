"""SeMask building blocks: the semantic attention layers and the window helpers of the Swin blocks."""
from .semantic import SemanticAttention, SemanticLayer, semantic_attention
from .window import (
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
    "semantic_attention",
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
