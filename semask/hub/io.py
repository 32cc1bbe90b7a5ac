"""Model folders: ``config.json`` (architecture, num_classes, build kwargs, pretrained cfg),
``model.safetensors`` and a model card ``README.md``. Written by ``semask convert`` and
``save_pretrained``; loaded by ``create_model(name, pretrained=True | DIR | FILE)``,
``create_model("hf-hub:org/repo[@rev]")`` and ``from_pretrained(DIR | "org/repo")``.

Nothing is unpickled: weights are safetensors only. Every load reads the whole checkpoint into a
state dict, validates it against the model and only then copies it in (no half-loaded models).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .adapt import load_checked
from .hf import HUB_PREFIX, hub_download, parse_hub_name
from .official import cached_official, describe_official, fetch_official, has_official_release

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "model_config", "save_pretrained", "read_model_dir",
    "read_safetensors", "load_pretrained", "create_from_hub", "from_pretrained", "push_to_hub",
]

_logger = logging.getLogger("semask.hub")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "semask/1"
PathLike = Union[str, os.PathLike]


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The config that rebuilds ``model`` with ``create_model`` (set by the registry at creation)."""
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
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=list) + "\n")
    if model_card:
        from .model_card import render_model_card

        n = sum(p.numel() for p in model.parameters())
        (out / CARD_NAME).write_text(render_model_card(config, repo_id=repo_id, num_params=n))
    return out


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (CPU); a clear ValueError if it is corrupt or truncated."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers/truncation
        raise ValueError(
            f"cannot read {path}: the file is corrupt or truncated ({e}). Delete it and download or convert it "
            "again (for a Hub cache file: create_model(..., cache_dir=...) after removing it, or `hf download "
            "--force-download`)."
        ) from e


