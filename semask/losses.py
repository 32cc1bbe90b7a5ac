"""Segmentation losses: cross-entropy with the official reductions (also fused with the resize to the
labels, in row slabs), and mmseg's OHEM pixel sampler."""
from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["segmentation_ce", "upsampled_ce", "ohem_weights", "resize_rows", "row_slabs"]

# Upper bound on the bytes of one full-resolution (B, K, rows, W) float32 slab in :func:`upsampled_ce`
# (a few such slabs are alive at once; a slab is also at most 1/8 of the whole map): a memory bound,
# not a speed constant.
_SLAB_BYTES = 16 << 20


def ohem_weights(
    logits: torch.Tensor, labels: torch.Tensor, min_kept: int = 100_000, thresh: Optional[float] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """mmseg's ``OHEMPixelSampler``: a (B, H, W) 0/1 weight that keeps the hardest valid pixels.

    With ``thresh=None`` the ``min_kept * B`` valid pixels with the largest CE are kept; with a
    threshold, pixels whose ground-truth probability is below ``max(thresh, p_(min_kept))`` are kept.
    """
    with torch.no_grad():
        b = labels.shape[0]
        valid = labels != ignore_index
        weight = torch.zeros_like(labels, dtype=logits.dtype)
        if not valid.any():
            return weight
        if thresh is not None:
            prob = logits.softmax(1).gather(1, labels.clamp_max(logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
            sorted_prob, _ = prob[valid].sort()
            kth = sorted_prob[min(min_kept * b, sorted_prob.numel() - 1)] if sorted_prob.numel() else sorted_prob.new_zeros(())
            weight[valid & (prob < max(float(kth), thresh))] = 1.0
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
            flat = loss[valid]
            keep = min(min_kept * b, flat.numel())
            idx = flat.topk(keep).indices
            w = torch.zeros_like(flat)
            w[idx] = 1.0
            weight[valid] = w
        return weight


def _reduce(loss: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "mmseg":
        return loss.sum() / labels.numel()
    if reduction == "valid":
        return loss.sum() / (labels != ignore_index).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'valid' or 'mmseg', got {reduction!r}")


def segmentation_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "valid",
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pixel cross-entropy of (B, K, H, W) logits against (B, H, W) or (B, 1, H, W) int labels.

    Logits are bilinearly resized (align_corners False) to the label size first.
    ``reduction``: ``"valid"`` averages over non-ignored pixels (PyTorch default, detectron2 trees);
    ``"mmseg"`` averages over *all* pixels, ignored ones counting 0 (the official mmseg-0.11 loss).
    ``weight``: optional per-pixel (B, H, W) weights (OHEM), applied before the reduction.
    """
    if labels.ndim == 4:
        labels = labels.squeeze(1)
    labels = labels.long()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, labels, ignore_index, reduction)


def resize_rows(x: torch.Tensor, r0: int, r1: int, scale: int, width: int) -> torch.Tensor:
    """Output rows ``r0 * scale .. r1 * scale`` of ``F.interpolate(x, size=(H * scale, width),
    mode="bilinear", align_corners=False)`` for (B, C, H, W) ``x``, computed from input rows
    ``r0 - 1 .. r1 + 1`` only: (B, C, (r1 - r0) * scale, width).

    With an integer factor and align_corners False the resize commutes with whole-row shifts, so a
    slab resized with one row of context on each side gives exactly the rows of resizing the whole map
    (the border clamp applies where the slab touches the map's border).
    """
    lo, hi = max(r0 - 1, 0), min(r1 + 1, x.shape[2])
    y = F.interpolate(x[:, :, lo:hi], size=((hi - lo) * scale, width), mode="bilinear", align_corners=False)
    off = (r0 - lo) * scale
    return y[:, :, off:off + (r1 - r0) * scale]


def row_slabs(rows: int, row_bytes: int, budget: int) -> Tuple[Tuple[int, int], ...]:
    """``(r0, r1)`` ranges over ``rows`` input rows such that a slab's output (``row_bytes`` per input
    row) stays within ``budget`` bytes and within 1/8 of the whole output (at least one row each)."""
    step = max(1, min(budget, row_bytes * rows // 8) // max(1, row_bytes))
    return tuple((r, min(r + step, rows)) for r in range(0, rows, step))


def _images_per_slab(x: torch.Tensor) -> int:
    # PyTorch's CPU channels-last bilinear kernels run several times faster per pixel on one image than
    # on a batch slice; on accelerators one slab spans the batch (fewer, larger kernel launches)
    return 1 if x.device.type == "cpu" else x.shape[0]


class _UpsampledCE(torch.autograd.Function):
    # The loss and, when needed, its gradient with respect to the low-resolution logits are computed
    # together, slab by slab of output rows: the full-resolution logits, their log-softmax and their
    # gradient never exist as whole tensors (they dominate the memory of a training step).
    # The slabs are channels-last (class scores contiguous per pixel): that is the layout in which
    # PyTorch's CPU bilinear resize and its adjoint are vectorised over channels and in which the
    # per-pixel softmax reads contiguous memory; the numbers are those of the NCHW computation.

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, scale):  # type: ignore[override]
        b, k, h, w = logits.shape
        big_w = labels.shape[-1]
        x = logits.detach().float().contiguous(memory_format=torch.channels_last)
        norm = labels.numel() if reduction == "mmseg" else int((labels != ignore_index).sum().clamp_min(1))
        grad = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        total = x.new_zeros((), dtype=torch.float64)
        step = _images_per_slab(x)
        slabs = row_slabs(h, step * k * big_w * 4 * scale, _SLAB_BYTES)
        # one resized slab (with its context rows) and one log-softmax buffer, reused by every slab: a
        # fresh multi-MB tensor per slab costs more in first-touch page faults than the resize itself
        most = max(r1 - r0 for r0, r1 in slabs)
        y_buf = x.new_empty((step, (most + 2) * scale, big_w, k)).permute(0, 3, 1, 2)  # (., K, rows, W) NHWC
        logp_buf = x.new_empty((step, most * scale, big_w, k))
        for i0, (r0, r1) in itertools.product(range(0, b, step), slabs):
            i1 = min(i0 + step, b)
            lab = labels[i0:i1, r0 * scale:r1 * scale]
            valid = lab != ignore_index
            tgt = torch.where(valid, lab, 0).unsqueeze(-1)
            # the slab's input rows with one row of context on each side (see resize_rows); its output
            # rows off .. off + n are those of the whole map's resize
            lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
            off, n = (r0 - lo) * scale, (r1 - r0) * scale
            xs = x[i0:i1, :, lo:hi]
            size = ((hi - lo) * scale, big_w)
            y = torch.ops.aten.upsample_bilinear2d.out(xs, size, False, None, None,
                                                       out=y_buf[:i1 - i0, :, :size[0]])
            rows = y.permute(0, 2, 3, 1)[:, off:off + n]  # (images, n, W, K)
            logp = torch.log_softmax(rows, -1, out=logp_buf[:i1 - i0, :n])
            total -= (logp.gather(-1, tgt).squeeze(-1) * valid).sum(dtype=torch.float64)
            if grad is not None:
                # d CE / d logit = softmax - onehot(target), zero at ignored pixels and on the context
                # rows, written over the resized slab; then the resize's adjoint takes it to the input rows
                torch.exp(logp, out=rows)
                rows.scatter_add_(-1, tgt, torch.full(tgt.shape, -1.0, dtype=y.dtype, device=y.device))
                rows.mul_(valid.unsqueeze(-1))
                y[:, :, :off].zero_()
                y[:, :, off + n:].zero_()
                grad[i0:i1, :, lo:hi] += torch.ops.aten.upsample_bilinear2d_backward(
                    y, size, xs.shape, False, None, None)
        if grad is not None:
            ctx.save_for_backward(torch.empty_like(logits).copy_(grad.div_(norm)))
        return (total / norm).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None


def upsampled_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "valid",
    align_corners: bool = False,
) -> torch.Tensor:
    """``segmentation_ce(F.interpolate(logits, labels' size, bilinear), labels)`` with linear memory.

    logits: (B, K, h, w) low-resolution logits; labels: (B, H, W) or (B, 1, H, W) ints. The same value
    and gradient as resizing first (up to float rounding), computed over slabs of output rows so that no
    (B, K, H, W) tensor is kept for the backward pass (integer resize factors; other sizes resize the
    whole map). First-order gradients only.
    """
    if labels.ndim == 4:
        labels = labels.squeeze(1)
    if reduction not in ("valid", "mmseg"):
        raise ValueError(f"reduction must be 'valid' or 'mmseg', got {reduction!r}")
    (h, w), (big_h, big_w) = logits.shape[-2:], labels.shape[-2:]
    scale = big_h // h if h and big_h % h == 0 else 0
    if align_corners or scale < 2 or big_w % w or big_w // w != scale or torch.compiler.is_compiling():
        # not an integer factor (odd image sizes), align_corners, or torch.compile (its graph takes the
        # plain ops, which inductor fuses itself): resize the whole map
        return segmentation_ce(F.interpolate(logits, size=(big_h, big_w), mode="bilinear", align_corners=align_corners)
                               if scale != 1 else logits, labels, ignore_index, reduction)
    return _UpsampledCE.apply(logits, labels.long(), ignore_index, reduction, scale)
