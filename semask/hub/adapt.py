"""Compatibility name: checkpoint adaptation lives in :mod:`semask.core.adapt`."""
from ..core.adapt import RECOMPUTED_BUFFERS, adapt_state_dict, class_dependent_keys, load_checked, window_of_table

__all__ = ["adapt_state_dict", "class_dependent_keys", "load_checked", "window_of_table", "RECOMPUTED_BUFFERS"]