def _read_config(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {path} ({e}); it is corrupt or truncated: download or save it again") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    fmt = config.get("format")
    if fmt is not None and not str(fmt).startswith("semask/"):
        raise ValueError(f"{path} is not a semask model config (format {fmt!r}); semask reads folders written by "
                         "`semask convert` or save_pretrained")
    return config


def read_model_dir(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config, state_dict) from a model folder or a ``.safetensors`` file (config may then be {})."""
    p = Path(path)
    if p.is_dir():
        cfg_path, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{p} has no {WEIGHTS_NAME}; expected a folder written by semask convert or save_pretrained")
        config = _read_config(cfg_path) if cfg_path.exists() else {}
    elif p.suffix == ".safetensors" and p.exists():
        weights, config = p, {}
    elif not p.exists():
        raise FileNotFoundError(f"pretrained path {p} does not exist")
    else:
        raise ValueError(f"{p} is not a .safetensors file or a model folder; convert official .pth files with `semask convert`")
    return config, read_safetensors(weights)


def _read_hub_repo(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike]
                   ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    config = _read_config(hub_download(repo_id, CONFIG_NAME, revision, cache_dir))
    return config, read_safetensors(hub_download(repo_id, WEIGHTS_NAME, revision, cache_dir))


def _is_hub_name(s: str) -> bool:
    return s.startswith(HUB_PREFIX)


def _check_architecture(config: Mapping[str, Any], model: nn.Module, source: str) -> None:
    from ..models._registry import resolve_model_name

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
            backbone without a tag gets the ImageNet Swin weights), a folder / ``.safetensors`` file,
            or ``hf-hub:org/repo[@rev]``.
        cfg: the tag's :class:`PretrainedCfg` (for ``pretrained=True``).
        name: the requested model name (for messages).
        revision: Hub branch / tag / commit (default ``cfg.hf_hub_revision``, else ``main``).
        cache_dir: Hub cache folder (default ``$HF_HUB_CACHE``).
    A class count / input channels / window different from the checkpoint's are adapted (see
    :func:`semask.hub.adapt.load_checked`).
    """
    if pretrained is True:
        if cfg is None:
            from .timm_init import find_swin_backbone, load_imagenet_backbone

            try:
                prefix = find_swin_backbone(model)[0]
            except ValueError:
                prefix = None
            # a bare backbone (or timm's features_only wrapper of one): its pretrained weights are ImageNet's
            if prefix == "" or (prefix is not None and not hasattr(model, "semask_config")):
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
                config, state = _read_hub_repo(repo_id, rev, cache_dir)
            except FileNotFoundError as e:
                if not release or revision is not None:
                    raise
                folder = fetch_official(cfg, hub_error=e)
        if folder is not None:
            source = describe_official(folder)
            config, state = read_model_dir(folder)
    elif isinstance(pretrained, str) and _is_hub_name(pretrained):
        repo_id, rev = parse_hub_name(pretrained)
        rev = revision or rev
        source = pretrained
        config, state = _read_hub_repo(repo_id, rev, cache_dir)
    elif isinstance(pretrained, (str, os.PathLike)):
        source = str(pretrained)
        config, state = read_model_dir(pretrained)
    else:
        raise TypeError(f"pretrained must be a bool, a path or 'hf-hub:org/repo', got {type(pretrained).__name__}")
    _check_architecture(config, model, source)
    load_checked(model, state, source, num_classes=config.get("num_classes"))
    _logger.info("loaded %d tensors into %s from %s", len(state), name or type(model).__name__, source)
    return model


def from_pretrained(
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
    s = str(dir_or_repo)
    if not _is_hub_name(s) and Path(s).exists():
        source = s
        config, state = read_model_dir(s)
        if not config:
            raise ValueError(f"{s} has no {CONFIG_NAME}, so its architecture is unknown; use "
                             "semask.create_model(name, pretrained=path) instead")
    else:
        repo_id, rev = parse_hub_name(s)
        rev = revision or rev
        source = f"{HUB_PREFIX}{repo_id}" + (f"@{rev}" if rev else "")
        try:
            config, state = _read_hub_repo(repo_id, rev, cache_dir)
        except FileNotFoundError as e:
            if _is_hub_name(s):
                raise
            raise FileNotFoundError(f"{e} (there is no local folder {s!r} either)") from e
    return _build_and_load(config, state, source, num_classes, kwargs)


def _build_and_load(config: Dict[str, Any], state: Dict[str, torch.Tensor], source: str,
                    num_classes: Optional[int], overrides: Dict[str, Any]) -> nn.Module:
    from ..models._registry import PretrainedCfg, _pretrained_cfgs, create_model, resolve_model_name

    arch = config.get("architecture")
    if not arch:
        raise ValueError(f"{source}: config.json names no 'architecture'; it was not written by semask")
    arch = resolve_model_name(arch)[0]
    saved_cfg = config.get("pretrained_cfg") or None
    tag = (saved_cfg or {}).get("tag") or ""
    name = f"{arch}.{tag}" if tag in _pretrained_cfgs.get(arch, {}) else arch
    k_ckpt = config.get("num_classes")
    k = num_classes if num_classes is not None else k_ckpt
    model = create_model(name, num_classes=k, **{**(config.get("model_kwargs") or {}), **overrides})
    if saved_cfg is not None:  # the saved metadata (classes, palette, normalisation) is authoritative
        saved_cfg = PretrainedCfg.from_dict(saved_cfg).to_dict()  # JSON lists -> the cfg's tuples
        if k != saved_cfg.get("num_classes", k):
            saved_cfg.update(num_classes=k, class_names=None, palette=None)
        model.pretrained_cfg = saved_cfg
        model.semask_config["pretrained_cfg"] = saved_cfg
    load_checked(model, state, source, num_classes=k_ckpt)
    _logger.info("built %s and loaded %d tensors from %s", name, len(state), source)
    return model


def create_from_hub(name: str, num_classes: Optional[int] = None, *, revision: Optional[str] = None,
                    cache_dir: Optional[PathLike] = None, **kwargs: Any) -> nn.Module:
    """``create_model("hf-hub:org/repo[@rev]")``: read the repo's config.json, build, load its weights."""
    if not _is_hub_name(name):
        raise ValueError(f"{name!r} is not an 'hf-hub:org/repo[@rev]' name")
    return from_pretrained(name, num_classes, revision=revision, cache_dir=cache_dir, **kwargs)


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
