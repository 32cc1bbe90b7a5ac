"""Fit a checkpoint to a model before loading it: window size, input channels and class count.

Everything is decided on the state dict first; the model is only touched once the whole checkpoint
has been validated, so a failed load never leaves a half-loaded model.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple
from timm.models._manipulate import adapt_input_conv

from .build import build_model
from .checkpoint import check_dtypes

__all__ = ["adapt_state_dict", "class_dependent_keys", "load_checked", "window_of_table", "RECOMPUTED_BUFFERS"]

_logger = logging.getLogger("semask.hub")

# buffers that official checkpoints store but our models recompute (non-persistent here)
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
_REL_TABLE = "relative_position_bias_table"
_PATCH_CONV = "patch_embed.proj.weight"


def window_of_table(rows: int) -> int:
    """The window w of a relative-position table with (2w-1)**2 rows."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"a relative-position table with {rows} rows is not (2*window-1)**2")
    return (side + 1) // 2


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Adapt ``state`` to the tensors of ``target`` (a model's state dict); returns (new state, notes).

    * drops buffers that the model recomputes (``relative_position_index``, ``attn_mask``);
    * resizes ``relative_position_bias_table`` ((2w-1)^2, heads) bicubically to the model's window
      (timm's ``resize_rel_pos_bias_table_simple``, as the official mmseg loader does);
    * adapts ``patch_embed.proj.weight`` (O, 3, p, p) to the model's input channels with timm's
      ``adapt_input_conv`` (sum for 1 channel, repeat + rescale otherwise).
    Other keys are passed through unchanged (shape checks happen in :func:`load_checked`).
    """
    out: Dict[str, torch.Tensor] = {}
    notes: List[str] = []
    for k, v in state.items():
        if k.endswith(RECOMPUTED_BUFFERS) and k not in target:
            continue
        t = target.get(k)
        if t is not None and tuple(v.shape) != tuple(t.shape):
            if k.endswith(_REL_TABLE) and v.ndim == 2 and v.shape[1] == t.shape[1]:
                w_old, w_new = window_of_table(v.shape[0]), window_of_table(t.shape[0])
                v = resize_rel_pos_bias_table_simple(v.float(), (w_new, w_new), tuple(t.shape)).to(v.dtype)
                notes.append(f"{k}: window {w_old} -> {w_new} (bicubic)")
            elif k.endswith(_PATCH_CONV) and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
                v = adapt_input_conv(t.shape[1], v, base_chans=v.shape[1])
                notes.append(f"{k}: in_chans {state[k].shape[1]} -> {t.shape[1]}")
        out[k] = v
    return out, notes


def _num_classes_from_shapes(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                             k_model: int) -> Optional[int]:
    """The checkpoint's K, read off a tensor that differs from the model's in exactly one K-sized dim."""
    for key, v in state.items():
        t = target.get(key)
        if t is None or v.ndim != t.ndim or tuple(v.shape) == tuple(t.shape):
            continue
        diff = [i for i in range(v.ndim) if v.shape[i] != t.shape[i]]
        if len(diff) == 1 and t.shape[diff[0]] == k_model:
            return int(v.shape[diff[0]])
    return None


def class_dependent_keys(model: nn.Module, k_ckpt: int) -> Set[str]:
    """Keys whose shape depends on the class count: those that differ between ``model`` and the same
    architecture rebuilt on the meta device with ``k_ckpt`` classes (needs ``model.semask_config``)."""
    cfg = getattr(model, "semask_config", None)
    if not cfg:
        raise ValueError("cannot adapt the class count of a model not built by semask.create_model; "
                         "build it with create_model(..., num_classes=K)")
    with torch.device("meta"):
        ref = build_model(cfg["architecture"], num_classes=k_ckpt, **cfg.get("model_kwargs", {}))
    ref_state = ref.state_dict()
    return {k for k, v in model.state_dict().items() if k in ref_state and ref_state[k].shape != v.shape}


def load_checked(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    num_classes: Optional[int] = None,
) -> Dict[str, Any]:
    """Adapt ``state`` (window, in_chans, K), validate every key and shape, then load it into ``model``.

    Args:
        model: the target, built with the wanted ``num_classes`` / ``in_chans`` / window.
        state: the checkpoint's tensors (keys as in ``model.state_dict()``).
        source: where ``state`` comes from (for messages).
        num_classes: the checkpoint's K when known (config.json); inferred from shapes otherwise.
    Returns:
        ``dict(adapted=[...], reinitialised=[...])``.
    Raises:
        ValueError naming missing / unexpected / mis-shaped keys or tensors of the wrong dtype kind
        (integer / bool for floating-point weights); the model is then left unchanged.
    """
    target = model.state_dict()
    check_dtypes(state, target, source)
    new, notes = adapt_state_dict(state, target)
    k_model = getattr(model, "num_classes", None)
    k_ckpt = num_classes
    if k_ckpt is None and k_model is not None:
        k_ckpt = _num_classes_from_shapes(new, target, k_model)
    reinit: Set[str] = set()
    if k_model is not None and k_ckpt is not None and k_ckpt != k_model:
        reinit = class_dependent_keys(model, k_ckpt)
        for k in reinit:
            new.pop(k, None)
    missing = [k for k in target if k not in new and k not in reinit]
    unexpected = [k for k in new if k not in target]
    wrong = [f"{k}: checkpoint {tuple(new[k].shape)} vs model {tuple(target[k].shape)}"
             for k in new if k in target and new[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} ({len(keys)}): {keys[:6]}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        arch = getattr(model, "semask_config", {}).get("architecture", type(model).__name__)
        raise ValueError(
            f"the weights in {source} do not fit {arch}; nothing was loaded. " + "; ".join(parts)
            + ". Build the model with the checkpoint's architecture kwargs (see its config.json) or use "
            "semask.from_pretrained(...), which reads them."
        )
    model.load_state_dict(new, strict=False)
    if reinit:
        # re-draw the class-dependent tensors with the model's own (official) initialisation
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(k_model)
        elif hasattr(model, "reset_classes"):
            model.reset_classes(k_model)
        _logger.info("%s: checkpoint has %d classes, the model %d: re-initialised %d class-dependent tensors %s",
                     source, k_ckpt, k_model, len(reinit), sorted(reinit))
    for note in notes:
        _logger.info("%s: adapted %s", source, note)
    return dict(adapted=notes, reinitialised=sorted(reinit))
