"""SeMask over any hierarchical timm backbone: a semantic layer after every stage, inside the network.

:func:`wrap` takes a timm model (name or instance) whose trunk is ``stem -> stage_0 -> ... -> stage_n``
and returns a :class:`SeMaskWrapped` backbone: after each stage the tokens go through a
:class:`~semask.layers.SemanticLayer`, whose re-weighted output feeds the next stage (as in SeMask
Swin), and ``forward`` returns ``(features, priors)`` like :class:`~semask.SeMaskSwinTransformer`.

A family is supported through one :class:`StageAdapter` row (where the stem and the stage list are,
and which memory layout each stage consumes/produces); :func:`register_adapter` adds new ones.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models import group_parameters
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model as timm_register_model

from ..core.checkpoint import load_timm_pretrained
from ..layers import SemanticLayer
from ._base import (
    SemanticFeaturesMixin, check_image_input, nhwc_to_nchw, normalize_out_indices, per_stage_flags, semantic_class_count,
    tokens_to_map,
)

__all__ = [
    "SeMaskWrapped",
    "StageAdapter",
    "list_wrappable_families",
    "register_adapter",
    "wrap",
]

Layout = str  # "NCHW" or "NHWC"


@dataclass(frozen=True)
class StageAdapter:
    """Where a timm family keeps its trunk, and the memory layout around each stage.

    Attributes:
        stem: top-level modules applied in order before the first stage.
        stages: one attribute holding the stage list (``"stages"``), or one attribute per stage.
        stem_fmt: layout of the stem's output.
        in_fmt: layout the stages consume (``first_in_fmt`` overrides it for stage 0).
        out_fmt: layout the stages produce.
    """

    stem: Tuple[str, ...]
    stages: Union[str, Tuple[str, ...]]
    stem_fmt: Layout = "NCHW"
    in_fmt: Layout = "NCHW"
    out_fmt: Layout = "NCHW"
    first_in_fmt: Optional[Layout] = None

    def stage_names(self, model: nn.Module) -> List[str]:
        if isinstance(self.stages, str):
            return [f"{self.stages}.{i}" for i in range(len(getattr(model, self.stages)))]
        return list(self.stages)


_NCHW = StageAdapter(stem=("stem",), stages="stages")
_ADAPTERS: Dict[str, StageAdapter] = {
    # conv / hybrid families: NCHW everywhere
    **{name: _NCHW for name in (
        "ConvNeXt", "MaxxVit", "DaVit", "EfficientFormerV2", "NextViT", "FastVit", "MetaFormer", "EdgeNeXt",
        "MetaNeXt", "EfficientVit", "RepVit", "HighPerfGpuNet")},
    "FocalNet": StageAdapter(stem=("stem",), stages="layers"),
    "ResNet": StageAdapter(stem=("conv1", "bn1", "act1", "maxpool"), stages=("layer1", "layer2", "layer3", "layer4")),
    "RegNet": StageAdapter(stem=("stem",), stages=("s1", "s2", "s3", "s4")),
    # channels-last transformers
    "SwinTransformer": StageAdapter(stem=("patch_embed",), stages="layers", stem_fmt="NHWC", in_fmt="NHWC", out_fmt="NHWC"),
    "SwinTransformerV2": StageAdapter(stem=("patch_embed",), stages="layers", stem_fmt="NHWC", in_fmt="NHWC", out_fmt="NHWC"),
    "MambaOut": StageAdapter(stem=("stem",), stages="stages", stem_fmt="NHWC", in_fmt="NHWC", out_fmt="NHWC"),
    # PVT v2: the patch embedding emits NHWC for stage 0; later stages embed NCHW maps themselves
    "PyramidVisionTransformerV2": StageAdapter(stem=("patch_embed",), stages="stages", stem_fmt="NHWC",
                                               first_in_fmt="NHWC"),
}

# families that have no stage pyramid to insert semantic layers into, with the reason
_UNWRAPPABLE = {
    "VisionTransformer": "a plain ViT keeps a single stride-16 token map (no stage pyramid)",
    "Eva": "a plain ViT (EVA) keeps a single stride-16 token map (no stage pyramid)",
    "Beit": "a plain ViT (BEiT) keeps a single stride-16 token map (no stage pyramid)",
    "VisionTransformerDistilled": "a plain ViT (DeiT) keeps a single stride-16 token map (no stage pyramid)",
    "Hiera": "Hiera unrolls its tokens across stages, so stage outputs are not spatial maps to re-weight",
}


def register_adapter(class_name: str, adapter: StageAdapter) -> None:
    """Teach :func:`wrap` a new timm family (``type(model).__name__`` -> its :class:`StageAdapter`)."""
    _ADAPTERS[class_name] = adapter


def list_wrappable_families() -> List[str]:
    """timm model classes :func:`wrap` supports."""
    return sorted(_ADAPTERS)


def _convert(x: torch.Tensor, src: Layout, dst: Layout) -> torch.Tensor:
    # a permuted view: NHWC data seen as NCHW is channels_last memory, which convs take without a copy
    if src == dst:
        return x
    return nhwc_to_nchw(x) if dst == "NCHW" else x.permute(0, 2, 3, 1)


def _default_sem_global(reductions: Sequence[int]) -> Tuple[bool, ...]:
    # SeMask Swin-T's pattern W W G G: windowed at strides <= 8, global from stride 16 on
    return tuple(r >= 16 for r in reductions)


class SeMaskWrapped(SemanticFeaturesMixin, nn.Module):
    """A timm hierarchical backbone with a SemanticLayer after each stage (built by :func:`wrap`).

    ``forward(x)``: images ``(B, in_chans, H, W)`` -> ``(features, priors)``, one NCHW tensor per
    index in ``out_indices``: features ``(B, C_i, H_i, W_i)`` (the re-weighted stream that also feeds
    stage i+1, through a LayerNorm when ``out_norm``), priors ``(B, K, H_i, W_i)`` raw logits.

    The timm model is kept as ``self.model`` (its state-dict keys are timm's, prefixed ``model.``); its
    classifier / final norm are removed since they are not used.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: StageAdapter,
        num_classes: int,
        sem_window_size: int = 7,
        sem_global: Optional[Union[bool, Sequence[bool]]] = None,
        num_sem_blocks: int = 1,
        sem_drop: float = 0.1,
        sem_residual: bool = False,
        out_norm: bool = True,
        out_indices: Optional[Sequence[int]] = None,
        num_semantic_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        num_classes = semantic_class_count(num_classes, num_semantic_classes)
        stage_names = adapter.stage_names(model)
        info = {f["module"]: f for f in getattr(model, "feature_info", [])}
        missing = [s for s in stage_names if s not in info]
        if missing:
            raise ValueError(f"{type(model).__name__}.feature_info has no entry for stages {missing}; "
                             "the adapter's stage names do not match this model")
        n = len(stage_names)
        chans = [info[s]["num_chs"] for s in stage_names]
        reductions = [info[s]["reduction"] for s in stage_names]
        sem_global = _default_sem_global(reductions) if sem_global is None else per_stage_flags(sem_global, n, "sem_global")
        self.model = model
        self.adapter = adapter
        self.stage_names = stage_names
        self.num_classes = num_classes
        self.in_chans = _in_chans(model)
        self.sem_global = sem_global
        self.sem_window_size = sem_window_size
        self.sem_residual = sem_residual
        self.out_indices = normalize_out_indices(tuple(range(n)) if out_indices is None else out_indices, n)
        self.grad_checkpointing = False
        self.semantic_layers = nn.ModuleList(
            [SemanticLayer(c, num_classes, sem_window_size, g, num_sem_blocks, sem_drop) for c, g in zip(chans, sem_global)]
        )
        self.out_norms = nn.ModuleList([nn.LayerNorm(chans[i]) if out_norm else nn.Identity() for i in range(n)])
        self.feature_info = [dict(num_chs=chans[i], reduction=reductions[i], module=f"out_norms.{i}")
                             for i in self.out_indices]
        _drop_unused(model, adapter)

    @property
    def stages(self) -> List[nn.Module]:
        return [self.model.get_submodule(s) for s in self.stage_names]

    @property
    def min_dynamic_size(self) -> int:
        """Smallest height/width of a size-generic export: every output map at least 2 px wide. timm
        stems differ in rounding (ConvNeXt's unpadded 4x4 stride-4 conv floors, padded convs ceil), so
        twice the largest stride, not the stride + 1 of the padded SeMask backbones."""
        return 2 * max(int(f["reduction"]) for f in self.feature_info)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Block-level checkpointing inside timm stages that support it; whole-stage otherwise."""
        self.grad_checkpointing = enable
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if (self.grad_checkpointing and not hasattr(stage, "grad_checkpointing") and torch.is_grad_enabled()
                and not torch.jit.is_scripting()):
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward(self, x: torch.Tensor, with_priors: bool = True) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """x: (B, in_chans, H, W) float -> (features [B, C_i, H_i, W_i], priors [B, K, H_i, W_i]; empty
        with ``with_priors=False``)."""
        check_image_input(x, self.in_chans, next(self.model.parameters()).dtype)
        ad = self.adapter
        for name in ad.stem:
            x = getattr(self.model, name)(x)
        fmt = ad.stem_fmt
        feats: List[torch.Tensor] = []
        priors: List[torch.Tensor] = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.stages):
            want = ad.first_in_fmt if i == 0 and ad.first_in_fmt else ad.in_fmt
            y = _convert(self._run_stage(stage, _convert(x, fmt, want)), ad.out_fmt, "NHWC")
            b, h, w, c = y.shape
            tokens = y.reshape(b, h * w, c)
            sem = self.semantic_layers[i]
            prior, out = sem(tokens, (h, w), with_priors and i in self.out_indices)
            if self.sem_residual:
                # x + gamma * attn(LN(x)): the semantic layer starts as the identity on the stream
                out = tokens + (out - sem.norm1(tokens))
            x, fmt = out.view(b, h, w, c), "NHWC"
            if i in self.out_indices:
                feats.append(nhwc_to_nchw(self.out_norms[i](x)))
                if prior is not None:
                    priors.append(tokens_to_map(prior, (h, w)))
            if i == last:
                break
        return feats, priors

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
        """timm's parameter groups (layer-wise lr decay): the timm model's own groups, each stage's
        semantic layer and output norm as one more group right after that stage's last group."""
        inner = self.model
        if hasattr(inner, "group_matcher"):
            layer = {f"model.{k}": float(v) for k, v in
                     group_parameters(inner, inner.group_matcher(coarse), reverse=True).items()}
        else:  # stem 0, stage i -> i + 1
            layer = {f"model.{k}": 0.0 for k, _ in inner.named_parameters()}
            for i, s in enumerate(self.stage_names):
                layer.update({f"model.{s}.{k}": float(i + 1) for k, _ in inner.get_submodule(s).named_parameters()})
        stage_end = []
        for s in self.stage_names:
            ids = [layer[f"model.{s}.{k}"] for k, _ in self.model.get_submodule(s).named_parameters()]
            stage_end.append(max(ids) if ids else (stage_end[-1] if stage_end else 0.0))
        extra = re.compile(r"^(?:semantic_layers|out_norms)\.(\d+)\.")

        def match(name: str) -> Tuple[float, ...]:
            if name in layer:
                return (layer[name],)
            m = extra.match(name)
            return (stage_end[int(m.group(1))] + 0.5,) if m else (math.inf,)

        return match

    def _truncate_stages(self, n: int) -> None:
        # prune_intermediate_layers: the timm stages after n - 1 become identities (no unused parameters)
        for name in self.stage_names[n:]:
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, nn.Identity())
        self.stage_names = self.stage_names[:n]
        self.semantic_layers = self.semantic_layers[:n]
        self.out_norms = self.out_norms[:n]


