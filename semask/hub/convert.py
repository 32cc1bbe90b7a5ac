"""Convert official SeMask checkpoints (``.pth``) into semask model folders.

Reading never executes code: ``torch.load(weights_only=True)`` refuses pickled objects other than
tensors and plain containers. The result is ``config.json`` + ``model.safetensors`` (see
:mod:`semask.hub.io`), written atomically: on any failure nothing is left at the destination.

Per-family key mapping contract (:class:`ConversionRules`): every model family registers, for an
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

import fnmatch
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .adapt import _window_of_table

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
# per-family rules


@dataclass(frozen=True)
class ConversionRules:
    """How one model family's official checkpoints map onto semask models.

    Args:
        family: human-readable name used in messages ("SeMask-FPN (mmseg)").
        required: source keys that identify the family; all must be present.
        class_keys: ``(regex, offset)`` pairs; every matching source key has ``shape[0] == K + offset``
            (e.g. ``("sem_seg_head.predictor.class_embed.weight", 1)`` for the no-object class).
        infer: source state dict -> builder kwargs read from shapes (``embed_dim``, ``depths`` ...).
            Applied to the model's own state dict as well, so only keys both agree on are compared.
        rename: ``(src_prefix, dst_prefix)`` pairs, first match wins (identity when empty).
        drop: regexes (``re.fullmatch``) of source keys that are not weights of the network
            (e.g. ``criterion\\.empty_weight``).
        tied: ``(regex, replacement)``: a source key matching ``regex`` duplicates the key
            ``re.sub(regex, replacement, key)`` (shared modules). They must be equal; the duplicate is
            used only if the model has that key too.
        hints: ``(key prefix, message)``: shown when ``required`` keys are absent but the prefix occurs
            (to point users at the right ``--model``).
    """

    family: str
    required: Tuple[str, ...]
    class_keys: Tuple[Tuple[str, int], ...]
    infer: Callable[[Mapping[str, torch.Tensor]], Dict[str, Any]]
    rename: Tuple[Tuple[str, str], ...] = ()
    drop: Tuple[str, ...] = ()
    tied: Tuple[Tuple[str, str], ...] = ()
    hints: Tuple[Tuple[str, str], ...] = ()


_RULES: List[Tuple[str, ConversionRules]] = []


def register_conversion_rules(arch_pattern: str, rules: ConversionRules) -> None:
    """Attach ``rules`` to the architectures matching the wildcard ``arch_pattern``
    (e.g. ``"semask_swin_*_fpn"``); later registrations take precedence."""
    _RULES.insert(0, (arch_pattern, rules))


def get_conversion_rules(architecture: str) -> ConversionRules:
    for pattern, rules in _RULES:
        if fnmatch.fnmatch(architecture, pattern):
            return rules
    families = ", ".join(p for p, _ in _RULES) or "none"
    raise ValueError(f"no converter for {architecture!r}; official checkpoints can be converted for: {families}")


# --------------------------------------------------------------------------------------------------
# architecture inference from shapes


def _indices(keys: Sequence[str], pattern: str) -> List[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_swin_kwargs(sd: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> Dict[str, Any]:
    """SeMaskSwinTransformer kwargs that tensor shapes determine: ``in_chans, patch_size, embed_dim,
    depths, num_heads, window_size, mlp_ratio, qkv_bias, out_indices, ape, semantic_layers,
    num_sem_blocks``.

    The per-stage windowed/global pattern and the semantic window are not visible in the weights.
    """
    p = re.escape(prefix)
    keys = list(sd)
    proj = sd.get(f"{prefix}patch_embed.proj.weight")
    if proj is None:
        return {}
    stages = _indices(keys, rf"{p}layers\.(\d+)\.")
    out: Dict[str, Any] = dict(in_chans=proj.shape[1], patch_size=proj.shape[-1], embed_dim=proj.shape[0])
    out["depths"] = tuple(len(_indices(keys, rf"{p}layers\.{i}\.blocks\.(\d+)\.")) for i in stages)
    heads, windows = [], set()
    for i in stages:
        table = sd.get(f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table")
        if table is None:
            continue
        heads.append(table.shape[1])
        windows.add(_window_of_table(table.shape[0]))  # the table has (2w-1)^2 rows
    if len(heads) == len(stages):
        out["num_heads"] = tuple(heads)
    if len(windows) == 1:
        out["window_size"] = windows.pop()
    fc1 = sd.get(f"{prefix}layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        out["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    out["qkv_bias"] = f"{prefix}layers.0.blocks.0.attn.qkv.bias" in sd
    out["out_indices"] = tuple(_indices(keys, rf"{p}norm(\d+)\."))
    out["ape"] = f"{prefix}absolute_pos_embed" in sd
    sem_blocks = tuple(len(_indices(keys, rf"{p}layers\.{i}\.semantic_layer\.class_injection\.(\d+)\."))
                       for i in stages)
    out["semantic_layers"] = any(sem_blocks)
    if any(sem_blocks):
        out["num_sem_blocks"] = sem_blocks
    return out


def _infer_fpn(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    out = infer_swin_kwargs(sd, "backbone.")
    seg = sd.get("decode_head.conv_seg.weight")
    if seg is not None:
        out["fpn_channels"] = seg.shape[1]
    return out


register_conversion_rules("semask_swin_*_fpn", ConversionRules(
    family="SeMask-FPN (mmseg)",
    required=("backbone.patch_embed.proj.weight", "decode_head.conv_seg.weight"),
    class_keys=((r"decode_head\.conv_seg\.weight", 0), (r"backbone\..*\.mlp_cls_[qk]\.weight", 0)),
    infer=_infer_fpn,
    hints=(("sem_seg_head.", "it looks like a detectron2 checkpoint (MaskFormer / Mask2Former / FaPN); "
                            "choose the matching --model"),),
))


# --------------------------------------------------------------------------------------------------
# reading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a checkpoint ``meta`` value (numpy scalars -> Python numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _numpy_safe_globals() -> list:
    """numpy scalars/arrays that mmcv may store in ``meta`` (e.g. best scores): data only."""
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


def _as_tensor(value: Any) -> Any:
    """detectron2 checkpoints may hold numpy arrays instead of tensors: an owned tensor copy of those."""
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return torch.as_tensor(value).clone()
    return value


def load_official_checkpoint(path: Union[str, os.PathLike]) -> Tuple[StateDict, Dict[str, Any]]:
    """``(state_dict, meta)`` of an official ``.pth`` (mmseg ``{'meta', 'state_dict'}``, detectron2
    ``{'model', ...}`` or a bare state dict), read with ``torch.load(weights_only=True)``.

    Raises ValueError for truncated files, pickles holding non-tensor objects (never executed) and
    containers without tensors; FileNotFoundError when ``path`` does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            raise ValueError(
                f"{p} holds pickled Python objects that are not tensors ({', '.join(found) or 'see below'}); "
                "they were NOT loaded, because unpickling them could run arbitrary code. If you trust the file, "
                "re-save only its tensors: torch.save({'state_dict': sd}, 'clean.pth')."
            ) from e
        raise ValueError(f"cannot read {p}: it is corrupt or not a PyTorch checkpoint ({e})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"cannot read {p}: the file is truncated or not a PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); download it again"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{p} holds a {type(obj).__name__}, not a checkpoint dict")
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
        raise ValueError(f"{p} has no tensors under 'state_dict' or 'model' (keys: {sorted(obj)[:10]})")
    others = sorted(k for k in sd if k not in tensors)
    if others:
        raise ValueError(f"{p}: state dict entries that are not tensors: {others[:10]}")
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, meta


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
        out[key] = value.to(mine.dtype) if value.is_floating_point() else value
    report.missing = [k for k in target if k not in out and k not in {m[0] for m in report.shape_mismatches}]
    return out, report


