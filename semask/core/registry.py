"""The registry: model entry points, aliases, kinds, per-tag pretrained configs (``name.tag``) and the
rules that convert official checkpoints of each family, like timm's ``_registry``.

A leaf module: it imports nothing of semask, so backbones and models register themselves here and
the factory (:mod:`semask.hub.factory`) reads it.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "ConversionRules",
    "PretrainedCfg",
    "get_conversion_rules",
    "get_entrypoint",
    "get_pretrained_cfg",
    "list_aliases",
    "list_models",
    "list_pretrained",
    "model_kind",
    "register_conversion_rules",
    "register_model",
    "register_pretrained_cfgs",
    "resolve_model_name",
    "split_model_name_tag",
    "takes_pretrained_backbone",
]

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
IMAGENET_MEAN = tuple(m / 255 for m in IMAGENET_MEAN_255)  # timm's units (images scaled to 0..1)
IMAGENET_STD = tuple(s / 255 for s in IMAGENET_STD_255)


@dataclass
class PretrainedCfg:
    """Everything a tag knows about one released set of weights.

    ``arch_kwargs`` are passed to the model builder (e.g. the per-stage windowed/global semantic
    pattern that the official code hard-coded for that checkpoint and that shapes cannot tell).
    Normalisation ``mean`` / ``std`` is in timm's units (RGB scaled to 0..1; mmseg's 0..255 values
    divided by 255). ``to_dict()`` (a model's ``pretrained_cfg``) adds timm's ``input_size`` (the
    official test size: the short side of ``test_scale``, else the crop), ``interpolation`` and
    ``crop_pct``, so ``timm.data.resolve_data_config(model=model)`` describes the official pipeline.
    """

    tag: str = ""
    architecture: str = ""
    hf_hub_id: Optional[str] = None
    hf_hub_revision: Optional[str] = None
    source_url: Optional[str] = None  # where the official checkpoint was released
    source_sha256: Optional[str] = None  # sha256 of that file, once a maintainer has verified it
    num_classes: int = 150
    arch_kwargs: Dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    class_names: Optional[Tuple[str, ...]] = None
    palette: Optional[Tuple[Tuple[int, int, int], ...]] = None
    mean: Tuple[float, float, float] = IMAGENET_MEAN  # type: ignore[assignment]
    std: Tuple[float, float, float] = IMAGENET_STD  # type: ignore[assignment]
    crop_size: Tuple[int, int] = (512, 512)
    test_scale: Optional[Tuple[int, int]] = (2048, 512)  # keep-ratio resize (long, short) at test time
    reduce_zero_label: bool = False
    ignore_index: int = 255
    license: str = "apache-2.0"
    metrics: Dict[str, float] = field(default_factory=dict)  # e.g. {"miou": 43.0, "miou_ms": 43.9}
    notes: str = ""

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        side = min(self.test_scale) if self.test_scale else None
        d.update(input_size=(3, side, side) if side else (3, *self.crop_size), interpolation="bilinear",
                 crop_pct=1.0, crop_mode="squash")
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PretrainedCfg":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std", "crop_size", "test_scale", "class_names"):
            if known.get(k) is not None:
                known[k] = tuple(known[k])
        for k in ("mean", "std"):  # configs saved before timm's units: 0..255 values
            if known.get(k) is not None and max(known[k]) > 1.0:
                known[k] = tuple(v / 255 for v in known[k])
        if known.get("palette") is not None:
            known["palette"] = tuple(tuple(c) for c in known["palette"])
        return cls(**known)

    @property
    def full_name(self) -> str:
        return f"{self.architecture}.{self.tag}" if self.tag else self.architecture


_entrypoints: Dict[str, Callable[..., nn.Module]] = {}
_aliases: Dict[str, str] = {}
_pretrained_cfgs: Dict[str, Dict[str, PretrainedCfg]] = {}  # arch -> tag -> cfg (first = default)
_kinds: Dict[str, str] = {}
_backbone_weights_at_build: set = set()


def register_model(
    fn: Optional[Callable] = None, *, aliases: Sequence[str] = (), kind: str = "segmentor",
    backbone_weights_at_build: bool = False,
) -> Callable:
    """Decorator: register ``fn`` under its ``__name__`` (and ``aliases``). ``kind``: segmentor | backbone.

    ``backbone_weights_at_build``: the entry point takes ``pretrained_backbone=`` itself (e.g. timm
    backbones that must load their weights before being wrapped); otherwise ``create_model`` loads
    them after building (:func:`semask.hub.load_imagenet_backbone`).
    Backbone entry points take ``pretrained=`` (their ImageNet weights, loaded by the backbone's file).
    """

    def wrap(f: Callable) -> Callable:
        name = f.__name__
        _entrypoints[name] = f
        _kinds[name] = kind
        if backbone_weights_at_build:
            _backbone_weights_at_build.add(name)
        for a in aliases:
            _aliases[a] = name
        return f

    return wrap(fn) if fn is not None else wrap


def register_pretrained_cfgs(architecture: str, cfgs: Dict[str, PretrainedCfg]) -> None:
    """Attach tags to an architecture; the first tag becomes its default."""
    table = _pretrained_cfgs.setdefault(architecture, {})
    for tag, cfg in cfgs.items():
        table[tag] = replace(cfg, tag=tag, architecture=architecture)


def split_model_name_tag(name: str) -> Tuple[str, str]:
    arch, _, tag = name.partition(".")
    return arch, tag


def resolve_model_name(name: str) -> Tuple[str, str]:
    """``name[.tag]`` (or an alias) -> (registered architecture, tag); clear error if unknown."""
    arch, tag = split_model_name_tag(name)
    arch = _aliases.get(arch, arch)
    if arch not in _entrypoints:
        close = difflib.get_close_matches(arch, list(_entrypoints) + list(_aliases), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} semask.list_models() lists the registered models.")
    if tag and tag not in _pretrained_cfgs.get(arch, {}):
        tags = list(_pretrained_cfgs.get(arch, {}))
        raise ValueError(f"Unknown tag {tag!r} for model {arch!r}; available tags: {tags or 'none'}")
    return arch, tag


def list_models(pattern: str = "", pretrained: bool = False, kind: Optional[str] = None) -> List[str]:
    """Registered model names matching a wildcard ``pattern``. ``pretrained=True`` lists ``name.tag``."""
    names: List[str] = []
    for arch in sorted(_entrypoints):
        if kind and _kinds[arch] != kind:
            continue
        if pretrained:
            names += [f"{arch}.{t}" for t in _pretrained_cfgs.get(arch, {})]
        else:
            names.append(arch)
    return [n for n in names if not pattern or fnmatch.fnmatch(n, pattern)]


def list_pretrained(pattern: str = "") -> List[str]:
    """All ``name.tag`` pairs with a pretrained cfg."""
    return list_models(pattern, pretrained=True)


def list_aliases() -> Dict[str, str]:
    return dict(_aliases)


def get_pretrained_cfg(name: str) -> Optional[PretrainedCfg]:
    """The cfg of ``name.tag`` (the default tag when none is given), or None for untagged models."""
    arch, tag = resolve_model_name(name)
    table = _pretrained_cfgs.get(arch, {})
    if not table:
        return None
    return replace(table[tag] if tag else next(iter(table.values())))


def get_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered for ``name`` (an alias or ``name.tag`` resolves too)."""
    return _entrypoints[resolve_model_name(name)[0]]


def model_kind(name: str) -> str:
    """``"segmentor"`` or ``"backbone"``."""
    return _kinds[resolve_model_name(name)[0]]


def takes_pretrained_backbone(name: str) -> bool:
    """True when the entry point loads ``pretrained_backbone=`` itself (see :func:`register_model`)."""
    return resolve_model_name(name)[0] in _backbone_weights_at_build


# --------------------------------------------------------------------------------------------------
# Conversion rules of official checkpoints, registered by each model family next to its code and
# applied by the converter (semask.hub.convert, `semask convert`).


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
    """The rules registered for ``architecture``; ValueError listing the convertible families otherwise."""
    for pattern, rules in _RULES:
        if fnmatch.fnmatch(architecture, pattern):
            return rules
    families = ", ".join(p for p, _ in _RULES) or "none"
    raise ValueError(f"no converter for {architecture!r}; official checkpoints can be converted for: {families}")


