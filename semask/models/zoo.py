"""The model zoo table, generated from the registry (so the docs cannot drift from the code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..core.build import build_model
from ..core.registry import get_pretrained_cfg, list_models

__all__ = ["ZooRow", "model_zoo", "model_zoo_markdown", "count_flops"]


@dataclass
class ZooRow:
    name: str
    dataset: str
    num_classes: int
    params_m: float
    gflops: Optional[float]
    crop: str
    miou: Optional[float]
    miou_ms: Optional[float]
    license: str
    hf_hub_id: Optional[str]


def count_flops(model: torch.nn.Module, size: tuple, device: str = "meta") -> Optional[float]:
    """FLOPs (2 x MACs over matmul/conv/bmm, ``torch.utils.flop_counter``) of one forward at batch 1, in G.

    Runs on the meta device (no memory, no compute); returns None for models whose forward needs
    data-dependent ops (e.g. masked attention thresholds).
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device(device), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, getattr(model, "in_chans", 3), *size))
    except Exception:
        return None
    return counter.get_total_flops() / 1e9


def model_zoo(pattern: str = "", flops: bool = True) -> List[ZooRow]:
    """One row per registered ``name.tag`` and per registered model without tags: params (M) and
    GFLOPs at the tag's crop size (512x512 when untagged), the paper's mIoU for released weights."""
    rows = []
    tagged = {n.split(".")[0] for n in list_models(pretrained=True)}
    names = list_models(pattern, pretrained=True) + [n for n in list_models(pattern) if n not in tagged]
    for full in names:
        cfg = get_pretrained_cfg(full) if "." in full else None
        with torch.device("meta"):
            model = build_model(full).eval()
        crop = tuple(cfg.crop_size) if cfg is not None else (512, 512)
        rows.append(ZooRow(
            name=full, dataset=cfg.dataset if cfg else "–", num_classes=model.num_classes,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            gflops=count_flops(model, crop) if flops else None, crop="x".join(str(c) for c in crop),
            miou=cfg.metrics.get("miou") if cfg else None, miou_ms=cfg.metrics.get("miou_ms") if cfg else None,
            license=cfg.license if cfg else "apache-2.0", hf_hub_id=cfg.hf_hub_id if cfg else None,
        ))
    return rows


def model_zoo_markdown(pattern: str = "", flops: bool = True) -> str:
    """The zoo as a Markdown table (used by the docs build)."""

    def fmt(v: Optional[float], nd: int = 2) -> str:
        return "–" if v is None else f"{v:.{nd}f}"

    lines = [
        "| model | dataset | K | params (M) | GFLOPs @ crop | crop | mIoU | mIoU ms+flip | license | hub id |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model_zoo(pattern, flops):
        lines.append(
            f"| `{r.name}` | {r.dataset} | {r.num_classes} | {r.params_m:.3f} | {fmt(r.gflops, 1)} | {r.crop} | "
            f"{fmt(r.miou)} | {fmt(r.miou_ms)} | {r.license} | `{r.hf_hub_id or '–'}` |"
        )
    return "\n".join(lines)