# --------------------------------------------------------------------------------------------------
# the converter


def _describe(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def _plan_model(
    name: str, src: Mapping[str, torch.Tensor], rules: ConversionRules, overrides: Dict[str, Any]
) -> Tuple[int, Dict[str, Any], List[str]]:
    """(K, builder kwargs, notes) for ``name`` given the checkpoint's shapes (see module doc)."""
    from ..models._registry import create_model, get_pretrained_cfg, resolve_model_name

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
        probe = create_model(name, num_classes=k)
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
        verify: before publishing the folder, rebuild it with ``create_model(arch, pretrained=folder)``
            (on the meta device: config -> architecture -> strict load) and re-read the written tensors.
        log: receives progress / notes (e.g. ``print``).
        **model_kwargs: builder overrides the weights cannot tell (``sem_global``, ``sem_window_size``).

    Returns the folder. Raises :class:`ConversionError` (a ValueError) with a key-level report when the
    checkpoint does not fit; then nothing is written.
    """
    from ..models._registry import PretrainedCfg, create_model, resolve_model_name
    from ..version import __version__
    from .hf import parse_hub_name
    from .io import push_to_hub as hub_push
    from .io import read_model_dir, save_pretrained

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
    model = create_model(model_name, num_classes=k, **kwargs)
    state, report = convert_state_dict(sd, model, rules)
    if not report.ok:
        raise ConversionError(f"{src} does not fit {model_name} (K={k}):", report)
    model.load_state_dict(state, strict=True)
    say(f"mapped {len(state)} tensors onto {model_name} (K={k}); dropped {len(report.dropped)} recomputable/unused")

    extra: Dict[str, Any] = {"converted_from": dict(
        file=src.name, sha256=_sha256(src), family=rules.family, semask_version=__version__,
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
                rebuilt = create_model(arch, pretrained=str(tmp)).state_dict()
            written, mine = read_model_dir(tmp)[1], model.state_dict()
            bad = [key for key in mine if key not in written or not torch.equal(mine[key], written[key])
                   or key not in rebuilt or rebuilt[key].shape != mine[key].shape]
            if bad or len(written) != len(mine) or len(rebuilt) != len(mine):
                raise ConversionError(f"the written folder does not reload identically: {bad[:5]}")
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
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
