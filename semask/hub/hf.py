"""Compatibility name: Hub access lives in :mod:`semask.core.hf`."""
from ..core.hf import HUB_PREFIX, hub_download, is_offline, parse_hub_name, resolve_cache_dir

__all__ = ["HUB_PREFIX", "parse_hub_name", "is_offline", "resolve_cache_dir", "hub_download"]
