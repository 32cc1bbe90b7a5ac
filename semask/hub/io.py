"""Loading weights into a built model: ``create_model(name, pretrained=True | DIR | FILE | hf-hub:...)``.

The model-folder format itself (``config.json`` + ``model.safetensors`` + ``README.md``, written by
``semask convert`` and ``save_pretrained``) lives in :mod:`semask.core.folder`; its names are
re-exported here. Nothing is unpickled: weights are safetensors only. Every load reads the whole
checkpoint into a state dict, validates it against the model and only then copies it in.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch.nn as nn

from ..core.adapt import load_checked
from ..core.checkpoint import read_safetensors
from ..core.folder import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    check_architecture,
    load_model_dir,
    model_config,
    push_to_hub,
    read_config,
    read_hub_repo,
    read_model_dir,
    save_pretrained,
)
from ..core.folder import load_model_dir as from_pretrained  # noqa: F401  (older name; see semask.hub.factory)
from ..core.hf import HUB_PREFIX, parse_hub_name
from .timm_init import has_imagenet_backbone, is_imagenet_backbone, load_imagenet_backbone
from .official import cached_official, describe_official, fetch_official, has_official_release

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "FORMAT", "model_config", "save_pretrained", "read_config",
    "read_model_dir", "read_safetensors", "load_pretrained", "create_from_hub", "push_to_hub",
]

_logger = logging.getLogger("semask.hub")
PathLike = Union[str, os.PathLike]


def load_pretrained(
    model: nn.Module,
    pretrained: Union[bool, str, os.PathLike],
    cfg: Any = None,
    name: str = "",
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
) -> nn.Module:
    """Load weights into ``model`` (validated first, so a failure leaves it unchanged).

    Args:
        model: built by ``create_model`` (its ``semask_config`` names the architecture).
        pretrained: True for the tag's published weights (``cfg.hf_hub_id`` on the Hub; a bare
            backbone without a tag gets its ImageNet weights), a folder / ``.safetensors`` file,
            or ``hf-hub:org/repo[@rev]``.
        cfg: the tag's :class:`PretrainedCfg` (for ``pretrained=True``).
        name: the requested model name (for messages).
        revision: Hub branch / tag / commit (default ``cfg.hf_hub_revision``, else ``main``).
        cache_dir: Hub cache folder (default ``$HF_HUB_CACHE``).
    A class count / input channels / window different from the checkpoint's are adapted (see
    :func:`semask.core.adapt.load_checked`).
    """
    if pretrained is True:
        if cfg is None:
            # a bare backbone (or timm's features_only wrapper of one): its pretrained weights are ImageNet's
            if is_imagenet_backbone(model) or (has_imagenet_backbone(model) and not hasattr(model, "semask_config")):
                load_imagenet_backbone(model, True, cache_dir=cache_dir)
                return model
            raise ValueError(f"{name or type(model).__name__} has no pretrained tag; pick one of "
                             "semask.list_pretrained() or pass pretrained=<folder | .safetensors | hf-hub:org/repo>")
        release = has_official_release(cfg)
        if not cfg.hf_hub_id and not release:
            raise ValueError(f"no published weights for {cfg.full_name} (its hf_hub_id is not set). Convert the "
                             "official checkpoint with `semask convert` and pass pretrained=<output folder>.")
        repo_id, rev = cfg.hf_hub_id, revision or cfg.hf_hub_revision
        source = f"{HUB_PREFIX}{repo_id}" + (f"@{rev}" if rev else "")
        # the Hub, else the official release (converted once into the semask cache, then read offline)
        folder = cached_official(cfg) if revision is None else None
        if folder is None:
            try:
                if not repo_id:
                    raise FileNotFoundError(f"{cfg.full_name} is not published on the Hub (no hf_hub_id)")
                config, state = read_hub_repo(repo_id, rev, cache_dir)
            except FileNotFoundError as e:
                if not release or revision is not None:
                    raise
                folder = fetch_official(cfg, hub_error=e)
        if folder is not None:
            source = describe_official(folder)
            config, state = read_model_dir(folder)
    elif isinstance(pretrained, str) and pretrained.startswith(HUB_PREFIX):
        repo_id, rev = parse_hub_name(pretrained)
        rev = revision or rev
        source = pretrained
        config, state = read_hub_repo(repo_id, rev, cache_dir)
    elif isinstance(pretrained, (str, os.PathLike)):
        source = os.fspath(pretrained)
        config, state = read_model_dir(pretrained)
    else:
        raise TypeError(f"pretrained must be a bool, a path or 'hf-hub:org/repo', got {type(pretrained).__name__}")
    check_architecture(config, model, source)
    load_checked(model, state, source, num_classes=config.get("num_classes"))
    _logger.info("loaded %d tensors into %s from %s", len(state), name or type(model).__name__, source)
    return model


def create_from_hub(name: str, num_classes: Optional[int] = None, *, revision: Optional[str] = None,
                    cache_dir: Optional[PathLike] = None, **kwargs: Any) -> nn.Module:
    """``create_model("hf-hub:org/repo[@rev]")``: read the repo's config.json, build, load its weights."""
    if not name.startswith(HUB_PREFIX):
        raise ValueError(f"{name!r} is not an 'hf-hub:org/repo[@rev]' name")
    return load_model_dir(name, num_classes, revision=revision, cache_dir=cache_dir, **kwargs)
