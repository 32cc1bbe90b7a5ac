"""Export SeMask models: ``torch.export`` programs and ONNX files with dynamic batch, height and width.

The models trace size-generically (window padding, shifts and masks are gather indices built from
``arange`` arithmetic, see :mod:`semask.layers.window`), so one exported graph serves every input
size. Example::

    from semask.export import export_onnx
    model = semask.create_model("semask_swin_tiny_fpn.ade20k", pretrained=True)
    export_onnx(model, "semask_t.onnx")            # input "images" (B, 3, H, W) -> "logits" (B, K, H, W)
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn

__all__ = ["MIN_DYNAMIC_SIZE", "min_dynamic_size", "export_program", "export_onnx", "verify_onnx"]

PathLike = Union[str, Path]


def _example(model: nn.Module, example: Optional[torch.Tensor], size: Tuple[int, int], batch: int) -> torch.Tensor:
    if example is not None:
        return example
    p = next(model.parameters(), None)
    in_chans = getattr(model, "in_chans", 3)
    return torch.randn(batch, in_chans, *size, device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)


# Smallest dynamic height/width of SeMask Swin: 33 px keeps every stride-32 map at least 2 wide, so
# the tracer never has to decide whether a stage map is 1 x 1 (a size-1 dim changes view/contiguity
# logic and would specialise the graph). Other backbones have their own bound (MiT: 61, its
# spatially reduced attention maps): see min_dynamic_size. Smaller images: pad them, or export with
# dynamic=False.
MIN_DYNAMIC_SIZE = 33


def min_dynamic_size(model: nn.Module) -> int:
    """Smallest height/width a dynamic export of ``model`` (a segmentor or a backbone) accepts: the
    backbone's ``min_dynamic_size`` (Swin 33, MiT 61), :data:`MIN_DYNAMIC_SIZE` for other modules."""
    backbone = getattr(model, "backbone", model)
    return int(getattr(backbone, "min_dynamic_size", MIN_DYNAMIC_SIZE))


def _dynamic_shapes(max_batch: int, min_size: int, max_size: int) -> Dict[str, Dict[int, torch.export.Dim]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=max_batch),
                       2: torch.export.Dim("height", min=min_size, max=max_size),
                       3: torch.export.Dim("width", min=min_size, max=max_size)}}


class _ImagesOnly(nn.Module):
    # gives the exported input the name "images" whatever the wrapped forward calls it
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model(images)


def export_program(
    model: nn.Module,
    example: Optional[torch.Tensor] = None,
    *,
    dynamic: bool = True,
    size: Tuple[int, int] = (128, 160),
    batch: int = 2,
    max_batch: int = 1024,
    max_size: int = 16384,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model(images)`` in eval mode.

    Args:
        model: a SeMask segmentor or backbone (any module taking a ``(B, C, H, W)`` image batch).
        example: example input; default random ``(batch, in_chans, *size)`` (any size works: the
            graph does not specialise on it).
        dynamic: symbolic batch (1..max_batch), height and width (:func:`min_dynamic_size` of the
            model..max_size); False exports for the example's shape only.

    Returns the ExportedProgram; ``program.module()(images)`` runs it.
    """
    x = _example(model, example, size, batch)
    min_size = min_dynamic_size(model)
    if dynamic and min(x.shape[-2:]) < min_size:
        raise ValueError(f"a dynamic export of {type(model).__name__} needs an example of H, W >= {min_size}, got "
                         f"{tuple(x.shape[-2:])}; use a larger example size (the graph stays size-generic) or "
                         "dynamic=False")
    wrapped = _ImagesOnly(model)
    was_training = model.training
    model.eval()
    try:
        # size-oblivious reasoning for backed sizes: a stage map or window count that *may* be 1
        # must not specialise the graph (every op here is correct for size 1 as well)
        with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
            return torch.export.export(
                wrapped, (x,), dynamic_shapes=_dynamic_shapes(max_batch, min_size, max_size) if dynamic else None
            )
    finally:
        model.train(was_training)


def export_onnx(
    model: nn.Module,
    path: PathLike,
    example: Optional[torch.Tensor] = None,
    *,
    dynamic: bool = True,
    size: Tuple[int, int] = (128, 160),
    batch: int = 2,
    opset_version: Optional[int] = None,
    optimize: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file with input ``images`` (B, C, H, W) float32 and output ``logits``
    (segmentors; backbones output ``features_i`` / ``priors_i``), batch, height and width dynamic
    (H, W >= :func:`min_dynamic_size`).

    Uses the dynamo-based exporter on :func:`export_program`'s graph. Returns the path. The classic
    exporter (``torch.onnx.export(model, x, f, dynamo=False, dynamic_axes=...)``) works too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, example, dynamic=dynamic, size=size, batch=batch)
    out_names = _output_names(program)
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    onnx_program = torch.onnx.export(
        program, f=None, input_names=["images"], output_names=out_names, dynamo=True, optimize=optimize,
        verbose=False, **kwargs,
    )
    onnx_program.save(str(path))
    return path


def _output_names(program: torch.export.ExportedProgram) -> Sequence[str]:
    n = len(program.graph_signature.user_outputs)
    return ["logits"] if n == 1 else [f"output_{i}" for i in range(n)]


def verify_onnx(
    path: PathLike, model: nn.Module, sizes: Sequence[Tuple[int, int, int]] = ((1, 97, 131), (2, 64, 64)),
) -> float:
    """Max |onnxruntime - PyTorch| over random inputs of the given (batch, H, W) sizes (CPU, fp32)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        p = next(model.parameters())
        for b, h, w in sizes:
            x = torch.randn(b, getattr(model, "in_chans", 3), h, w)
            with torch.no_grad():
                ref = model(x.to(p.device, p.dtype))
            refs = [ref] if isinstance(ref, torch.Tensor) else list(torch.utils._pytree.tree_leaves(ref))
            outs = sess.run(None, {"images": x.numpy()})
            for r, o in zip(refs, outs):
                worst = max(worst, float(np.abs(r.float().cpu().numpy() - o).max()))
    finally:
        model.train(was_training)
    return worst
