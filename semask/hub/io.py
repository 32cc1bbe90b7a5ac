"""Model folders: ``config.json`` (architecture, num_classes, build kwargs, pretrained cfg) and
``model.safetensors``. Written by ``semask convert`` and ``save_pretrained``; loaded by
``create_model(name, pretrained=DIR)``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "semask/1"


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The config that rebuilds ``model`` with ``create_model`` (set by the registry at creation)."""
    cfg = getattr(model, "semask_config", None)
    if cfg is None:
        raise ValueError("this model was not built by semask.create_model, so its config is unknown")
    return dict(cfg)


def save_pretrained(model: nn.Module, save_dir: Union[str, os.PathLike], extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``save_dir``; returns the folder."""
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model_config(model), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=list) + "\n")
    return out


def read_model_dir(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config, state_dict) from a model folder or a ``.safetensors`` file (config may then be {})."""
    p = Path(path)
    if p.is_dir():
        cfg_path, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{p} has no {WEIGHTS_NAME}; expected a folder written by semask convert or save_pretrained")
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    elif p.suffix == ".safetensors" and p.exists():
        weights, config = p, {}
    elif not p.exists():
        raise FileNotFoundError(f"pretrained path {p} does not exist")
    else:
        raise ValueError(f"{p} is not a .safetensors file or a model folder; convert official .pth files with `semask convert`")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers/truncation
        raise ValueError(f"cannot read {weights}: the file is corrupt or truncated ({e}); download or convert it again") from e
    return config, state


def load_pretrained(model: nn.Module, pretrained: Union[bool, str, os.PathLike], cfg: Any = None, name: str = "") -> nn.Module:
    """Load weights into ``model`` from a folder or ``.safetensors`` file (strict)."""
    if pretrained is True:
        raise NotImplementedError("loading published weights from the Hugging Face Hub is not available yet")
    config, state = read_model_dir(pretrained)
    arch = config.get("architecture")
    own = getattr(model, "semask_config", {}).get("architecture")
    if arch and own and arch != own:
        raise ValueError(f"{pretrained} holds a {arch!r} model, not {own!r}; create it with semask.create_model({arch!r}, ...)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in {pretrained} do not fit {own or type(model).__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


def create_from_hub(name: str, num_classes: Optional[int] = None, **kwargs: Any) -> nn.Module:
    raise NotImplementedError("hf-hub: names are not available yet")
