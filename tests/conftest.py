"""Shared fixtures: where the official parity tensors live, and tiny configs."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEMASK_SHARED_DIR", REPO_ROOT.parent / "shared"))
PARITY_DIR = Path(os.environ.get("SEMASK_PARITY_DIR", SHARED / "parity"))
CAMVID_DIR = Path(os.environ.get("SEMASK_CAMVID_DIR", SHARED / "data" / "camvid"))

# Tests use tiny models: one intra-op thread is faster than two spinning ones (and deterministic).
torch.set_num_threads(int(os.environ.get("SEMASK_TEST_THREADS", "1")))


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    msg = f"{what} not found at {path} (set SEMASK_PARITY_DIR / SEMASK_SHARED_DIR to point elsewhere)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + "; CI must have the fixtures")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return _require(PARITY_DIR, "parity fixtures")


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    return _require(CAMVID_DIR, "CamVid dataset")


def load_parity(name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of ``parity/<name>.safetensors`` (e.g. ``fpn/micro_windowed``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _require(PARITY_DIR / f"{name}.safetensors", f"parity fixture {name}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def fpn_backbone_kwargs(meta: Dict[str, str]) -> dict:
    """SeMaskSwinTransformer kwargs for an fpn/ parity fixture (from its official config)."""
    cfg = json.loads(meta["backbone_cfg"])
    kinds = json.loads(meta["semantic_layer_kinds"])
    return dict(
        num_classes=cfg["num_cls"], embed_dim=cfg["embed_dim"], depths=cfg["depths"], num_heads=cfg["num_heads"],
        window_size=cfg["window_size"], sem_window_size=cfg["sem_window_size"],
        sem_global=[k == "SeMaskBlock" for k in kinds], out_indices=cfg["out_indices"],
    )


TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, num_classes=5)


@pytest.fixture
def tiny_swin_kwargs() -> dict:
    return dict(TINY_SWIN)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty fake Hub cache, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: on a busy 2-core machine, tiny models run many times faster
    (measured ~40x for a tiny MiT training step) than with two spinning threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
