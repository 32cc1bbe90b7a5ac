"""Kernels of the eager CPU inference paths (see :func:`~semask.layers.window.eager_cpu_inference`).

* :func:`linear`: ``F.linear`` with GELU or a residual add fused into oneDNN's matmul (the bias and the
  epilogue are applied while the output tile is in cache, instead of extra passes over the output);
* :func:`mlp_residual`: ``x + mlp(x)`` for a timm ``Mlp`` with both of those fusions;
* :func:`upsample_bilinear`: bilinear resize by integer factors (the x4 resize of stride-4 logits to the
  image) as separable two-tap passes over cache-sized channel groups, about 2x faster than PyTorch's
  gather-based CPU kernel;
* :class:`ReusableOutput`: an output buffer that eager inference writes into again once the caller has
  dropped it (fresh memory of a large output costs one page fault per 4 KiB with glibc's malloc).

They compute what the plain PyTorch ops compute (up to float rounding, ~1e-6 relative) and fall back to
those ops wherever their preconditions do not hold (no oneDNN, non-fp32, autocast, other layers).
"""
from __future__ import annotations

import math
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ._derived import drop_derived, tensor_derived
from .window import eager_cpu_inference

__all__ = [
    "ReusableOutput", "is_plain", "linear", "linear_module", "mlp_residual", "set_weight_packing", "upsample_bilinear",
]


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):  # a build without the op
        return False


_ONEDNN_LINEAR = _has_onednn_linear()
_CAN_PACK = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

PACK_WEIGHTS = True  # see set_weight_packing


def set_weight_packing(enabled: bool) -> None:
    """Whether eager CPU inference keeps a copy of each linear weight in oneDNN's blocked layout (on
    by default; built on first use, rebuilt when the weight changes, freed with it). The matmuls then
    skip re-packing the weight in every call (Swin-T FPN 2.5-5% faster on a 2-core CPU), for a second
    copy of the linear weights in memory (118 MB for Swin-T, 0.8 GB for Swin-L). ``False`` frees the
    copies and trades the speed back for the memory."""
    global PACK_WEIGHTS
    PACK_WEIGHTS = bool(enabled)
    if not enabled:
        drop_derived("onednn")


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # the fused op has no autograd formula and no export / ONNX translation: eager inference only
    return (_ONEDNN_LINEAR and x.dtype == weight.dtype == torch.float32 and eager_cpu_inference(x)
            and not _autocast_cpu())


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
    gelu: Optional[str] = None, residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ``F.gelu(., approximate=gelu)`` if ``gelu`` is given, or
    ``residual + .`` if ``residual`` is given (one of the two). x: (..., in) -> (..., out)."""
    if gelu is not None and residual is not None:
        raise ValueError("linear fuses either gelu or residual, not both")
    if _onednn(x, weight):
        if PACK_WEIGHTS and _CAN_PACK:
            weight = tensor_derived(weight, "onednn", lambda: torch.ops.mkldnn._reorder_linear_weight(weight))
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        if gelu is not None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    if gelu is not None:
        return F.gelu(y, approximate=gelu)
    return y if residual is None else residual + y


def is_plain(module: Optional[nn.Module], cls: type) -> bool:
    # exactly ``cls`` and without hooks: replacing its call by the functional op changes nothing
    glob = nn.modules.module
    return (type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)
            and not (getattr(glob, "_global_forward_hooks", None) or getattr(glob, "_global_forward_pre_hooks", None)))


def linear_module(module: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``module(x)`` (``residual + module(x)`` with ``residual``) with :func:`linear` for a plain
    ``nn.Linear``; any other module (a LoRA wrapper, a quantised layer, one with hooks) is called."""
    if is_plain(module, nn.Linear):
        return linear(x, module.weight, module.bias, residual=residual)
    return module(x) if residual is None else residual + module(x)


def _fusable(mlp: nn.Module) -> bool:
    # exactly timm's Mlp in eval (fc1 -> GELU -> fc2, no inner norm); subclasses such as GluMlp, and
    # anything else, are called as they are
    return (is_plain(mlp, Mlp) and not mlp.training and is_plain(mlp.fc1, nn.Linear)
            and is_plain(mlp.fc2, nn.Linear) and is_plain(mlp.act, nn.GELU) and is_plain(mlp.norm, nn.Identity))


