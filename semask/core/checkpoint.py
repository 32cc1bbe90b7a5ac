"""Reading weight files that semask did not write, without ever executing a pickle.

Every path that reads a user's or a third party's file goes through here (also timm's and SegFormer's
ImageNet weights: timm's own loader would ``torch.load`` a ``.bin`` unsafely on torch < 2.6 with
older timm releases):

* ``.safetensors``: :func:`read_safetensors` (corrupt / truncated files -> ValueError naming the file);
* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: :func:`read_torch_file` = ``torch.load(weights_only=True)``
  with a data-only allowlist (numpy scalars that mmcv stores in ``meta``); pickled objects are refused
  and named, never run;
* a folder: its ``model.safetensors`` (else ``pytorch_model.bin``).

:func:`check_dtypes` refuses integer / bool tensors for floating-point weights (and the reverse),
which ``load_state_dict`` would otherwise cast silently.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .hf import HUB_PREFIX, hub_download, parse_hub_name

__all__ = [
    "SAFETENSORS_NAME", "TORCH_SUFFIXES", "check_dtypes", "load_timm_pretrained", "read_hub_weights",
    "read_safetensors", "read_state_dict", "read_torch_file", "unwrap_state_dict",
]

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

SAFETENSORS_NAME = "model.safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_safetensors(path: PathLike) -> StateDict:
    """All tensors of a ``.safetensors`` file (CPU); a clear ValueError if it is corrupt or truncated."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist" if not p.exists() else f"{p} is a folder, not a .safetensors file")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for corrupt headers / truncation
        raise ValueError(
            f"cannot read {p}: the file is corrupt or truncated ({type(e).__name__}: {e}). Delete it and download "
            "or convert it again (for a Hub cache file: remove it and call create_model(..., cache_dir=...) again, "
            "or `hf download --force-download`)."
        ) from None


def _numpy_safe_globals() -> list:
    """numpy scalars / arrays that mmcv may store in ``meta`` (e.g. best scores): data only."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    core = getattr(np, "_core", None) or np.core
    out: list = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                        "uint8", "bool")]
    # files written under numpy 1.x (the official ones) name these numpy.core.multiarray.*
    out += [(core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    return out


def read_torch_file(path: PathLike) -> Any:
    """The object of a ``torch.save`` file read with ``torch.load(weights_only=True)`` (tensors, plain
    containers, numpy scalars); nothing else is unpickled.

    Raises ValueError for truncated / foreign files and for pickles holding other objects (which are
    named and never executed); FileNotFoundError when ``path`` is not a file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist" if not p.exists() else
                                f"{p} is a folder, not a checkpoint file")
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if safe_globals is not None:
            with safe_globals(_numpy_safe_globals()):
                return torch.load(p, map_location="cpu", weights_only=True)
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            raise ValueError(
                f"{p} holds pickled Python objects that are not tensors ({', '.join(found) or 'see the cause'}); "
                "they were NOT loaded, because unpickling them could run arbitrary code. If you trust the file, "
                "re-save only its tensors: torch.save({'state_dict': sd}, 'clean.pth')."
            ) from None
        raise ValueError(f"cannot read {p}: it is corrupt or not a PyTorch checkpoint ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"cannot read {p}: the file is truncated or not a PyTorch checkpoint ({type(e).__name__}: {first}); "
            "download it again"
        ) from None


def _as_tensor(value: Any) -> Any:
    """detectron2 checkpoints may hold numpy arrays instead of tensors: an owned tensor copy of those."""
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return torch.as_tensor(value).clone()
    return value


def unwrap_state_dict(obj: Any, source: str) -> Tuple[StateDict, Dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint object: mmseg ``{'meta', 'state_dict'}``, detectron2
    ``{'model', ...}`` or a bare state dict; a DDP ``module.`` prefix is stripped."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a checkpoint dict")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            break
    else:
        sd = obj  # a bare state dict
    sd = {k: _as_tensor(v) for k, v in sd.items()}
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source} has no tensors under 'state_dict' or 'model' (keys: {sorted(map(str, obj))[:10]})")
    others = sorted(str(k) for k in sd if k not in tensors)
    if others:
        raise ValueError(f"{source}: state dict entries that are not tensors: {others[:10]}")
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, meta