def _in_chans(model: nn.Module) -> int:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if first:
        try:
            return model.get_submodule(first).in_channels
        except AttributeError:
            pass
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _drop_unused(model: nn.Module, adapter: StageAdapter) -> None:
    # classifier / final norms would be parameters without gradients (DDP errors, optimizer noise)
    used = set(adapter.stem) | {s.split(".")[0] for s in adapter.stage_names(model)}
    for name, child in list(model.named_children()):
        if name not in used and any(True for _ in child.parameters()):
            setattr(model, name, nn.Identity())


def wrap(
    backbone: Union[str, nn.Module],
    num_classes: int,
    sem_global: Optional[Union[bool, Sequence[bool]]] = None,
    sem_window_size: int = 7,
    num_sem_blocks: int = 1,
    sem_drop: float = 0.1,
    sem_residual: bool = False,
    out_norm: bool = True,
    out_indices: Optional[Sequence[int]] = None,
    pretrained: Any = False,
    **timm_kwargs: Any,
) -> SeMaskWrapped:
    """Turn a hierarchical timm backbone into a SeMask backbone returning ``(features, priors)``.

    Args:
        backbone: a timm model name (created with ``timm.create_model(backbone, **timm_kwargs)``, then
            ``pretrained`` weights are loaded) or a timm model instance (adopted: its classifier is removed).
        num_classes: classes K of the semantic layers (and of the prior maps).
        sem_global: per stage, True for global semantic attention, False for windowed; default:
            windowed at strides <= 8, global from 16 (SeMask Swin-T's W W G G).
        sem_window_size: window of the windowed semantic layers.
        num_sem_blocks: SemanticAttention blocks per semantic layer.
        sem_drop: dropout in the semantic attention residual.
        sem_residual: False (default) keeps SeMask's formulation, where the stream after a stage is
            *replaced* by ``LN(x) + gamma * attn`` (official quirk Q1). True uses ``x + gamma * attn(LN(x))``
            instead: the identity at init, so a pretrained network's next stage sees the un-normalised
            stream it was trained on (conv nets such as ConvNeXt or ResNet carry such streams between
            stages); recommended when fine-tuning ImageNet weights of non-Swin families.
        out_norm: a LayerNorm on each output feature (like SeMask Swin's ``norm{i}``).
        out_indices: stages to output (default all).
        pretrained: for a timm name: True (timm's default weights), ``hf-hub:org/repo`` or a weights
            file in timm's layout; read by semask's safe loader, never unpickled
            (:func:`semask.core.checkpoint.load_timm_pretrained`).

    Raises:
        ValueError: for families without a stage pyramid (plain ViT, ...) or unknown families.
    """
    if isinstance(backbone, str):
        import timm

        try:
            backbone = timm.create_model(backbone, pretrained=False, **timm_kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"{e}; wrap() takes a timm model name (timm.list_models()) or instance") from e
            raise
        if pretrained:
            load_timm_pretrained(backbone, pretrained)
    elif timm_kwargs or pretrained:
        raise TypeError("timm kwargs and pretrained apply to a timm model name, not to a model instance")
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a timm model name or nn.Module, got {type(backbone).__name__}")
    if isinstance(backbone, SeMaskWrapped) or hasattr(backbone, "semantic_layers") or type(backbone).__name__.startswith("SeMask"):
        raise ValueError(f"{type(backbone).__name__} already has semantic layers; use it directly as a SeMask backbone")
    family = type(backbone).__name__
    if family in _UNWRAPPABLE:
        raise ValueError(f"cannot wrap {family}: {_UNWRAPPABLE[family]}, so there is no stage after which a "
                         "semantic layer could re-weight the tokens feeding the next one. Use a hierarchical "
                         f"backbone, e.g. one of: {', '.join(list_wrappable_families())}")
    if family not in _ADAPTERS:
        raise ValueError(f"cannot wrap {family}: no stage adapter for this family. Supported: "
                         f"{', '.join(list_wrappable_families())}; add one with "
                         "semask.backbones.wrap.register_adapter(class_name, StageAdapter(...))")
    return SeMaskWrapped(backbone, _ADAPTERS[family], num_classes, sem_window_size, sem_global, num_sem_blocks,
                         sem_drop, sem_residual, out_norm, out_indices)


