"""Export and compilation (issue #8): ONNX with dynamic batch/height/width (CLI + API), torch.export,
torch.compile(fullgraph=True) for static and dynamic shapes, on tiny configs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import semask
from semask.cli import main as cli_main
from semask.export import MIN_DYNAMIC_SIZE, export_program

from conftest import TINY_SWIN

TINY_FPN = dict(TINY_SWIN, fpn_channels=16)


def _tiny_fpn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", **TINY_FPN).eval()  # W W G G semantic layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # 0 at init: make the semantic branch count
                p.fill_(0.7)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _assert_onnx_matches(path, model: torch.nn.Module, sizes, atol: float) -> None:
    """The ONNX Runtime session of ``path`` gives ``model``'s (B, 5, H, W) outputs at every (B, H, W)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert got.shape == ref.shape == (b, 5, h, w)
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny_fpn() -> torch.nn.Module:
    return _tiny_fpn()


def test_cli_onnx_export_dynamic_sizes(tiny_fpn, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    semask.save_pretrained(tiny_fpn, tmp_path / "tiny")
    out = tmp_path / "tiny.onnx"
    rc = cli_main(["export", "--pretrained", str(tmp_path / "tiny"), "--format", "onnx", "--out", str(out),
                   "--size", "64", "96"])
    assert rc == 0 and out.is_file()
    assert "max abs diff" in capsys.readouterr().out
    graph = onnx.load(str(out)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3 and all(d.dim_param for i, d in enumerate(dims) if i != 1)

    # batch, odd and even sizes, none of them the export size; window padding and shifts vary per stage
    _assert_onnx_matches(out, tiny_fpn, [(1, 33, 35), (2, 97, 131), (3, 50, 70), (1, 225, 41)], atol=1e-3)


def test_cli_export_errors(tmp_path):
    with pytest.raises(SystemExit, match="MODEL"):
        cli_main(["export", "--out", str(tmp_path / "x.onnx")])
    with pytest.raises(SystemExit, match=".onnx"):
        cli_main(["export", "semask_swin_tiny_fpn", "--out", str(tmp_path / "x.bin")])
    with pytest.raises(SystemExit, match=">= 33"):
        cli_main(["export", "semask_swin_tiny_fpn", "--out", str(tmp_path / "x.onnx"), "--size", "16", "64"])


def test_torch_export_is_size_generic(tiny_fpn):
    program = export_program(tiny_fpn, size=(97, 131), batch=2)
    run = program.module()
    for b, h, w in [(1, MIN_DYNAMIC_SIZE, 40), (3, 64, 64), (1, 150, 77)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(run(x), tiny_fpn(x), atol=1e-5, rtol=1e-5)


def test_torch_export_backbone_outputs(tiny_swin_kwargs):
    from semask.backbones.swin import SeMaskSwinTransformer

    # 2 stages (windowed + global semantic layers) keep the trace short; outputs are (features, priors)
    kw = dict(tiny_swin_kwargs, depths=(2, 2), num_heads=(1, 2), sem_global=(False, True), out_indices=(0, 1))
    model = SeMaskSwinTransformer(**kw).eval()
    run = export_program(model, size=(64, 80), batch=1).module()
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        got, ref = run(x), model(x)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_no_graph_breaks(tiny_fpn, dynamic):
    # fullgraph=True raises on any graph break. Static: aot_eager traces through dynamo + AOTAutograd
    # like inductor does, without the C++ codegen that takes minutes on 2 cores (slow test below).
    # Dynamic: dynamo alone (the size-generic part). Dynamo specialises every dim that is 1 (batch,
    # or a stage's window count on small inputs), so batch >= 2 and sizes > 224 (>= 2 windows of 7
    # at stride 32); within that, H and W change without a recompile.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager" if dynamic else "aot_eager")
    compiled = torch.compile(tiny_fpn, backend=counter, fullgraph=True, dynamic=dynamic)
    sizes = [(1, 64, 96), (1, 64, 96)] if not dynamic else [(2, 240, 232), (3, 255, 301), (2, 229, 260)]
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), tiny_fpn(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1  # one graph: no recompilation across sizes


@pytest.mark.slow
def test_compile_inductor_matches_eager(tiny_fpn):
    torch._dynamo.reset()
    compiled = torch.compile(tiny_fpn, fullgraph=True, dynamic=True)
    for b, h, w in [(1, 64, 96), (2, 97, 131)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), tiny_fpn(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("h,w,window,shift", [(1, 1, 7, 3), (7, 13, 7, 3), (20, 30, 7, 3), (14, 14, 7, 0),
                                              (5, 9, 4, 2), (33, 17, 12, 6)])
def test_window_gathers_equal_pad_roll_partition(h, w, window, shift):
    # the size-generic gathers used by the models == the reference map ops (pad, roll, partition)
    from semask.layers import (pad_to_multiple, tokens_to_windows, window_index, window_partition,
                               window_reverse, windows_to_tokens)

    x = torch.randn(2, h, w, 5)
    y = pad_to_multiple(x, window)
    hp, wp = y.shape[1], y.shape[2]
    ref = window_partition(torch.roll(y, (-shift, -shift), (1, 2)), window)
    fwd, inv = window_index(h, w, window, shift)
    got = tokens_to_windows(x.reshape(2, h * w, 5), fwd, window)
    assert torch.equal(got, ref)
    back = torch.roll(window_reverse(got, window, hp, wp), (shift, shift), (1, 2))[:, :h, :w]
    assert torch.equal(windows_to_tokens(got, inv, 2), back.reshape(2, h * w, 5))


# --------------------------------------------------------------------------------------------------
# issue #19: per-model dynamic bounds (MiT), the classic exporter

TINY_MIT = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1))


def _tiny_segformer() -> torch.nn.Module:
    torch.manual_seed(0)
    model = semask.create_model("semask_mit_b0_segformer", num_classes=5, decoder_channels=16, **TINY_MIT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.7)
    return model


def test_min_dynamic_size_is_per_model(tiny_fpn):
    from semask.export import min_dynamic_size

    seg = _tiny_segformer()
    assert min_dynamic_size(tiny_fpn) == MIN_DYNAMIC_SIZE == 33
    assert min_dynamic_size(seg) == min_dynamic_size(seg.backbone) == 61
    with pytest.raises(ValueError, match="H, W >= 61"):
        export_program(seg, size=(48, 64))


def test_onnx_mit_segformer_onnxruntime_two_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from semask.export import export_onnx

    seg = _tiny_segformer()
    path = export_onnx(seg, tmp_path / "segformer.onnx", size=(96, 128), batch=2)
    # the lower bound and a size above the export's
    _assert_onnx_matches(path, seg, [(1, 61, 75), (3, 130, 97)], atol=1e-4)


def test_classic_onnx_exporter_dynamic_axes(tiny_fpn, tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "classic.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad():
        torch.onnx.export(tiny_fpn, (torch.randn(1, 3, 64, 96),), str(path), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": axes, "logits": axes})
    # sizes other than the traced one: different paddings, shifts and window counts per stage
    _assert_onnx_matches(path, tiny_fpn, [(2, 97, 131), (1, 50, 70)], atol=1e-4)
