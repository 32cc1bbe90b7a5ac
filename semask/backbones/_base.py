"""Input and ``out_indices`` validation shared by every SeMask backbone."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange
from timm.models import group_parameters
from timm.models._features import feature_take_indices

from ..layers import SemanticLayer

__all__ = [
    "SemanticFeaturesMixin", "check_image_input", "normalize_out_indices", "per_stage_flags", "per_stage_ints",
    "semantic_class_count", "official_no_weight_decay", "submodule_group_matcher", "nhwc_to_nchw", "tokens_to_map", "NO_DECAY_KEYWORDS",
]

# the official (mmseg) optimizer rule: no weight decay for these (substring match on parameter names)
NO_DECAY_KEYWORDS: Tuple[str, ...] = ("absolute_pos_embed", "relative_position_bias_table", "norm")


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) map -> (B, C, H, W), as a view with channels-last strides: no transposing copy,
    and the convolutions, norms and resizes that follow keep that layout (the one PyTorch's CPU
    kernels vectorise over channels; NCHW bilinear resizes are several times slower).

    Under ``torch.export`` it is a contiguous copy instead: export reads a ``batch > 1`` guard from
    a convolution input with channels-last strides, which would make the program reject batch 1.
    """
    x = x.permute(0, 3, 1, 2)
    return x.contiguous() if torch.compiler.is_exporting() else x