# --------------------------------------------------------------------------------------------------
# timm entry point, so that wrapped backbones work wherever timm names do:
#   timm.create_model("semask_wrap", backbone="convnext_tiny", num_classes=150, features_only=True)
#   smp.Unet("tu-semask_wrap", encoder_weights=None, backbone="convnext_tiny")

def _wrap_from_kwargs(backbone: str = "convnext_tiny", num_classes: int = 150, backbone_pretrained: bool = False,
                      num_semantic_classes: Optional[int] = None, **kwargs: Any) -> SeMaskWrapped:
    # wrap() keeps its own options and hands the rest (in_chans, dims, ...) to timm.create_model;
    # timm's num_classes=0 (headless) leaves K at num_semantic_classes or 150
    return wrap(backbone, semantic_class_count(num_classes, num_semantic_classes), pretrained=backbone_pretrained,
                **kwargs)


default_cfgs = generate_default_cfgs({"semask_wrap": dict(
    url="", num_classes=150, input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=1.0, interpolation="bilinear",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="", classifier=None)})


@timm_register_model
def semask_wrap(pretrained: bool = False, **kwargs: Any) -> SeMaskWrapped:
    """timm entry: ``backbone=`` a timm name wrapped by :func:`wrap`; ``pretrained`` loads its timm weights."""
    return build_model_with_cfg(_wrap_from_kwargs, "semask_wrap", pretrained=False, backbone_pretrained=pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)