def mlp_residual(mlp: nn.Module, x: torch.Tensor, h: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + mlp(h)`` (``h`` defaults to ``x``) for a timm ``Mlp`` in eval: fc1 + GELU and fc2 + the
    residual add each run as one fused matmul."""
    h = x if h is None else h
    if not _fusable(mlp):
        return x + mlp(h)
    hidden = linear(h, mlp.fc1.weight, mlp.fc1.bias, gelu=mlp.act.approximate)
    return linear(hidden, mlp.fc2.weight, mlp.fc2.bias, residual=x)


def _taps(scale: int) -> List[Tuple[int, float]]:
    # output pixels o = scale * i + r read source position i + t_r, t_r = (2r + 1 - scale) / (2 scale)
    # (align_corners=False); with the input replicate-padded by 1, phase r is the lerp between padded
    # pixels i + a and i + a + 1 with weight w (a = 0 for t_r < 0, 1 otherwise); border clamping of
    # the source index is exactly the replicate padding
    taps = []
    for r in range(scale):
        t = (2 * r + 1 - scale) / (2 * scale)
        taps.append((0, 1.0 + t) if t < 0 else (1, t))
    return taps


def _integer_scales(x: torch.Tensor, size: Sequence[int]) -> Optional[Tuple[int, int]]:
    h, w = x.shape[-2:]
    if h == 0 or w == 0 or size[0] % h or size[1] % w:
        return None
    return size[0] // h, size[1] // w


# channels per group (NCHW maps): the W-upsampled group (group x (H + 2) x W*s floats) stays in cache
# while the H pass reads it twice per phase
_GROUP = 16


# the reference counts below are exact on the GIL build of CPython (free-threaded builds defer them)
_CAN_REUSE = hasattr(torch._C, "_storage_Use_Count") and getattr(sys, "_is_gil_enabled", lambda: True)()


class ReusableOutput:
    """A (B, C, H, W) output buffer handed out again once nothing outside holds it.

    glibc's malloc maps every block over 32 MB freshly and unmaps it on free, so a model returning a
    150x512x512 fp32 map page-faults 157 MB (38k faults, 35-60 ms on a 2-core VM) into every call.
    :meth:`empty` returns an alias of the buffer kept from the previous call when nothing else refers
    to its memory any more (no tensor or view: the storage's reference count; no storage object: its
    Python reference count; numpy arrays and DLPack capsules hold a tensor) and it was not moved to
    shared memory (another process may read it), checked under a lock so that concurrent callers get
    distinct buffers; otherwise a fresh tensor that becomes the kept one. A result the caller still
    holds is never overwritten. At most one buffer of at most :attr:`max_bytes` is kept; copies and
    pickles of the owner start without one.
    """

    max_bytes = 512 << 20

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None
        self._storage: Any = None  # the buffer's storage object: a storage taken by a caller is this one
        self._idle: Tuple[int, int] = (0, 0)  # reference counts while only this object holds the buffer
        self._lock = threading.Lock()

    def _refs(self) -> Tuple[int, int]:
        return torch._C._storage_Use_Count(self._storage._cdata), sys.getrefcount(self._storage)

    def empty(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor:
        """Uninitialised tensor like ``torch.empty(shape, dtype=, device=, memory_format=)``."""
        shape = torch.Size(shape)
        if math.prod(shape) * dtype.itemsize > self.max_bytes or not _CAN_REUSE:
            return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        inference = torch.is_inference_mode_enabled()
        with self._lock:
            buf = self._buf
            if (buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device
                    or not buf.is_contiguous(memory_format=memory_format) or buf.is_inference() != inference
                    or self._refs() != self._idle or buf.is_shared()):
                self._buf = self._storage = buf = None  # the old memory can serve the new buffer
                self._buf = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
                self._storage = self._buf.untyped_storage()
                self._idle = self._refs()
            return self._buf.detach()  # a new tensor on the same storage: the caller's reference counts

    def clear(self) -> None:
        """Free the kept buffer."""
        with self._lock:
            self._buf = self._storage = None

    def __deepcopy__(self, memo: Dict[int, Any]) -> "ReusableOutput":
        return ReusableOutput()

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()


def upsample_bilinear(
    x: torch.Tensor, size: Sequence[int], align_corners: bool = False, buffer: Optional[ReusableOutput] = None,
) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=align_corners)`` for (B, C, H, W) maps.

    In eager CPU inference, resizes by integer factors (``size`` a multiple of (H, W), align_corners
    False) run as separable two-tap lerps (per channel group in NCHW; channels-last maps stay
    channels-last), written into ``buffer`` (see :class:`ReusableOutput`) when given; every other case
    calls ``F.interpolate``.
    """
    scales = None
    if not align_corners and x.ndim == 4 and x.is_floating_point() and x.numel() and eager_cpu_inference(x):
        scales = _integer_scales(x, (int(size[0]), int(size[1])))
    if scales is None or scales == (1, 1):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    sh, sw = scales
    b, c, h, w = x.shape
    # the lerps iterate in the memory order of their outputs: NHWC maps run with C innermost
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shape = (b, c, h * sh, w * sw)
    out = (buffer.empty(shape, x.dtype, x.device, fmt) if buffer is not None
           else torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt))
    g = min(_GROUP, c) if fmt == torch.contiguous_format else c
    tmp = torch.empty((b, g, h + 2, w * sw), dtype=x.dtype, device=x.device, memory_format=fmt)
    for c0 in range(0, c, g):
        n = min(g, c - c0)
        src, t = xp[:, c0:c0 + n], tmp[:, :n]
        cols = t.unflatten(3, (w, sw))  # column sw * j + r
        for r, (a, wt) in enumerate(_taps(sw)):
            torch.lerp(src[..., a:a + w], src[..., a + 1:a + 1 + w], wt, out=cols[..., r])
        rows = out[:, c0:c0 + n].unflatten(2, (h, sh))  # row sh * i + r
        for r, (a, wt) in enumerate(_taps(sh)):
            torch.lerp(t[:, :, a:a + h], t[:, :, a + 1:a + 1 + h], wt, out=rows[:, :, :, r])
    return out
