"""Build a registered architecture and record the config that rebuilds it (``model.semask_config``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch.nn as nn

from .registry import PretrainedCfg, get_entrypoint, get_pretrained_cfg, resolve_model_name

__all__ = ["build_model"]

DEFAULT_NUM_CLASSES = 150


def build_model(
    name: str,
    num_classes: Optional[int] = None,
    *,
    pretrained_cfg: Optional[PretrainedCfg] = None,
    build_only: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``name[.tag]`` built with the tag's ``arch_kwargs`` (the default tag's when untagged) updated by
    ``kwargs``; no weights are loaded.

    Args:
        name: registered architecture, alias or ``name.tag``.
        num_classes: K (default: the tag's, else 150).
        pretrained_cfg: metadata to attach instead of the tag's (e.g. the one a model folder saved).
        build_only: entry-point arguments that are not part of the saved config (``pretrained_backbone``).
        **kwargs: architecture overrides (strict: unknown names raise TypeError).
    The model gets ``semask_config`` (architecture, num_classes, model_kwargs, pretrained_cfg: what
    ``save_pretrained`` writes to ``config.json``) and ``pretrained_cfg`` (a dict) when a cfg is known.
    """
    arch, _ = resolve_model_name(name)
    tag_cfg = get_pretrained_cfg(name)
    cfg = pretrained_cfg if pretrained_cfg is not None else tag_cfg
    model_kwargs = {**(dict(tag_cfg.arch_kwargs) if tag_cfg is not None else {}), **kwargs}
    if num_classes is None:
        num_classes = cfg.num_classes if cfg is not None else DEFAULT_NUM_CLASSES
    model = get_entrypoint(arch)(num_classes=num_classes, **model_kwargs, **dict(build_only or {}))
    model.semask_config = dict(architecture=arch, num_classes=num_classes, model_kwargs=model_kwargs,
                               pretrained_cfg=cfg.to_dict() if cfg is not None else None)
    if cfg is not None:
        model.pretrained_cfg = cfg.to_dict()
    return model
