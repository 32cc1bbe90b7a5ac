"""ImageNet initialisation of SeMask Swin backbones from timm's Swin checkpoints on the Hub.

The official SeMask configs start from the Microsoft Swin ImageNet weights (T/S: IN-1k 224 window 7,
B/L: IN-22k 384 window 12). timm republishes them as safetensors in its Hub repos; timm's layout
differs from ours (= the official one) in one way: timm >= 0.9 puts ``downsample`` (PatchMerging) at
the *start* of stage i+1 (``layers.{i+1}.downsample``) where we have it at the end of stage i
(``layers.{i}.downsample``). The merge channel order is the same: timm reshapes
(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5), i.e. (0,0), (1,0), (0,1), (1,1) like ours
(tests/test_hub_timm.py checks features numerically against timm's own Swin).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .adapt import adapt_state_dict

__all__ = ["IMAGENET_SOURCES", "default_imagenet_source", "find_swin_backbone", "timm_swin_to_semask",
           "load_imagenet_backbone"]

_logger = logging.getLogger("semask.hub")

# (embed_dim, depths) -> timm model.tag holding the ImageNet weights the official configs start from
IMAGENET_SOURCES: Dict[Tuple[int, Tuple[int, ...]], str] = {
    (96, (2, 2, 6, 2)): "swin_tiny_patch4_window7_224.ms_in1k",
    (96, (2, 2, 18, 2)): "swin_small_patch4_window7_224.ms_in1k",
    (128, (2, 2, 18, 2)): "swin_base_patch4_window12_384.ms_in22k",
    (192, (2, 2, 18, 2)): "swin_large_patch4_window12_384.ms_in22k",
}
_IGNORED_PREFIXES = ("head.", "norm.")  # classifier and final norm: SeMask has per-stage norms instead


def find_swin_backbone(model: nn.Module) -> Tuple[str, nn.Module]:
    """(prefix, module) of the SeMask Swin backbone inside ``model`` (``""`` if it is the backbone)."""
    from ..backbones.swin import SeMaskSwinTransformer

    for name, m in model.named_modules():
        if isinstance(m, SeMaskSwinTransformer):
            return (name + "." if name else ""), m
    raise ValueError(f"{type(model).__name__} has no SeMask Swin backbone; pretrained_backbone applies to "
                     "Swin-based models only")


def default_imagenet_source(backbone: nn.Module) -> str:
    """``hf-hub:timm/<model.tag>`` of the ImageNet weights matching the backbone's size."""
    key = (backbone.embed_dim, tuple(backbone.depths))
    if key not in IMAGENET_SOURCES:
        raise ValueError(
            f"no default ImageNet weights for a Swin with embed_dim={key[0]}, depths={key[1]}; pass "
            "pretrained_backbone='hf-hub:timm/<swin repo>' or a path to a timm Swin .safetensors file"
        )
    from timm.models import get_pretrained_cfg

    name = IMAGENET_SOURCES[key]
    cfg = get_pretrained_cfg(name)
    return "hf-hub:" + (cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f"timm/{name}")


