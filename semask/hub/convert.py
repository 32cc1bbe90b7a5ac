"""Convert official SeMask checkpoints (``.pth``) into semask model folders.

Reading never executes code: ``torch.load(weights_only=True)`` refuses pickled objects other than
tensors and plain containers. The result is ``config.json`` + ``model.safetensors`` (see
:mod:`semask.hub.io`), written atomically: on any failure nothing is left at the destination.

Per-family key mapping contract (:class:`semask.core.registry.ConversionRules`): every model family
registers next to its code (``semask.models.fpn``, ``semask.models.mask_former``), for an
architecture-name pattern, how the official keys become ours and how its architecture is read from
tensor shapes. The generic engine then

1. unwraps the file (``{'state_dict': ...}`` for mmseg, ``{'model': ...}`` for detectron2, or a bare
   state dict; a DDP ``module.`` prefix is stripped);
2. checks that the family's ``required`` keys are present (else: "not a <family> checkpoint");
3. infers K from ``class_keys`` and the architecture from ``infer`` and compares both with the chosen
   model (a tag must match exactly; an untagged name adopts the checkpoint's shapes);
4. drops ``drop`` keys (training-only tensors such as ``criterion.empty_weight``), checks ``tied``
   duplicates are equal, applies ``rename`` prefixes, verifies and drops keys the model recomputes
   (its non-persistent buffers, e.g. ``relative_position_index``);
5. requires a one-to-one fit: every source tensor used, every model tensor filled, equal shapes.
   Otherwise a :class:`ConversionReport` lists missing / unexpected / mismatched keys.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..backbones.swin import infer_swin_kwargs
from ..core.checkpoint import read_torch_file, unwrap_state_dict
from ..core.folder import push_to_hub as hub_push
from ..core.build import build_model
from ..core.folder import file_sha256, load_model_dir, read_model_dir, replace_dir, save_pretrained
from ..core.hf import parse_hub_name
from ..core.registry import (
    ConversionRules,
    PretrainedCfg,
    get_conversion_rules,
    get_pretrained_cfg,
    register_conversion_rules,
    resolve_model_name,
)
from ..version import __version__

__all__ = [
    "ConversionError",
    "ConversionReport",
    "ConversionRules",
    "convert_official_checkpoint",
    "convert_state_dict",
    "infer_swin_kwargs",
    "load_official_checkpoint",
    "register_conversion_rules",
    "get_conversion_rules",
]

StateDict = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# reports and errors


@dataclass
class ConversionReport:
    """What did not fit when mapping a source state dict onto a model (empty lists = success)."""

    missing: List[str] = field(default_factory=list)  # model tensors no source tensor fills
    unexpected: List[str] = field(default_factory=list)  # source tensors the model has no place for
    shape_mismatches: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    value_mismatches: List[Tuple[str, str]] = field(default_factory=list)  # tied / recomputed checks
    dropped: List[str] = field(default_factory=list)  # source keys deliberately not used (info only)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches or self.value_mismatches)

    def format(self, limit: int = 20) -> str:
        def block(title: str, rows: Sequence[str]) -> List[str]:
            if not rows:
                return []
            more = [f"    ... and {len(rows) - limit} more"] if len(rows) > limit else []
            return [f"  {title} ({len(rows)}):"] + [f"    {r}" for r in rows[:limit]] + more

        lines = block("missing (model tensors not filled)", self.missing)
        lines += block("unexpected (checkpoint tensors not used)", self.unexpected)
        lines += block("shape mismatches (checkpoint vs model)",
                       [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.shape_mismatches])
        lines += block("value mismatches", [f"{k}: {why}" for k, why in self.value_mismatches])
        return "\n".join(lines) if lines else "  all tensors matched"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; ``report`` holds the key-level details, if any."""

    def __init__(self, message: str, report: Optional[ConversionReport] = None) -> None:
        super().__init__(message + (f"\n{report.format()}" if report is not None and not report.ok else ""))
        self.report = report


