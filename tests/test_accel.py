"""The reference model files and the opt-in fast paths of ``semask.optimize`` (semask/accel):

* reference == optimized for every family, odd sizes, batch 2; optimize -> restore is the reference;
* weight edits (.data, copy_, load_state_dict, parameter replacement): the bare model is never stale,
  the optimized one follows the normal APIs and `.data` writes after another optimize call;
* forward hooks on inner modules fire in eval inference, bare and optimized;
* threads running different sizes through shared and separate models;
* global semantic attention in query chunks: exact, and memory linear in the pixels.
"""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import timm
import torch
import torch.nn as nn

import semask
from semask.accel import is_optimized, restore
from semask.accel import _tune
from semask.layers import SemanticLayer, semantic_attention, window_partition, window_reverse, tokens_to_windows
from semask.layers import window_index, pad_to_multiple

from conftest import TINY_SWIN

TOL = dict(atol=1e-5, rtol=1e-5)

D2_TINY = dict(num_classes=5, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
               conv_dim=32, mask_dim=16, hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=32, dec_layers=2,
               enc_layers=1)
MIT_TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1))


def _perturb(model: nn.Module) -> nn.Module:
    """Non-trivial gamma and BatchNorm statistics (both are identities at init)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.7)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _swin_fpn() -> nn.Module:
    torch.manual_seed(0)
    return _perturb(semask.create_model("semask_swin_tiny_fpn", **TINY_SWIN, fpn_channels=16))


FAMILIES = {
    "swin_fpn": _swin_fpn,
    "swin_fpn_global": lambda: (torch.manual_seed(0), _perturb(semask.create_model(
        "semask_swin_tiny_fpn", **{**TINY_SWIN, "sem_global": (True, False, True, False)}, fpn_channels=16)))[1],
    "mit_segformer": lambda: (torch.manual_seed(0), _perturb(semask.create_model(
        "semask_mit_b0_segformer", num_classes=5, decoder_channels=16, **MIT_TINY)))[1],
    "wrapped_timm_fpn": lambda: (torch.manual_seed(0), _perturb(semask.create_model(
        "semask_fpn", backbone=timm.create_model("convnext_tiny", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
        num_classes=4, fpn_channels=16)))[1],
    "maskformer": lambda: (torch.manual_seed(0), _perturb(semask.create_model("semask_swin_large_maskformer", **D2_TINY)))[1],
    "mask2former": lambda: (torch.manual_seed(0), _perturb(semask.create_model("semask_swin_large_mask2former", **D2_TINY)))[1],
    "fapn": lambda: (torch.manual_seed(0), _perturb(semask.create_model("semask_swin_large_fapn_mask2former", **D2_TINY)))[1],
}


def _run(model, x):
    with torch.no_grad():
        return model(x)


# the other families run the same check in their contract (tests/contract.py, tests/test_contract.py)
@pytest.mark.parametrize("family", ["swin_fpn_global", "fapn"])
def test_optimized_equals_reference_every_family(family):
    model = FAMILIES[family]()
    xs = [torch.randn(2, 3, 67, 93), torch.randn(1, 3, 77, 65)]
    refs = [_run(model, x) for x in xs]
    assert semask.optimize(model, autotune=False) is model and is_optimized(model)
    for x, ref in zip(xs, refs):
        torch.testing.assert_close(_run(model, x), ref, **TOL)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), ref, **TOL)
    restore(model)
    assert not is_optimized(model)
    for x, ref in zip(xs, refs):
        torch.testing.assert_close(_run(model, x), ref, atol=0, rtol=0)


def test_fast_paths_run_and_autotune_keeps_results():
    model = _swin_fpn()
    x = torch.randn(2, 3, 67, 93)
    ref = _run(model, x)
    semask.optimize(model, autotune=False)
    calls = []
    orig = type(model.backbone.layers[0].blocks[0])._chunked
    type(model.backbone.layers[0].blocks[0])._chunked = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        torch.testing.assert_close(_run(model, x), ref, **TOL)
    finally:
        type(model.backbone.layers[0].blocks[0])._chunked = orig
    assert calls  # the chunked path ran (not the reference fallback)
    semask.optimize(model, autotune=True)
    _tune.reset_decisions()
    for _ in range(3 * _tune.TRIALS + 1):  # through every candidate, then the kept one
        torch.testing.assert_close(_run(model, x), ref, **TOL)
    assert _tune.decisions()


@pytest.mark.parametrize("chunk_scale", [1, 4])
def test_chunk_sizes_cross_images(monkeypatch, chunk_scale):
    # tiny chunks (a few windows, crossing image boundaries of the batch) compute the same values
    monkeypatch.setattr(_tune, "token_chunk", lambda bytes_per_token, scale=1: 49 * 3 * chunk_scale + 5)
    model = _swin_fpn()
    x = torch.randn(2, 3, 67, 93)
    ref = _run(model, x)
    semask.optimize(model, autotune=False)
    torch.testing.assert_close(_run(model, x), ref, **TOL)


def _edits():
    def data_write(m):
        m.decode_head.conv_seg.weight.data.mul_(1.3)
        m.backbone.layers[0].blocks[0].attn.qkv.weight.data.mul_(1.3)
        m.backbone.layers[1].semantic_layer.class_injection[0].mlp_v.weight.data.mul_(1.3)
        m.decode_head.scale_heads[1][0].bn.running_var.data.mul_(1.3)

    def copy_edit(m):
        with torch.no_grad():
            for p in (m.backbone.layers[0].blocks[1].mlp.fc1.weight, m.decode_head.scale_heads[0][0].conv.weight,
                      m.backbone.layers[1].semantic_layer.class_injection[0].gamma):
                p.copy_(p * 1.3)

    def load(m):
        state = {k: v * 1.3 if v.is_floating_point() else v for k, v in m.state_dict().items()}
        m.load_state_dict(state)

    def replace(m):
        blk = m.backbone.layers[0].blocks[0]
        blk.attn.proj.weight = nn.Parameter(blk.attn.proj.weight.detach() * 1.3)
        sem = m.backbone.layers[0].semantic_layer.class_injection[0]
        sem.mlp_res.weight = nn.Parameter(sem.mlp_res.weight.detach() * 1.3)
        m.decode_head.conv_seg.bias = nn.Parameter(m.decode_head.conv_seg.bias.detach() + 0.5)

    return {"data": data_write, "copy_": copy_edit, "load_state_dict": load, "replace": replace}


@pytest.mark.parametrize("edit", list(_edits()))
def test_weight_edits(edit):
    x = torch.randn(1, 3, 64, 80)
    fn = _edits()[edit]
    bare = _swin_fpn()
    before = _run(bare, x)
    _run(bare, x)
    fn(bare)
    expected = _run(copy.deepcopy(restore(copy.deepcopy(bare))), x)
    got = _run(bare, x)
    assert (got - before).abs().max() > 1e-3  # the edit matters
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the bare model is never stale

    opt = semask.optimize(_swin_fpn(), autotune=False)
    torch.testing.assert_close(_run(opt, x), before, **TOL)
    fn(opt)
    if edit == "data":
        semask.optimize(opt, autotune=False)  # the documented call after .data writes
    torch.testing.assert_close(_run(opt, x), expected, **TOL)


def test_to_and_train_are_followed():
    x = torch.randn(1, 3, 40, 56)
    model = semask.optimize(_swin_fpn(), autotune=False)
    ref = _run(restore(copy.deepcopy(model)), x)
    _run(model, x)
    model.to(torch.float64).to(torch.float32)  # new memory for every parameter
    torch.testing.assert_close(_run(model, x), ref, **TOL)
    model.train()
    out = model(x, torch.zeros(1, 40, 56, dtype=torch.long))
    out["loss"].backward()
    assert model.backbone.layers[0].blocks[0].attn.qkv.weight.grad is not None
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    torch.testing.assert_close(_run(model, x), _run(restore(copy.deepcopy(model)), x), **TOL)


def test_copies_and_pickles_of_optimized_models():
    x = torch.randn(1, 3, 40, 56)
    model = semask.optimize(_swin_fpn(), autotune=False)
    ref = _run(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(_run(clone, x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("optimized", [False, True])
def test_forward_hooks_fire_in_eval_inference(optimized):
    model = _swin_fpn()
    x = torch.randn(1, 3, 64, 64)
    ref = _run(model, x)
    if optimized:
        semask.optimize(model, autotune=False)
    seen = []
    targets = [model.backbone.layers[0].blocks[0].attn.qkv, model.backbone.layers[0].blocks[1].mlp.fc2,
               model.backbone.layers[0].semantic_layer.class_injection[0].mlp_cls_q,
               model.decode_head.scale_heads[0][0].conv, model.decode_head.scale_heads[1][0].bn,
               model.decode_head.conv_seg]
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.append(n)) for n, m in enumerate(targets)]
    out = _run(model, x)
    assert sorted(set(seen)) == list(range(len(targets)))
    torch.testing.assert_close(out, ref, **TOL)
    # a hook that changes the output is honoured
    for h in handles:
        h.remove()
    handle = model.decode_head.scale_heads[0][0].conv.register_forward_hook(lambda m, i, o: o * 0)
    changed = _run(model, x)
    handle.remove()
    assert (changed - ref).abs().max() > 1e-4
    torch.testing.assert_close(_run(model, x), ref, **TOL)


@pytest.mark.parametrize("optimized", [False, True])
def test_threads_different_sizes(optimized):
    shared = _swin_fpn()
    others = [_swin_fpn() for _ in range(2)]
    sizes = [(33, 41), (64, 64), (50, 97), (71, 29), (96, 80), (40, 40)]
    inputs = [torch.randn(1 + i % 2, 3, *s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    expected = [_run(shared, x) for x in inputs]
    if optimized:
        for m in [shared, *others]:
            semask.optimize(m)  # autotune on: decisions made concurrently
    errors, results = [], {}

    def work(i):
        try:
            for rep in range(3):
                model = shared if (i + rep) % 2 == 0 else others[i % 2]
                results[(i, rep)] = _run(model, inputs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, _), out in results.items():
        torch.testing.assert_close(out, expected[i], **TOL)


def test_model_files_have_no_fast_paths():
    import pathlib
    import re

    root = pathlib.Path(semask.__file__).parent
    bad = re.compile(r"eager_cpu_inference|mkldnn|_storage_Use_Count|getrefcount|derived_tensor|ReusableOutput")
    hits = [str(p) for d in ("layers", "backbones", "decoders", "models") for p in (root / d).rglob("*.py")
            if bad.search(p.read_text())]
    assert not hits


# --------------------------------------------------------------------------------------------------
# building blocks

def test_window_helpers_agree():
    x = torch.randn(2, 17, 23, 6)
    p = pad_to_multiple(x, 7)
    assert p.shape == (2, 21, 28, 6)
    w = window_partition(p, 7)
    assert w.shape == (2 * 12, 49, 6)
    torch.testing.assert_close(window_reverse(w, 7, 21, 28), p, atol=0, rtol=0)
    # the gather of the models == pad + roll + partition of the official code
    for shift in (0, 3):
        fwd, _ = window_index(17, 23, 7, shift)
        got = tokens_to_windows(x.reshape(2, -1, 6), fwd, 7)
        torch.testing.assert_close(got, window_partition(torch.roll(p, (-shift, -shift), (1, 2)), 7), atol=0, rtol=0)


def test_global_semantic_attention_chunks_are_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 1000, 5, generator=g), torch.randn(2, 1000, 5, generator=g), torch.randn(2, 1000, 8, generator=g)
    whole = semantic_attention(q, k, v, chunk_bytes=0)
    direct = torch.softmax(q @ k.transpose(1, 2), -1) @ v
    torch.testing.assert_close(whole, direct, atol=1e-6, rtol=1e-5)
    for chunk_bytes in (4, 1000 * 4 * 7, 1000 * 4 * 333):  # 1, 7 and 333 query rows per chunk
        torch.testing.assert_close(semantic_attention(q, k, v, chunk_bytes=chunk_bytes), whole, atol=1e-6, rtol=1e-5)


def _peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # replay the memory events in time order: each op's own allocations minus frees (``self``: nested
    # ops are not counted twice) and the frees outside any op ("[memory]" events) -> peak live memory
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_global_semantic_layer_memory_is_linear(monkeypatch):
    import semask.layers.semantic as semantic

    monkeypatch.setattr(semantic, "ATTN_CHUNK_BYTES", 1 << 20)  # 1 MiB score chunks
    torch.manual_seed(0)
    layer = SemanticLayer(8, 5, global_attn=True).eval()
    peaks = {}
    for side in (48, 96):  # 2304 and 9216 tokens: N x N would be 20 MB and 340 MB
        x = torch.randn(1, side * side, 8)
        with torch.no_grad():
            peaks[side] = _peak_bytes(lambda: layer(x, (side, side)))
    ratio = peaks[96] / peaks[48]
    assert peaks[96] < 32 << 20, peaks  # far below the 340 MB N x N matrix
    assert ratio < 6, peaks  # ~4x for 4x the tokens (quadratic: 16x)
    # and the chunked layer equals the unchunked computation
    x = torch.randn(1, 40 * 40, 8)
    with torch.no_grad():
        _, chunked = layer(x, (40, 40))
        monkeypatch.setattr(semantic, "ATTN_CHUNK_BYTES", None)
        _, whole = layer(x, (40, 40))
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_predict_optimizes_for_the_call_and_falls_back_to_slide_on_oom():
    model = _swin_fpn()
    image = torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8)
    ref = semask.predict(model, image, resize=False, optimize=False)
    assert torch.equal(semask.predict(model, image, resize=False), ref) and not is_optimized(model)

    class OOMOverWhole(nn.Module):  # runs out of memory on inputs larger than 64 px
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if max(x.shape[-2:]) > 64:
                raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB")
            return self.inner(x)

    wrapped = OOMOverWhole(model)
    wrapped.pretrained_cfg = {"crop_size": (64, 64)}
    with pytest.warns(RuntimeWarning, match="sliding"):
        got = semask.predict(wrapped, image, resize=False)
    expected = semask.predict(model, image, resize=False, mode="slide", crop_size=64)
    assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="boom"):  # other errors are not swallowed
        semask.predict(_Raiser(), image, resize=False)


class _Raiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise RuntimeError("boom")