def read_state_dict(path: PathLike) -> StateDict:
    """The tensors of a weights file or folder, read safely (see the module doc).

    ``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` (``weights_only=True``, unwrapped from
    ``state_dict`` / ``model``); a folder holding ``model.safetensors`` or ``pytorch_model.bin``.
    """
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in (SAFETENSORS_NAME, "pytorch_model.bin") if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{p} holds neither {SAFETENSORS_NAME} nor pytorch_model.bin")
        p = found[0]
    if not p.exists():
        raise FileNotFoundError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    if p.suffix in TORCH_SUFFIXES:
        return unwrap_state_dict(read_torch_file(p), str(p))[0]
    with open(p, "rb") as f:  # no telling suffix: safetensors starts with an 8-byte header length, torch with a zip
        magic = f.read(4)
    if magic.startswith(b"PK"):
        return unwrap_state_dict(read_torch_file(p), str(p))[0]
    return read_safetensors(p)


def check_dtypes(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], source: str) -> None:
    """ValueError when a checkpoint tensor's kind (floating point / integer / bool) differs from the
    model's tensor of the same key (``load_state_dict`` would cast it silently: 1 -> 1.0, True -> 1.0)."""

    def kind(t: torch.Tensor) -> str:
        if t.dtype == torch.bool:
            return "bool"
        return "float" if t.is_floating_point() or t.is_complex() else "int"

    bad: List[str] = [f"{k}: {v.dtype} vs model {target[k].dtype}" for k, v in state.items()
                      if k in target and kind(v) != kind(target[k])]
    if bad:
        raise ValueError(
            f"{source} stores {len(bad)} tensor(s) with a dtype that does not fit the model ({'; '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}); nothing was loaded. The file was not written for this model "
            "or was damaged: re-export it with floating-point weights."
        )


def read_hub_weights(repo: str, cache_dir: Optional[PathLike] = None,
                     filenames: Sequence[str] = (SAFETENSORS_NAME, "pytorch_model.bin")) -> Tuple[str, StateDict]:
    """``(source, tensors)`` of the first of ``filenames`` present in Hub repo ``repo``
    (``[hf-hub:]org/repo[@rev]``), downloaded into the Hub cache and read safely."""
    repo_id, revision = parse_hub_name(repo)
    source = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    first: Optional[FileNotFoundError] = None
    for name in filenames:
        try:
            path = hub_download(repo_id, name, revision, cache_dir)
        except FileNotFoundError as e:  # not in the repo, or (offline) not in the cache: try the next name
            first = first or e
            continue
        return f"{source} ({name})", read_state_dict(path)
    assert first is not None
    raise first


def _first_conv_in_chans(model: nn.Module, first_conv: Optional[str]) -> int:
    try:
        return int(model.get_submodule(first_conv).in_channels) if first_conv else 3
    except (AttributeError, TypeError):
        return 3


def load_timm_pretrained(model: nn.Module, source: Any = True,
                         cache_dir: Optional[PathLike] = None) -> str:
    """Load weights into a timm model (built with ``pretrained=False``): read safely here, then
    adapted by timm (its model file's ``checkpoint_filter_fn``, ``in_chans``, a classifier of another
    size), as ``timm.create_model(..., pretrained=True)`` would, without timm's own file reading.

    Args:
        model: a model built by ``timm.create_model`` (its ``pretrained_cfg`` names the weights).
        source: True (timm's default weights: its ``hf_hub_id`` on the Hub), ``hf-hub:org/repo[@rev]``,
            or a weights file / folder (timm layout; ``.safetensors``, or ``.pth`` / ``.bin`` read with
            ``weights_only=True``).
        cache_dir: Hub cache (default ``$HF_HUB_CACHE``).
    Returns the source read. ValueError naming it when the weights do not fit.
    """
    import sys

    from timm.models import load_pretrained

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture") or type(model).__name__
    if source is True:
        hub_id = cfg.get("hf_hub_id")
        if not hub_id:
            raise ValueError(f"timm publishes no Hub weights for {arch}; pass pretrained_backbone=<weights file>")
        names = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else (SAFETENSORS_NAME, "pytorch_model.bin")
        name, state = read_hub_weights(hub_id, cache_dir, names)
    elif isinstance(source, str) and source.startswith(HUB_PREFIX):
        name, state = read_hub_weights(source, cache_dir)
    elif isinstance(source, (str, os.PathLike)):
        name, state = os.fspath(source), read_state_dict(source)
    else:
        raise TypeError(f"pretrained_backbone must be True, a path or 'hf-hub:org/repo', got {type(source).__name__}")
    check_dtypes(state, model.state_dict(), name)
    module = sys.modules.get(type(model).__module__)
    cfg.update(state_dict=state, source="", file=None, url="", hf_hub_id=None)
    try:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=getattr(model, "num_classes", cfg.get("num_classes", 1000)),
                        in_chans=_first_conv_in_chans(model, cfg.get("first_conv")),
                        filter_fn=getattr(module, "checkpoint_filter_fn", None), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"the weights in {name} do not fit the timm model {arch} "
                         f"({why[:500]}). Pass the weights of the same timm architecture.") from None
    return name