def timm_swin_to_semask(
    state: Mapping[str, torch.Tensor], backbone: nn.Module
) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Map a Swin ImageNet state dict (timm >= 0.9 layout, or the official/timm < 0.9 one) onto
    ``backbone`` (a :class:`SeMaskSwinTransformer`): the one place that knows timm's key layout.

    * ``layers.{i}.downsample.*`` (timm: start of stage i) -> ``layers.{i-1}.downsample.*``;
      official-layout checkpoints (``layers.0.downsample`` present) keep their indices;
    * ``head.*``, the final ``norm.*`` and recomputed buffers are dropped;
    * relative-position tables are resized to the backbone's window, the patch embedding is adapted
      to its ``in_chans`` (see :func:`semask.hub.adapt.adapt_state_dict`).
    Returns (mapped state, ignored checkpoint keys, adaptation notes).
    """
    official_layout = any(k.endswith("layers.0.downsample.reduction.weight") for k in state)
    mapped: Dict[str, torch.Tensor] = {}
    ignored: List[str] = []
    for key, v in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if not official_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        mapped[k] = v
    adapted, notes = adapt_state_dict(mapped, backbone.state_dict())
    ignored += [k for k in mapped if k not in adapted]  # recomputed buffers
    return adapted, ignored, notes


def _read_source(source: Union[bool, str, os.PathLike], backbone: nn.Module,
                 cache_dir: Optional[Union[str, os.PathLike]]) -> Tuple[str, Dict[str, torch.Tensor]]:
    from .hf import HUB_PREFIX, hub_download, parse_hub_name
    from .io import read_safetensors

    if source is True:
        source = default_imagenet_source(backbone)
    src = str(source)
    p = Path(src)
    if not src.startswith(HUB_PREFIX) and p.exists():
        return src, read_safetensors(p / "model.safetensors" if p.is_dir() else p)
    if not src.startswith(HUB_PREFIX) and (p.suffix or src.count("/") != 1):
        raise FileNotFoundError(f"pretrained_backbone={src!r} is neither an existing file/folder nor a Hub id "
                                "('hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k')")
    repo_id, revision = parse_hub_name(src)
    return f"{HUB_PREFIX}{repo_id}", read_safetensors(hub_download(repo_id, "model.safetensors", revision, cache_dir))


def load_imagenet_backbone(
    model: nn.Module,
    source: Union[bool, str, os.PathLike] = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, List[str]]:
    """Load ImageNet Swin weights into the SeMask Swin backbone of ``model`` (a backbone or a segmentor).

    Args:
        model: the model; its Swin backbone is found by type.
        source: True (timm's weights for the backbone's size, see ``IMAGENET_SOURCES``), an
            ``hf-hub:org/repo[@rev]`` id, or a path to a timm/official Swin ``.safetensors`` file.
        cache_dir: Hub cache (default ``$HF_HUB_CACHE``).
    Semantic layers, ``norm0..3`` and the heads keep their (official) initialisation. Every Swin
    trunk tensor (patch embedding, blocks, merges) must be in the checkpoint, else ValueError and
    nothing is loaded. Logs (``semask.hub`` logger) what was loaded and what was not.
    Returns ``dict(loaded=..., not_loaded=..., ignored=..., adapted=...)`` (backbone-relative keys).
    """
    from ..backbones.mit import SeMaskMiT, load_mit_pretrained

    if any(isinstance(m, SeMaskMiT) for m in model.modules()):  # SegFormer's MiT weights (nvidia/mit-bX)
        load_mit_pretrained(model, source, cache_dir=cache_dir)
        return dict(loaded=[], not_loaded=[], ignored=[], adapted=[])
    prefix, backbone = find_swin_backbone(model)
    name, state = _read_source(source, backbone, cache_dir)
    mapped, ignored, notes = timm_swin_to_semask(state, backbone)
    target = backbone.state_dict()
    unexpected = [k for k in mapped if k not in target]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
             if k in target and v.shape != target[k].shape]
    trunk_missing = [k for k in target if k not in mapped and (k.startswith("patch_embed.") or (
        k.startswith("layers.") and ".semantic_layer." not in k))]
    if unexpected or wrong or trunk_missing:
        raise ValueError(
            f"{name} does not fit this Swin backbone (embed_dim={backbone.embed_dim}, depths={backbone.depths}); "
            f"nothing was loaded. unexpected: {unexpected[:6]}, shape mismatch: {wrong[:6]}, missing: "
            f"{trunk_missing[:6]}. Use the ImageNet weights of the same Swin size (pretrained_backbone=True "
            "picks them)."
        )
    backbone.load_state_dict(mapped, strict=False)
    not_loaded = [k for k in target if k not in mapped]
    _logger.info("ImageNet init of %sbackbone from %s: loaded %d tensors; kept at init %d tensors (semantic "
                 "layers, per-stage norms): %s; ignored from the checkpoint: %s",
                 prefix, name, len(mapped), len(not_loaded), not_loaded, ignored)
    _logger.debug("ImageNet init from %s: loaded keys %s", name, sorted(mapped))
    for note in notes:
        _logger.info("ImageNet init from %s: adapted %s", name, note)
    return dict(loaded=sorted(mapped), not_loaded=not_loaded, ignored=ignored, adapted=notes)
