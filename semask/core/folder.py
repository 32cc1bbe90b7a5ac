"""Model folders: ``config.json`` (architecture, num_classes, build kwargs, pretrained cfg),
``model.safetensors`` and a model card ``README.md``; locally or as a Hugging Face Hub repo.

Written by ``save_pretrained`` / ``push_to_hub`` (and ``semask convert``); read back by
:func:`load_model_dir` (``semask.from_pretrained``, ``Model.from_pretrained``). Nothing is unpickled;
every load reads the whole checkpoint, validates it against the model and only then copies it in.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .adapt import load_checked
from .build import build_model
from .checkpoint import read_safetensors
from .hf import HUB_PREFIX, hub_download, parse_hub_name
from .model_card import render_model_card
from .registry import PretrainedCfg, get_pretrained_cfg, resolve_model_name

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "FORMAT", "check_architecture", "load_model_dir", "model_config",
    "push_to_hub", "read_config", "read_hub_repo", "read_model_dir", "save_pretrained",
]

_logger = logging.getLogger("semask.hub")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "semask/1"
PathLike = Union[str, os.PathLike]
_FIX = "save the model again (save_pretrained) or re-run `semask convert`"


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The config that rebuilds ``model`` with ``create_model`` (set when it was built)."""
    cfg = getattr(model, "semask_config", None)
    if cfg is None:
        raise ValueError("this model was not built by semask.create_model, so its config is unknown")
    return dict(cfg)


