"""Compatibility name: the registry lives in :mod:`semask.core.registry` (a leaf module), the factory
(``create_model``) in :mod:`semask.hub.factory`."""
from ..core.registry import *  # noqa: F401,F403
from ..core.registry import (  # noqa: F401  (private tables, for tests that patch tags)
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    _aliases,
    _entrypoints,
    _kinds,
    _pretrained_cfgs,
    __all__,
)
