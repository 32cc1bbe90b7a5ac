"""Model registry: entrypoints, aliases and per-tag pretrained configs (``name.tag``), like timm's."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = [
    "PretrainedCfg",
    "register_model",
    "register_pretrained_cfgs",
    "list_models",
    "list_pretrained",
    "get_pretrained_cfg",
    "create_model",
    "split_model_name_tag",
    "resolve_model_name",
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
    return _entrypoints[resolve_model_name(name)[0]]


def _saved_config(pretrained: Any) -> Dict[str, Any]:
    """config.json of a local model folder given as ``pretrained`` ({} otherwise)."""
    import json
    import os

    if isinstance(pretrained, (str, os.PathLike)) and os.path.isfile(os.path.join(pretrained, "config.json")):
        with open(os.path.join(pretrained, "config.json")) as f:
            return json.load(f)
    return {}


def create_model(
    name: str,
    pretrained: Union[bool, str] = False,
    num_classes: Optional[int] = None,
    *,
    pretrained_backbone: Union[bool, str] = False,
    cache_dir: Optional[str] = None,
    revision: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: ``architecture[.tag]`` or an alias (``semask_swin_b_fpn.ade20k``) or ``hf-hub:org/repo[@rev]``.
        pretrained: False; True for the tag's published weights; a folder / ``.safetensors`` file /
            ``hf-hub:`` id to load from.
        num_classes: classes K; defaults to the tag's (150 when untagged). A K different from the
            loaded weights re-initialises only the class-dependent tensors.
        pretrained_backbone: True loads the ImageNet weights of the backbone's trunk (Swin: timm's
            Swin of the same size; MiT: ``nvidia/mit-bX``; wrapped timm backbones: timm's default
            weights); semantic layers, norms and heads keep their init. Or an ``hf-hub:`` id / a path.
        cache_dir: Hugging Face Hub cache (default ``$HF_HUB_CACHE``).
        revision: Hub branch / tag / commit of the weights (default: the tag's ``hf_hub_revision``).
        **kwargs: architecture overrides (strict: unknown names raise TypeError).
    """
    if name.startswith("hf-hub:"):
        from ..hub import create_from_hub

        return create_from_hub(name, num_classes=num_classes, revision=revision, cache_dir=cache_dir, **kwargs)
    if pretrained and pretrained_backbone:
        raise ValueError("pass either pretrained (whole-model weights) or pretrained_backbone (ImageNet init), not both")
    arch, _ = resolve_model_name(name)
    cfg = get_pretrained_cfg(name)
    build_kwargs = dict(cfg.arch_kwargs) if cfg is not None else {}
    saved = _saved_config(pretrained)
    if saved.get("architecture") == arch:  # a model folder: rebuild the architecture it was saved with
        build_kwargs.update(saved.get("model_kwargs") or {})
        if saved.get("pretrained_cfg"):
            cfg = PretrainedCfg.from_dict(saved["pretrained_cfg"])
        if num_classes is None:
            num_classes = saved.get("num_classes")
    build_kwargs.update(kwargs)
    if num_classes is None:
        num_classes = cfg.num_classes if cfg is not None else 150
    build_only = {}
    if pretrained_backbone and arch in _backbone_weights_at_build:
        build_only["pretrained_backbone"], pretrained_backbone = pretrained_backbone, False
    model = _entrypoints[arch](num_classes=num_classes, **build_kwargs, **build_only)
    # what save_pretrained writes to config.json: enough to rebuild the same architecture
    model.semask_config = dict(architecture=arch, num_classes=num_classes, model_kwargs=build_kwargs,
                               pretrained_cfg=cfg.to_dict() if cfg is not None else None)
    if cfg is not None:
        model.pretrained_cfg = cfg.to_dict()
    if pretrained_backbone:
        from ..hub import load_imagenet_backbone

        load_imagenet_backbone(model, pretrained_backbone, cache_dir=cache_dir)
    if pretrained:
        from ..hub import load_pretrained

        load_pretrained(model, pretrained, cfg=cfg, name=name, revision=revision, cache_dir=cache_dir)
    return model