def save_pretrained(
    model: nn.Module,
    save_dir: PathLike,
    extra: Optional[Dict[str, Any]] = None,
    *,
    model_card: bool = True,
    metrics: Optional[Mapping[str, float]] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card) into ``save_dir``.

    Args:
        model: a model built by ``semask.create_model``.
        save_dir: output folder (created).
        extra: more config.json entries (e.g. ``metrics``, ``source``).
        model_card: also write the model card.
        metrics: scores for the card, e.g. ``{"miou": 43.1}`` (also stored in config.json).
        repo_id: Hub repo the folder is meant for (used in the card's usage snippet).
    Returns the folder.
    """
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model_config(model), **(extra or {})}
    if metrics:
        config["metrics"] = {**config.get("metrics", {}), **dict(metrics)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # every file is written under a temporary name, flushed to disk and renamed into place (weights
    # before config.json): an interrupted save never leaves a truncated file under a final name
    with _replacing(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with _replacing(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=list) + "\n")
    if model_card:
        n = sum(p.numel() for p in model.parameters())
        with _replacing(out / CARD_NAME) as tmp:
            tmp.write_text(render_model_card(config, repo_id=repo_id, num_params=n))
    return out


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_dir(src: PathLike, dst: PathLike) -> None:
    """Rename the finished folder ``src`` onto ``dst`` (same file system). An existing ``dst`` is
    first moved aside (a hidden temporary folder beside it) and deleted after the rename, so ``dst``
    is always either the old or the new folder, never a mix."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / "old")
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_config(path: PathLike) -> Dict[str, Any]:
    """A validated ``config.json``: a JSON object whose ``architecture`` (str), ``num_classes``
    (positive int), ``model_kwargs`` and ``pretrained_cfg`` (objects) have the right types.
    ValueError naming the file, the field and the fix otherwise."""
    p = Path(path)
    try:
        config = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {p} ({type(e).__name__}: {e}); it is corrupt or truncated: download or "
                         f"{_FIX}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{p} must hold a JSON object (architecture, num_classes, ...), got a JSON "
                         f"{type(config).__name__}; {_FIX}")
    fmt = config.get("format")
    if fmt is not None and not str(fmt).startswith("semask/"):
        raise ValueError(f"{p} is not a semask model config (format {fmt!r}); semask reads folders written by "
                         "`semask convert` or save_pretrained")
    arch = config.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise ValueError(f"{p}: 'architecture' must be a model name such as \"semask_swin_tiny_fpn\" (see "
                         f"semask.list_models()), got {arch!r}; fix the file or {_FIX}")
    k = config.get("num_classes")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{p}: 'num_classes' must be a positive integer, got {k!r}; fix the file or {_FIX}")
    for field in ("model_kwargs", "pretrained_cfg"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise ValueError(f"{p}: {field!r} must be a JSON object, got {type(config[field]).__name__}; "
                             f"fix the file or {_FIX}")
    if config.get("pretrained_cfg"):
        try:
            PretrainedCfg.from_dict(config["pretrained_cfg"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: 'pretrained_cfg' is malformed ({e}); fix the file or {_FIX}") from None
    return config


def read_model_dir(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config, state_dict) from a model folder or a ``.safetensors`` file (config may then be {})."""
    p = Path(path)
    if p.is_dir():
        cfg_path, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{p} has no {WEIGHTS_NAME}; expected a folder written by semask convert or "
                                    "save_pretrained")
        config = read_config(cfg_path) if cfg_path.exists() else {}
    elif p.suffix == ".safetensors" and p.exists():
        weights, config = p, {}
    elif not p.exists():
        raise FileNotFoundError(f"pretrained path {p} does not exist")
    else:
        raise ValueError(f"{p} is not a .safetensors file or a model folder; convert official .pth files with "
                         "`semask convert`")
    return config, read_safetensors(weights)


def read_hub_repo(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike]
                  ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config, state_dict) of a semask Hub repo (downloaded into the Hub cache)."""
    config = read_config(hub_download(repo_id, CONFIG_NAME, revision, cache_dir))
    return config, read_safetensors(hub_download(repo_id, WEIGHTS_NAME, revision, cache_dir))


def check_architecture(config: Mapping[str, Any], model: nn.Module, source: str) -> None:
    """ValueError when ``config`` describes another architecture than ``model`` was built as."""
    arch = config.get("architecture")
    own = getattr(model, "semask_config", {}).get("architecture")
    if not arch or not own:
        return
    try:
        arch_resolved = resolve_model_name(arch)[0]
    except ValueError:
        arch_resolved = arch
    if arch_resolved != own:
        raise ValueError(f"{source} holds a {arch!r} model, not {own!r}; nothing was loaded. Create it with "
                         f"semask.create_model({arch!r}, ...) or semask.from_pretrained({source!r}).")


def _looks_like_path(s: str) -> bool:
    """A string that cannot be a Hub id (``org/repo[@rev]``) or is spelled like a path."""
    if s.startswith((".", "/", "~")) or "\\" in s:
        return True
    try:
        parse_hub_name(s)
    except ValueError:
        return True
    return False


def load_model_dir(
    dir_or_repo: PathLike,
    num_classes: Optional[int] = None,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build and load a model from a folder (``config.json`` + ``model.safetensors``) or a Hub repo
    (``org/repo``, ``org/repo@rev`` or ``hf-hub:org/repo``), rebuilding the saved architecture.

    Args:
        dir_or_repo: local folder or Hub id.
        num_classes: a different K re-initialises only the class-dependent tensors.
        revision: Hub branch / tag / commit (overrides ``@rev``).
        cache_dir: Hub cache (default ``$HF_HUB_CACHE``).
        **kwargs: architecture overrides (e.g. ``in_chans=4``, ``window_size=12``: adapted on load).
    """
    s = os.fspath(dir_or_repo)
    is_hub = s.startswith(HUB_PREFIX)
    if not is_hub and Path(s).expanduser().exists():
        source = s
        config, state = read_model_dir(Path(s).expanduser())
        if not config:
            raise ValueError(f"{s} has no {CONFIG_NAME}, so its architecture is unknown; use "
                             "semask.create_model(name, pretrained=path) instead")
    elif not is_hub and _looks_like_path(s):
        raise FileNotFoundError(f"there is no local folder {s!r} (and it is not a Hub model id 'org/repo'); "
                                "check the path, or pass 'org/repo' / 'hf-hub:org/repo' for a Hub repo")
    else:
        repo_id, rev = parse_hub_name(s)
        rev = revision or rev
        source = f"{HUB_PREFIX}{repo_id}" + (f"@{rev}" if rev else "")
        try:
            config, state = read_hub_repo(repo_id, rev, cache_dir)
        except FileNotFoundError as e:
            if is_hub:
                raise
            raise FileNotFoundError(f"{e} (there is no local folder {s!r} either)") from None
    return build_from_config(config, state, source, num_classes, kwargs)


def build_from_config(config: Dict[str, Any], state: Dict[str, torch.Tensor], source: str,
                      num_classes: Optional[int] = None, overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The architecture ``config`` names, built with its saved kwargs (+ ``overrides``), with ``state``
    loaded through :func:`semask.core.adapt.load_checked`."""
    arch = config.get("architecture")
    if not arch:
        raise ValueError(f"{source}: config.json names no 'architecture'; it was not written by semask")
    try:
        arch = resolve_model_name(arch)[0]
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    saved_cfg = config.get("pretrained_cfg") or None
    tag = (saved_cfg or {}).get("tag") or ""
    try:
        name = f"{arch}.{tag}" if tag and get_pretrained_cfg(f"{arch}.{tag}") is not None else arch
    except ValueError:  # a tag this version does not know: build untagged, keep the saved metadata
        name = arch
    k_ckpt = config.get("num_classes")
    k = num_classes if num_classes is not None else k_ckpt
    model = build_model(name, num_classes=k, **{**(config.get("model_kwargs") or {}), **(overrides or {})})
    if saved_cfg is not None:  # the saved metadata (classes, palette, normalisation) is authoritative
        saved_cfg = PretrainedCfg.from_dict(saved_cfg).to_dict()  # JSON lists -> the cfg's tuples
        if k is not None and k != saved_cfg.get("num_classes", k):
            saved_cfg.update(num_classes=k, class_names=None, palette=None)
        model.pretrained_cfg = saved_cfg
        model.semask_config["pretrained_cfg"] = saved_cfg
    load_checked(model, state, source, num_classes=k_ckpt)
    _logger.info("built %s and loaded %d tensors from %s", name, len(state), source)
    return model


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str = "Upload SeMask model",
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    metrics: Optional[Mapping[str, float]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Any:
    """Create ``repo_id`` if needed and upload config.json + model.safetensors + README.md in one commit
    (``huggingface_hub.HfApi``; log in first with ``hf auth login`` or pass ``token``). Returns the
    ``CommitInfo``."""
    from huggingface_hub import HfApi

    parse_hub_name(repo_id)  # validates "org/repo"
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, extra, metrics=metrics, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)
