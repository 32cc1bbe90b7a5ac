"""CPU kernels of the optimized inference paths.

* :func:`linear`: ``F.linear`` with GELU or a residual add fused into oneDNN's matmul (the bias and the
  epilogue are applied while the output tile is in cache, instead of extra passes over the output),
  optionally on a weight pre-packed in oneDNN's blocked layout (:func:`pack_linear_weight`);
* :func:`upsample_bilinear`: bilinear resize by integer factors (the x4 resize of stride-4 logits to the
  image) as separable two-tap lerps over cache-sized channel groups.

Each computes what the plain PyTorch op computes (up to float rounding, ~1e-6 relative). They use
private oneDNN ops (no autograd formula, no export translation): callers use them only in eager fp32
CPU inference (:func:`eager_cpu_inference`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones._base import autocast_enabled

__all__ = ["eager_cpu_inference", "is_plain", "linear", "pack_linear_weight", "upsample_bilinear"]


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):  # a build without the op
        return False


ONEDNN_LINEAR = _has_onednn_linear()
CAN_PACK = ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def is_traced() -> bool:
    """True under torch.compile, torch.export (ONNX) or jit tracing."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """True when ``x`` (fp32, CPU) runs eagerly without autograd and without autocast: the only
    setting where the optimized paths run (everything else takes the reference forward)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not is_traced() and not autocast_enabled("cpu"))


def is_plain(module: Optional[nn.Module], cls: type) -> bool:
    """``module`` is exactly ``cls`` (not a subclass or a wrapper) and has no forward hooks, and no
    global forward hooks are set: replacing its call by the functional op changes nothing."""
    glob = nn.modules.module
    return (type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)
            and not (getattr(glob, "_global_forward_hooks", None) or getattr(glob, "_global_forward_pre_hooks", None)))


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout (the matmuls then skip re-packing it on every call), or
    ``weight`` itself where the op is missing."""
    return torch.ops.mkldnn._reorder_linear_weight(weight) if CAN_PACK else weight


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
    gelu: Optional[str] = None, residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ``F.gelu(., approximate=gelu)`` if ``gelu`` is given, or
    ``residual + .`` if ``residual`` is given (one of the two). x: (..., in) -> (..., out).
    ``weight`` may be a :func:`pack_linear_weight` result."""
    if ONEDNN_LINEAR:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        if gelu is not None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    if gelu is not None:
        return F.gelu(y, approximate=gelu)
    return y if residual is None else residual + y


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


def integer_scales(x: torch.Tensor, size: Sequence[int]) -> Optional[Tuple[int, int]]:
    """(sh, sw) when ``size`` is an integer multiple of x's (H, W), else None."""
    h, w = x.shape[-2:]
    if h == 0 or w == 0 or size[0] % h or size[1] % w:
        return None
    return size[0] // h, size[1] // w


def upsample_bilinear(x: torch.Tensor, size: Sequence[int], group: int) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for (B, C, H, W) float maps and
    ``size`` an integer multiple of (H, W): separable two-tap lerps per ``group`` channels (NCHW; a
    channels-last map stays channels-last and goes in one group)."""
    sh, sw = integer_scales(x, size)
    b, c, h, w = x.shape
    # the lerps iterate in the memory order of their outputs: NHWC maps run with C innermost
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    out = torch.empty((b, c, h * sh, w * sw), dtype=x.dtype, device=x.device, memory_format=fmt)
    g = max(1, min(group, c)) if fmt == torch.contiguous_format else c
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
