"""Compatibility name: the model card lives in :mod:`semask.core.model_card`."""
from ..core.model_card import SEMASK_CITATION, render_model_card

__all__ = ["SEMASK_CITATION", "render_model_card"]
