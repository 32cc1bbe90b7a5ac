"""Compatibility name: :class:`HubMixin` lives in :mod:`semask.core.mixin` (models mix it in)."""
from ..core.mixin import HubMixin

__all__ = ["HubMixin"]
