"""The factory: ``create_model`` and ``from_pretrained``, on top of the registry, the model files and
the loading code (nothing below imports this module)."""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch.nn as nn

from ..core.build import build_model
from ..core.folder import CONFIG_NAME, load_model_dir, read_config
from ..core.hf import HUB_PREFIX
from ..core.registry import PretrainedCfg, get_pretrained_cfg, model_kind, resolve_model_name, takes_pretrained_backbone
from .io import create_from_hub, load_pretrained
from .timm_init import load_imagenet_backbone

__all__ = ["create_model", "from_pretrained"]

PathLike = Union[str, os.PathLike]


def create_model(
    name: str,
    pretrained: Union[bool, str, os.PathLike] = False,
    num_classes: Optional[int] = None,
    *,
    pretrained_backbone: Union[bool, str, os.PathLike] = False,
    cache_dir: Optional[PathLike] = None,
    revision: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: ``architecture[.tag]`` or an alias (``semask_swin_b_fpn.ade20k``) or ``hf-hub:org/repo[@rev]``.
        pretrained: False; True for the tag's published weights (a bare backbone: its ImageNet
            weights); a folder / ``.safetensors`` file / ``hf-hub:`` id to load from.
        num_classes: classes K; defaults to the tag's (150 when untagged). A K different from the
            loaded weights re-initialises only the class-dependent tensors.
        pretrained_backbone: True loads the ImageNet weights of the backbone's trunk (Swin: timm's
            Swin of the same size; MiT: ``nvidia/mit-bX``; wrapped timm backbones: timm's default
            weights); semantic layers, norms and heads keep their init. Or an ``hf-hub:`` id / a path
            (``.safetensors``; ``.pth`` / ``.bin`` are read with ``weights_only=True``).
        cache_dir: Hugging Face Hub cache (default ``$HF_HUB_CACHE``).
        revision: Hub branch / tag / commit of the weights (default: the tag's ``hf_hub_revision``).
        **kwargs: architecture overrides (strict: unknown names raise TypeError).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string such as 'semask_swin_tiny_fpn', got {type(name).__name__}")
    if name.startswith(HUB_PREFIX):
        return create_from_hub(name, num_classes=num_classes, revision=revision, cache_dir=cache_dir, **kwargs)
    if pretrained and pretrained_backbone:
        raise ValueError("pass either pretrained (whole-model weights) or pretrained_backbone (ImageNet init), not both")
    arch, _ = resolve_model_name(name)
    saved_cfg: Optional[PretrainedCfg] = None
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isfile(os.path.join(pretrained, CONFIG_NAME)):
        saved = read_config(os.path.join(pretrained, CONFIG_NAME))
        if saved.get("architecture") == arch:  # a model folder: rebuild the architecture it was saved with
            tag_cfg = get_pretrained_cfg(name)
            kwargs = {**(dict(tag_cfg.arch_kwargs) if tag_cfg else {}), **(saved.get("model_kwargs") or {}), **kwargs}
            if saved.get("pretrained_cfg"):
                saved_cfg = PretrainedCfg.from_dict(saved["pretrained_cfg"])
            if num_classes is None:
                num_classes = saved.get("num_classes")
    build_only = {}
    if pretrained_backbone and takes_pretrained_backbone(arch):
        build_only["pretrained_backbone"], pretrained_backbone = pretrained_backbone, False
    if pretrained is True and model_kind(arch) == "backbone" and get_pretrained_cfg(name) is None:
        # a bare backbone's pretrained weights are its ImageNet ones, which its own file loads
        build_only["pretrained"], pretrained = True, False
    model = build_model(name, num_classes, pretrained_cfg=saved_cfg, build_only=build_only, **kwargs)
    if pretrained_backbone:
        load_imagenet_backbone(model, pretrained_backbone, cache_dir=cache_dir)
    if pretrained:
        load_pretrained(model, pretrained, cfg=get_pretrained_cfg(name), name=name, revision=revision,
                        cache_dir=cache_dir)
    return model


# ``semask.from_pretrained``: the folder / Hub loader of the model-folder format (rebuilds the saved
# architecture, then loads its weights)
from_pretrained = load_model_dir