def tokens_to_map(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map (:func:`nhwc_to_nchw`'s layout)."""
    return nhwc_to_nchw(rearrange(tokens, "b (h w) c -> b h w c", h=hw[0], w=hw[1]))


def semantic_class_count(num_classes: Optional[int], num_semantic_classes: Optional[int] = None,
                         default: int = 150) -> int:
    """The semantic class count K of a backbone from its two class arguments.

    ``num_semantic_classes`` is the unambiguous name. ``num_classes`` keeps semask's meaning (K) when
    >= 1; ``num_classes=0`` is timm's request for a model without an image classifier, which SeMask
    backbones never have, so it leaves K at ``num_semantic_classes`` or ``default``.
    """
    if num_semantic_classes is not None:
        if num_classes not in (None, 0, num_semantic_classes):
            raise ValueError(f"num_classes={num_classes} and num_semantic_classes={num_semantic_classes} disagree; "
                             "pass only num_semantic_classes (K)")
        k = num_semantic_classes
    elif num_classes is None or num_classes == 0:
        k = default
    else:
        k = num_classes
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the semantic class count K must be an int >= 1, got {k!r} (num_classes=0 asks timm's "
                         "way for no image classifier; K is num_semantic_classes)")
    return k


def official_no_weight_decay(module: nn.Module, keywords: Sequence[str] = NO_DECAY_KEYWORDS) -> Set[str]:
    """Full names of the parameters the official rule keeps out of weight decay (substring match)."""
    return {name for name, _ in module.named_parameters() if any(k in name for k in keywords)}


def submodule_group_matcher(model: nn.Module, prefix: str, coarse: bool = False) -> Callable[[str], Tuple[float, ...]]:
    """timm ``group_matcher`` (a callable) for a model whose block groups come from its ``prefix``
    submodule's own ``group_matcher``; every other parameter (decode heads) is the last group."""
    sub = model.get_submodule(prefix.rstrip("."))
    layer = group_parameters(sub, sub.group_matcher(coarse), reverse=True)

    def match(name: str) -> Tuple[float, ...]:
        if name.startswith(prefix) and name[len(prefix):] in layer:
            return (float(layer[name[len(prefix):]]),)
        return (math.inf,)

    return match


FX_UNSUPPORTED = (
    "SeMask backbones cannot be traced by torch.fx symbolic tracing (window padding, shifts and masks "
    "depend on the input size). For a graph use torch.export.export (semask.export.export_program); "
    "for intermediate features use timm's forward_intermediates / features_only=True (instead of "
    "torchvision's create_feature_extractor)"
)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``torch.is_autocast_enabled(device)`` needs torch >= 2.4)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def check_image_input(x: torch.Tensor, in_chans: int, weight_dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ValueError saying what to do unless x is a non-empty float (B, in_chans, H, W) tensor
    (of ``weight_dtype``, the model's parameter dtype, when given; autocast may also run fp32 / fp16 /
    bf16 input in its compute dtype)."""
    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(FX_UNSUPPORTED)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D image batch of shape (B, {in_chans}, H, W), got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (B, {in_chans}, H, W), got shape {tuple(x.shape)}; "
            f"channels-last input needs x.permute(0, 3, 1, 2), other channel counts need in_chans={x.shape[1]}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"expected a floating-point image tensor, got dtype {x.dtype}; convert with x.float() and "
            "normalise it (e.g. semask.predict does this for uint8 images)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"got an empty batch (shape {tuple(x.shape)}): pass at least one image")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"got images of size {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)}): height and "
                         "width must be at least 1 pixel")
    if weight_dtype is not None and x.dtype != weight_dtype:
        # autocast casts fp32 / fp16 / bf16 inputs of convs and matmuls to its dtype (float64 never)
        autocast = x.dtype != torch.float64 and autocast_enabled(x.device.type)
        if not autocast:
            raise ValueError(
                f"the input is {x.dtype} but the model's weights are {weight_dtype}: cast the input with "
                f"x.to({weight_dtype}) (numpy arrays are float64 by default), or the model with "
                f"model.to({x.dtype}), or run under torch.autocast"
            )


def normalize_out_indices(out_indices: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    """Validate stage indices (negative ones count from the end) and return them sorted, unique."""
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    out = []
    for i in out_indices:
        if not isinstance(i, int) or not -num_stages <= i < num_stages:
            raise ValueError(f"out_indices {tuple(out_indices)} must hold stage indices in [0, {num_stages})")
        out.append(i % num_stages)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"out_indices {tuple(out_indices)} must be non-empty and without duplicates")
    return tuple(sorted(out))


def per_stage_flags(value: Union[bool, Sequence[bool]], n: int, name: str) -> Tuple[bool, ...]:
    """A bool for every stage, or one per stage (validated)."""
    flags = (bool(value),) * n if isinstance(value, bool) else tuple(bool(v) for v in value)
    if len(flags) != n:
        raise ValueError(f"{name} needs one entry per stage ({n} stages), got {len(flags)}")
    return flags


def per_stage_ints(value: Union[int, Sequence[int]], n: int, name: str) -> Tuple[int, ...]:
    """An int for every stage, or one per stage (validated)."""
    values = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per stage ({n} stages), got {len(values)}")
    return values


class SemanticFeaturesMixin:
    """timm feature API and class reset shared by SeMask backbones with ``out_indices`` and ``forward(x)
    -> (features, priors)``: ``forward_intermediates`` (used by ``features_only=True`` and smp's ``tu-``
    encoders) and ``reset_classes``.

    timm's headless-model contract: ``num_features`` / ``head_hidden_size`` (channels of the last output
    stage), ``forward_features(x)`` (that stage's NCHW map), ``forward_head(x, pre_logits=True)`` (global
    average pool), ``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier(0)``,
    ``group_matcher`` (layer-wise lr decay) and ``no_weight_decay`` (official rule). ``forward(x)``
    keeps returning ``(features, priors)``: timm's ``forward_head(forward_features(x))`` is the pooled
    path. There is no image classifier: ``num_classes`` is the semantic class count K (also readable as
    ``num_semantic_classes``), and timm's ``num_classes=0`` is accepted as "headless".
    """

    out_indices: Tuple[int, ...]
    num_classes: int
    feature_info: List[Dict[str, Any]]
    global_pool: str = "avg"

    @property
    def num_stages(self) -> int:
        return len(self.stages)  # type: ignore[attr-defined]

    def reset_classes(self, num_classes: int) -> None:
        """Re-initialise only the class-dependent tensors (semantic q/k projections) for K classes."""
        self.num_classes = num_classes
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, SemanticLayer):
                m.num_classes = num_classes
                for blk in m.class_injection:
                    blk.reset_num_classes(num_classes)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: NCHW features of the requested stages (priors are dropped); ``indices``:
        None (``out_indices``), an int (the last n stages) or stage indices. The outputs are already
        normalised per stage, so ``norm`` changes nothing; the forward always stops after the last
        output stage (``stop_early`` is implied)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        n = self.num_stages
        if indices is None:
            wanted: Sequence[int] = self.out_indices
        elif isinstance(indices, int):
            wanted = list(range(n - indices, n))
        else:
            wanted = normalize_out_indices(indices, n)
        missing = [i for i in wanted if i not in self.out_indices]
        if missing:
            raise ValueError(f"stages {missing} are not in out_indices {self.out_indices}")
        feats, _ = self(x, with_priors=False)  # type: ignore[operator]
        picked = [feats[self.out_indices.index(i)] for i in wanted]
        return picked if intermediates_only else (feats[-1], picked)

    # ---- timm's headless contract -------------------------------------------------------------

    @property
    def num_semantic_classes(self) -> int:
        """K, the classes of the semantic layers and prior maps (same as ``num_classes`` here)."""
        return self.num_classes

    @property
    def num_features(self) -> int:
        """Channels of :meth:`forward_features` (the last output stage)."""
        return int(self.feature_info[-1]["num_chs"])

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    @property
    def min_dynamic_size(self) -> int:
        """Smallest height/width of a size-generic export: every output map at least 2 px wide (a
        size-1 map would specialise the traced graph)."""
        return max(int(f["reduction"]) for f in self.feature_info) + 1

    @property
    def feature_channels(self) -> List[int]:
        """Channels of each output stage (``out_indices`` order)."""
        return [int(f["num_chs"]) for f in self.feature_info]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/s, W/s): the last output stage (no priors)."""
        return self(x, with_priors=False)[0][-1]  # type: ignore[operator]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> (B, C) global average (no classifier: ``pre_logits`` changes nothing);
        the map unchanged after ``reset_classifier(0, "")``."""
        if not self.global_pool:
            return x
        return x.mean((2, 3))

    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def reset_classifier(self, num_classes: int = 0, global_pool: Optional[str] = None) -> None:
        """timm's head reset: SeMask backbones have no image classifier, so only ``num_classes=0`` is
        valid; ``global_pool`` is ``"avg"`` or ``""`` (none). Semantic classes: :meth:`reset_classes`."""
        if num_classes != 0:
            raise ValueError(f"{type(self).__name__} has no image classifier (reset_classifier({num_classes})); "
                             "use reset_classifier(0). To change the semantic class count K use reset_classes(K), "
                             "on a segmentor reset_classifier(K)")
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            self.global_pool = global_pool

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning: drop the stages after the last of ``indices`` (int: the last n stages);
        returns the absolute indices kept. Stages 0..max(indices) must be outputs (``out_indices``)."""
        n = self.num_stages
        if isinstance(indices, int) and not 0 < indices <= n:
            raise ValueError(f"indices={indices} must be 1..{n} (the last n stages)")
        if not isinstance(indices, int):
            normalize_out_indices(indices, n)  # clear errors for bad stage indices
        take, max_index = feature_take_indices(n, indices)
        missing = [i for i in range(max_index + 1) if i not in self.out_indices]
        if missing:
            raise ValueError(f"stages {missing} are not in out_indices {self.out_indices}; build with "
                             f"out_indices covering 0..{max_index} to prune to {list(take)}")
        if max_index < n - 1:
            self._truncate_stages(max_index + 1)  # type: ignore[attr-defined]
            self.out_indices = tuple(range(max_index + 1))
            self.feature_info = self.feature_info[:max_index + 1]
        return list(take)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names without weight decay (official rule: position tables and norms)."""
        return official_no_weight_decay(self)  # type: ignore[arg-type]

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            f"{type(self).__name__} does not support TorchScript (torch.jit is deprecated upstream). Use "
            "torch.export / semask.export.export_program or export_onnx for deployment, torch.compile for speed"
        )
