"""The segmentor's CPU inference reuses its logits buffer only when nothing outside holds it
(:class:`semask.layers.cpu.ReusableOutput`): a result the caller keeps is never overwritten."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

import semask
from semask.layers.cpu import ReusableOutput


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    from conftest import TINY_SWIN

    return semask.create_model("semask_swin_tiny_fpn", **TINY_SWIN, fpn_channels=16).eval()


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _inputs(n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, 64, 64, generator=g) for _ in range(n)]


def _fresh(model, x):
    model.reuse_output = False
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.reuse_output = True


def test_dropped_output_is_reused_and_values_are_right(model):
    x1, x2 = _inputs(2)
    ref1, ref2 = _fresh(model, x1), _fresh(model, x2)
    with torch.no_grad():
        y = model(x1)
        torch.testing.assert_close(y, ref1, atol=0, rtol=0)
        ptr = _ptr(y)
        del y
        y = model(x2)
    assert _ptr(y) == ptr  # the dropped buffer served the next call
    torch.testing.assert_close(y, ref2, atol=0, rtol=0)


@pytest.mark.parametrize("keep", ["tensor", "view", "storage", "numpy", "dlpack", "list", "shared"])
def test_a_held_output_is_never_overwritten(model, keep):
    x1, x2 = _inputs(2)
    ref1, ref2 = _fresh(model, x1), _fresh(model, x2)
    with torch.no_grad():
        y = model(x1)
        ptr = _ptr(y)
        holder = {
            "tensor": lambda: y,
            "view": lambda: y[0, 1:3],
            "storage": lambda: y.untyped_storage(),
            "numpy": lambda: y.numpy(),
            "dlpack": lambda: torch.utils.dlpack.to_dlpack(y),
            "list": lambda: [y.detach()],
            # moved to shared memory (a torch.multiprocessing queue does this): another process may
            # still read it after this one dropped every reference
            "shared": lambda: y.share_memory_(),
        }[keep]()
        if keep == "shared":
            holder = None  # nothing here holds it any more (its old address is free again)
        del y
        y2 = model(x2)
    assert not y2.is_shared() and (keep == "shared" or _ptr(y2) != ptr)
    torch.testing.assert_close(y2, ref2, atol=0, rtol=0)
    if keep == "view":
        torch.testing.assert_close(holder, ref1[0, 1:3], atol=0, rtol=0)
    elif keep == "numpy":
        torch.testing.assert_close(torch.from_numpy(holder), ref1, atol=0, rtol=0)
    elif keep == "dlpack":
        torch.testing.assert_close(torch.utils.dlpack.from_dlpack(holder), ref1, atol=0, rtol=0)
    elif keep == "storage":
        kept = torch.empty(0).set_(holder, 0, ref1.shape, ref1.stride())
        torch.testing.assert_close(kept, ref1, atol=0, rtol=0)
    elif keep != "shared":
        kept = holder if keep == "tensor" else holder[0]
        torch.testing.assert_close(kept, ref1, atol=0, rtol=0)


def test_concurrent_callers_get_their_own_results(model):
    xs = _inputs(4)
    refs = [_fresh(model, x) for x in xs]
    errors = []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(6):
                    y = model(xs[i])
                    if not torch.equal(y, refs[i]):
                        errors.append(i)
                    del y
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_inference_mode_and_no_grad_alternate(model):
    (x,) = _inputs(1)
    ref = _fresh(model, x)
    for ctx in [torch.no_grad, torch.inference_mode, torch.no_grad, torch.inference_mode]:
        with ctx():
            y = model(x)
        assert y.is_inference() == (ctx is torch.inference_mode)
        torch.testing.assert_close(y, ref, atol=0, rtol=0)
        del y


def test_autograd_never_uses_the_buffer(model):
    model.reuse_output = False  # start empty
    model.reuse_output = True
    (x,) = _inputs(1)
    y = model(x)  # autograd on: a fresh tensor that carries the graph
    assert y.requires_grad and model._output._buf is None


def test_switching_reuse_off_frees_the_buffer_and_allocates_fresh(model):
    (x,) = _inputs(1)
    with torch.no_grad():
        model(x)
        assert model._output._buf is not None
        model.reuse_output = False
        assert model._output._buf is None
        y = model(x)
        del y
        model(x)
        assert model._output._buf is None  # nothing kept while off
    model.reuse_output = True


def test_copies_and_pickles_do_not_carry_the_buffer(model):
    (x,) = _inputs(1)
    with torch.no_grad():
        model(x)
    assert model._output._buf is not None
    clone = copy.deepcopy(model)
    assert clone._output._buf is None and clone._output is not model._output
    buf = io.BytesIO()
    torch.save(model, buf)
    assert buf.tell() < 4 * sum(p.numel() * 4 for p in model.parameters()) + (1 << 20)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), _fresh(model, x), atol=0, rtol=0)


def test_buffer_follows_shape_dtype_and_size_cap():
    out = ReusableOutput()
    a = out.empty((1, 2, 8, 8), torch.float32, torch.device("cpu"))
    pa = _ptr(a)
    del a
    b = out.empty((1, 2, 8, 8), torch.float32, torch.device("cpu"))
    assert _ptr(b) == pa
    del b
    c = out.empty((1, 2, 8, 8), torch.float64, torch.device("cpu"))
    assert c.dtype == torch.float64 and c.shape == (1, 2, 8, 8)
    d = out.empty((1, 2, 8, 8), torch.float64, torch.device("cpu"), torch.channels_last)
    assert d.is_contiguous(memory_format=torch.channels_last) and _ptr(d) != _ptr(c)
    del c, d
    out.max_bytes = 1024  # larger outputs are never kept
    e = out.empty((1, 2, 16, 16), torch.float32, torch.device("cpu"))
    del e
    f = out.empty((1, 2, 16, 16), torch.float32, torch.device("cpu"))
    assert f.shape == (1, 2, 16, 16) and out._buf.dtype == torch.float64  # the last kept one stays