# --------------------------------------------------------------------------------------------------
# reading


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a checkpoint ``meta`` value (numpy scalars -> Python numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def load_official_checkpoint(path: Union[str, os.PathLike]) -> Tuple[StateDict, Dict[str, Any]]:
    """``(state_dict, meta)`` of an official ``.pth`` (mmseg ``{'meta', 'state_dict'}``, detectron2
    ``{'model', ...}`` or a bare state dict), read with ``torch.load(weights_only=True)``.

    Raises ValueError for truncated files, pickles holding non-tensor objects (never executed) and
    containers without tensors; FileNotFoundError when ``path`` does not exist.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not a checkpoint file: pass the official .pth file itself (a folder "
                         "written by semask convert / save_pretrained needs no conversion: semask.from_pretrained)")
    return unwrap_state_dict(read_torch_file(p), str(p))


# --------------------------------------------------------------------------------------------------
# mapping


def _num_classes(sd: Mapping[str, torch.Tensor], rules: ConversionRules) -> Dict[str, int]:
    found = {}
    for pattern, offset in rules.class_keys:
        rx = re.compile(pattern)
        found.update({k: v.shape[0] - offset for k, v in sd.items() if rx.fullmatch(k)})
    return found


def convert_state_dict(
    src: Mapping[str, torch.Tensor], model: nn.Module, rules: ConversionRules
) -> Tuple[StateDict, ConversionReport]:
    """Map ``src`` onto ``model``'s state dict keys (see the module doc); returns the mapped tensors
    (cast to the model's dtypes) and the report (``report.ok`` when it fits one-to-one)."""
    report = ConversionReport()
    target = model.state_dict()
    work = dict(src)
    for key in list(work):
        if any(re.fullmatch(rx, key) for rx in rules.drop):
            report.dropped.append(key)
            del work[key]
    duplicates = set()
    for rx, repl in rules.tied:
        for key in [k for k in work if re.fullmatch(rx, k)]:
            canon = re.sub(rx, repl, key)
            duplicates.add(key)
            if canon not in work:
                report.value_mismatches.append((key, f"tied to {canon}, which is absent"))
            elif work[key].shape != work[canon].shape or not torch.equal(work[key], work[canon]):
                report.value_mismatches.append((key, f"should equal its tied copy {canon}"))
    renamed: StateDict = {}
    optional = set()  # tied duplicates: used only where the model has the key too
    for key, value in work.items():
        new_key = key
        for old, new in rules.rename:
            if key.startswith(old):
                new_key = new + key[len(old):]
                break
        renamed[new_key] = value
        if key in duplicates:
            optional.add(new_key)
    # buffers the model recomputes (not saved): check the checkpoint agrees, then drop them
    buffers = dict(model.named_buffers())
    for key in [k for k in renamed if k not in target and k in buffers]:
        value = renamed.pop(key)
        report.dropped.append(key)
        mine = buffers[key]
        if value.shape != mine.shape or not torch.equal(value.to(mine.dtype), mine.cpu()):
            report.value_mismatches.append((key, f"differs from the recomputed buffer (shape {tuple(value.shape)} "
                                                 f"vs {tuple(mine.shape)})"))
    out: StateDict = {}
    for key, value in renamed.items():
        if key not in target:
            (report.dropped if key in optional else report.unexpected).append(key)
            continue
        mine = target[key]
        if value.shape != mine.shape:
            report.shape_mismatches.append((key, tuple(value.shape), tuple(mine.shape)))
            continue
        if value.is_floating_point() != mine.is_floating_point() or (value.dtype == torch.bool) != (mine.dtype == torch.bool):
            # integer / bool values where the model has floats (or the reverse) would be cast silently
            report.value_mismatches.append((key, f"dtype {value.dtype} where the model has {mine.dtype}"))
            continue
        out[key] = value.to(mine.dtype) if value.is_floating_point() else value
    reported = {m[0] for m in report.shape_mismatches} | {m[0] for m in report.value_mismatches}
    report.missing = [k for k in target if k not in out and k not in reported]
    return out, report


# --------------------------------------------------------------------------------------------------
# the converter


def _describe(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def _plan_model(
    name: str, src: Mapping[str, torch.Tensor], rules: ConversionRules, overrides: Dict[str, Any]
) -> Tuple[int, Dict[str, Any], List[str]]:
    """(K, builder kwargs, notes) for ``name`` given the checkpoint's shapes (see module doc)."""
    arch, tag = resolve_model_name(name)
    cfg = get_pretrained_cfg(name) if tag else None
    notes: List[str] = []

    ks = _num_classes(src, rules)
    if not ks:
        raise ConversionError(f"cannot tell the number of classes: none of {[p for p, _ in rules.class_keys]} found")
    if len(set(ks.values())) > 1:
        by_k: Dict[int, List[str]] = {}
        for k, v in ks.items():
            by_k.setdefault(v, []).append(k)
        detail = "; ".join(f"K={v}: {keys[0]}" + (f" (+{len(keys) - 1})" if len(keys) > 1 else "")
                           for v, keys in by_k.items())
        raise ConversionError(f"the checkpoint's class-dependent tensors disagree on K ({detail}); "
                              "a semask model uses one K for the backbone and the head")
    k = next(iter(ks.values()))
    if cfg is not None and k != cfg.num_classes:
        raise ConversionError(
            f"the checkpoint has K={k} classes but {name} expects K={cfg.num_classes} ({cfg.dataset}); choose "
            f"the tag of the dataset it was trained on, or the untagged --model {arch} to convert any K"
        )

    src_arch = rules.infer(src)
    with torch.device("meta"):  # the preset (tag) architecture, before any override
        probe = build_model(name, num_classes=k)
    own_arch = rules.infer(probe.state_dict())
    conflicts = {key: (src_arch[key], v) for key, v in overrides.items() if key in src_arch and src_arch[key] != v}
    if conflicts:
        why = "; ".join(f"{key}: checkpoint {a}, given {b}" for key, (a, b) in conflicts.items())
        raise ConversionError(f"overrides contradict the checkpoint's shapes: {why}; remove them")
    diff = {key: src_arch[key] for key in src_arch if key not in overrides and src_arch[key] != own_arch.get(key)}
    if diff and tag:
        why = "; ".join(f"{key}: checkpoint {a}, model {own_arch.get(key)}" for key, a in diff.items())
        raise ConversionError(
            f"the checkpoint does not fit {name}: {why}; use a --model whose architecture matches, or the "
            f"untagged {arch} (which adopts the checkpoint's shapes)"
        )
    kwargs = {**overrides, **diff}
    if diff:
        notes.append(f"adopted from the checkpoint's shapes: {_describe(diff)}")
    n_stages = len(src_arch.get("depths", ())) or None
    sem_global = kwargs.get("sem_global", getattr(getattr(probe, "backbone", None), "sem_global", None))
    if n_stages and isinstance(sem_global, (tuple, list)) and len(sem_global) != n_stages:
        raise ConversionError(
            f"the checkpoint has {n_stages} stages but the windowed/global semantic pattern "
            f"{','.join('G' if g else 'W' for g in sem_global)} has "
            f"{len(sem_global)} entries; it cannot be read from the weights: pass it (e.g. --sem-global "
            f"{','.join('W' * n_stages)} or sem_global=(False,)*{n_stages})"
        )
    if not tag and "sem_global" not in overrides and src_arch.get("semantic_layers", True):
        notes.append(f"windowed/global semantic pattern not in the weights: using "
                     f"{','.join('G' if g else 'W' for g in sem_global)} "
                     "(pass --sem-global / --sem-window-size if the checkpoint used others)")
    return k, kwargs, notes


def convert_official_checkpoint(
    src: Union[str, os.PathLike],
    dst_dir: Union[str, os.PathLike],
    model_name: str,
    push_to_hub: Optional[str] = None,
    overwrite: bool = False,
    verify: bool = True,
    log: Optional[Callable[[str], None]] = None,
    **model_kwargs: Any,
) -> Path:
    """Convert an official checkpoint into ``dst_dir`` (``model.safetensors`` + ``config.json``).

    Args:
        src: official ``.pth`` (read with ``torch.load(weights_only=True)``; nothing is executed).
        dst_dir: output folder; must not exist (or be empty) unless ``overwrite``.
        model_name: ``architecture.tag`` of an official release (shapes must match it exactly) or an
            untagged ``architecture`` (K and the shape-visible architecture come from the checkpoint).
        push_to_hub: optional Hugging Face Hub repo id to upload the folder to.
        overwrite: replace an existing non-empty ``dst_dir``.
        verify: before publishing the folder, rebuild it with ``semask.from_pretrained(folder)``
            (on the meta device: config -> architecture -> strict load) and re-read the written tensors.
        log: receives progress / notes (e.g. ``print``).
        **model_kwargs: builder overrides the weights cannot tell (``sem_global``, ``sem_window_size``).

    Returns the folder. Raises :class:`ConversionError` (a ValueError) with a key-level report when the
    checkpoint does not fit; then nothing is written.
    """
    say = log or (lambda msg: None)
    src, dst = Path(src), Path(dst_dir)
    if push_to_hub:
        parse_hub_name(push_to_hub)  # fail before the work on a malformed repo id
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another folder or pass overwrite=True "
                              "(--overwrite)")
    arch, tag = resolve_model_name(model_name)
    rules = get_conversion_rules(arch)
    sd, meta = load_official_checkpoint(src)
    say(f"read {len(sd)} tensors from {src}")
    absent = [k for k in rules.required if k not in sd]
    if absent:
        prefixes = sorted({k.split(".")[0] + "." for k in sd})
        hints = [msg for prefix, msg in rules.hints if any(k.startswith(prefix) for k in sd)]
        raise ConversionError(
            f"{src} is not a {rules.family} checkpoint: it lacks {absent[:3]} (its keys start with {prefixes[:8]})"
            + (f"; {hints[0]}" if hints else "")
        )
    k, kwargs, notes = _plan_model(model_name, sd, rules, dict(model_kwargs))
    for n in notes:
        say(f"note: {n}")
    model = build_model(model_name, num_classes=k, **kwargs)
    state, report = convert_state_dict(sd, model, rules)
    if not report.ok:
        raise ConversionError(f"{src} does not fit {model_name} (K={k}):", report)
    model.load_state_dict(state, strict=True)
    say(f"mapped {len(state)} tensors onto {model_name} (K={k}); dropped {len(report.dropped)} recomputable/unused")

    extra: Dict[str, Any] = {"converted_from": dict(
        file=src.name, sha256=file_sha256(src), family=rules.family, semask_version=__version__,
        official_meta={key: _plain(meta[key]) for key in ("mmseg_version", "iter", "epoch") if key in meta},
    )}
    if not tag:  # describe these weights, not the architecture's default tag
        classes, palette = meta.get("CLASSES"), meta.get("PALETTE")
        fits = classes is not None and len(classes) == k
        pcfg = PretrainedCfg(
            architecture=arch, num_classes=k, arch_kwargs=dict(kwargs),
            class_names=tuple(classes) if fits else None,
            palette=tuple(tuple(int(c) for c in rgb) for rgb in palette) if fits and palette is not None
            and len(palette) == k else None,
            notes=f"converted from {src.name}",
        ).to_dict()
        model.semask_config["pretrained_cfg"] = model.pretrained_cfg = pcfg
    new_parents = [p for p in dst.absolute().parents if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    done = False
    try:
        repo_id = push_to_hub or (model.pretrained_cfg.get("hf_hub_id") if tag else None)
        save_pretrained(model, tmp, extra=extra, repo_id=repo_id)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if verify:  # the user's loading path (config -> architecture -> strict load), on the meta device
            with torch.device("meta"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
                rebuilt = load_model_dir(tmp).state_dict()
            written, mine = read_model_dir(tmp)[1], model.state_dict()
            bad = [key for key in mine if key not in written or not torch.equal(mine[key], written[key])
                   or key not in rebuilt or rebuilt[key].shape != mine[key].shape]
            if bad or len(written) != len(mine) or len(rebuilt) != len(mine):
                raise ConversionError(f"the written folder does not reload identically: {bad[:5]}")
        replace_dir(tmp, dst)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in [] if done else new_parents:  # innermost first: leave no folder behind
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
    say(f"wrote {dst}")
    if push_to_hub:  # the hub helper's upload: same files, one commit
        hub_push(model, push_to_hub, extra=extra, commit_message=f"Upload {model_name} converted from {src.name}")
        say(f"uploaded to https://huggingface.co/{push_to_hub}")
    return dst
