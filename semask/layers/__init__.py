"""Reusable SeMask building blocks."""
from .cpu import ReusableOutput, set_weight_packing
from .semantic import SemanticAttention, SemanticLayer
from .window import (
    batched_index,
    cached_shifted_window_mask,
    eager_cpu_inference,
    gather_rows,
    merge_index,
    pad_to_multiple,
    padded_size,
    shifted_window_mask,
    token_chunks,
    tokens_to_windows,
    window_index,
    window_partition,
    window_reverse,
    windows_to_tokens,
)

__all__ = [
    "ReusableOutput",
    "SemanticAttention",
    "SemanticLayer",
    "batched_index",
    "cached_shifted_window_mask",
    "eager_cpu_inference",
    "gather_rows",
    "merge_index",
    "pad_to_multiple",
    "padded_size",
    "set_weight_packing",
    "shifted_window_mask",
    "token_chunks",
    "tokens_to_windows",
    "window_index",
    "window_partition",
    "window_reverse",
    "windows_to_tokens",
]
