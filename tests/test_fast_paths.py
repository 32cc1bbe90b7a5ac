"""CPU inference fast paths (chunked Swin blocks and semantic layers, row gathers, folded BatchNorm,
grouped FPN upsampling, cached fused weights) compute what the whole-tensor (training) path computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import semask
import semask.layers.cpu as cpu
import semask.layers.window as window
from semask.backbones.swin import SeMaskSwinTransformer, SwinBlock
from semask.decoders import FPNHead
from semask.layers import SemanticAttention, SemanticLayer, gather_rows

from conftest import fpn_backbone_kwargs, load_parity

TOL = dict(atol=1e-5, rtol=1e-5)


def _spy(monkeypatch, cls, name):
    calls = []
    orig = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        calls.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapped)
    return calls


def _reference(model, x):
    # autograd on: the whole-tensor path, the one training and export use
    with torch.enable_grad():
        return model(x)


@pytest.mark.parametrize("chunk", [49, 150, 245, 2048])  # 245: 5 windows, chunks cross images
def test_chunked_backbone_equals_reference_path(tiny_swin_kwargs, monkeypatch, chunk):
    monkeypatch.setattr(window, "TOKEN_CHUNK", chunk)
    torch.manual_seed(0)
    model = SeMaskSwinTransformer(**{**tiny_swin_kwargs, "window_size": 7},
                                  sem_global=(False, True, False, True)).eval()
    for p in model.parameters():  # gamma is 0 at init: make the semantic branch matter
        if p.numel() == 1:
            p.data.fill_(0.7)
    blocks = _spy(monkeypatch, SwinBlock, "_forward_chunked")
    layers = _spy(monkeypatch, SemanticLayer, "_attend_chunked")
    for shape in [(2, 3, 67, 93), (1, 3, 96, 96), (1, 3, 5, 9)]:
        x = torch.randn(*shape)
        ref_f, ref_p = _reference(model, x)
        n = len(blocks)
        with torch.no_grad():
            got_f, got_p = model(x)
        assert len(blocks) > n and layers  # the fast paths ran
        for a, b in zip(ref_f + ref_p, got_f + got_p):
            torch.testing.assert_close(b, a, **TOL)


def test_fast_path_only_in_eager_cpu_inference(tiny_swin_kwargs, monkeypatch):
    model = SeMaskSwinTransformer(**tiny_swin_kwargs).eval()
    blocks = _spy(monkeypatch, SwinBlock, "_forward_chunked")
    x = torch.randn(1, 3, 32, 32)
    _reference(model, x)
    with torch.no_grad():
        model.train()(x)  # dropout / drop-path active: the reference path
    assert not blocks
    with torch.inference_mode():
        model.eval()(x)
    assert blocks


def test_parity_with_official_over_many_chunks(parity_dir, monkeypatch):
    monkeypatch.setattr(window, "TOKEN_CHUNK", 64)
    sd, meta = load_parity("fpn/micro_windowed")
    model = SeMaskSwinTransformer(**fpn_backbone_kwargs(meta)).eval()
    model.load_state_dict({k[len("backbone."):]: v for k, v in sd.items()
                           if k.startswith("backbone.") and not k.endswith("relative_position_index")})
    with torch.no_grad():
        feats, priors = model(sd["ref.input"])
    for s in range(len(feats)):
        torch.testing.assert_close(feats[s], sd[f"ref.feat{s}"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(priors[s], sd[f"ref.sem{s}"], atol=1e-4, rtol=1e-4)


def test_gather_rows_equals_index_select():
    idx = torch.tensor([3, 0, 0, 5, 1])
    for x in [torch.randn(1, 6, 4), torch.randn(3, 6, 4), torch.randn(3, 4, 6).transpose(1, 2)]:
        with torch.no_grad():
            assert torch.equal(gather_rows(x, idx), x.index_select(1, idx))
    x = torch.randn(2, 6, 4, requires_grad=True)
    gather_rows(x, idx).sum().backward()  # differentiable when autograd is on
    assert x.grad[:, 0].eq(2).all()


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


@pytest.mark.parametrize("hw", [(64, 64), (37, 53)])  # 37x53: the levels reach different pre-resize sizes
def test_fpn_head_inference_path(hw):
    torch.manual_seed(0)
    head = FPNHead([8, 16, 32, 64], num_classes=5, channels=16).eval()
    _randomise_bn(head)
    h, w = hw
    feats = [torch.randn(2, c, -(-h // s), -(-w // s)) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])]
    ref = _reference(head, feats)
    with torch.no_grad():
        got = head(feats)
    torch.testing.assert_close(got, ref, **TOL)
    # the folded-BatchNorm cache follows in-place changes of the statistics
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(3.0)
        changed = head(feats)
    assert not torch.allclose(changed, got)
    torch.testing.assert_close(changed, _reference(head, feats), **TOL)


def test_fused_qkv_cache_follows_weight_updates():
    torch.manual_seed(0)
    attn = SemanticAttention(8, 5).eval()
    attn.gamma.data.fill_(1.0)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        q0, y0 = attn(x)
        attn.mlp_v.weight.add_(0.5)  # e.g. an optimizer step or load_state_dict
        q1, y1 = attn(x)
    assert torch.equal(q0, q1) and not torch.allclose(y0, y1)
    q_ref, y_ref = _reference(attn, x)
    torch.testing.assert_close(y1, y_ref, **TOL)
    attn.load_state_dict({k: torch.zeros_like(v) for k, v in attn.state_dict().items()})
    with torch.no_grad():
        assert attn(x)[0].abs().max() == 0


@pytest.mark.parametrize("hw", [(64, 96), (97, 131)])
def test_segmentor_inference_equals_training_path(tiny_swin_kwargs, monkeypatch, hw):
    monkeypatch.setattr(window, "TOKEN_CHUNK", 100)
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", **tiny_swin_kwargs, fpn_channels=16).eval()
    _randomise_bn(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.7)
    x = torch.randn(2, 3, *hw)
    ref = _reference(model, x)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, ref, **TOL)


def test_batch_is_chunked_as_one_sequence(tiny_swin_kwargs, monkeypatch):
    # small images in a large batch: the chunks run over batch x windows, not image by image (a
    # per-image loop made batch 32 of 64x64 images ~1.4x slower than the whole-tensor path)
    from semask.backbones.swin import WindowAttention

    model = SeMaskSwinTransformer(**tiny_swin_kwargs).eval()
    calls = _spy(monkeypatch, WindowAttention, "attend")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        single = len(calls)
        model(torch.randn(8, 3, 32, 32))
    assert single == sum(tiny_swin_kwargs["depths"]) and len(calls) == 2 * single


def test_window_bias_cache_follows_table_and_size(tiny_swin_kwargs):
    torch.manual_seed(0)
    model = SeMaskSwinTransformer(**tiny_swin_kwargs).eval()
    for h, w in [(40, 60), (60, 40), (40, 60)]:  # same window count, different shift masks
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got = model(x)
        for a, b in zip(_reference(model, x)[0], got[0]):
            torch.testing.assert_close(b, a, **TOL)
    with torch.no_grad():
        for blk in model.layers[0].blocks:
            blk.attn.relative_position_bias_table.add_(1.0)
        got = model(x)
    for a, b in zip(_reference(model, x)[0], got[0]):
        torch.testing.assert_close(b, a, **TOL)


def test_window_bias_built_once_per_size(tiny_swin_kwargs, monkeypatch):
    # the stage hands each block a fresh view of the cached shift mask: the combined bias + mask must
    # still come from the cache (it was rebuilt in every forward, ~1% of the Swin-T FPN time)
    from semask.backbones.swin import WindowAttention

    monkeypatch.setattr(window, "_CACHE", {})  # not cleared half-way by earlier tests' sizes
    model = SeMaskSwinTransformer(**tiny_swin_kwargs).eval()
    built = _spy(monkeypatch, WindowAttention, "relative_position_bias")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        model(x)
        first = len(built)
        model(x)
    assert first == sum(tiny_swin_kwargs["depths"]) and len(built) == first


@pytest.fixture(params=[(True, True), (True, False), (False, False)], ids=["onednn-packed", "onednn", "plain"])
def onednn(request, monkeypatch):
    fused, packed = request.param
    if fused and not cpu._ONEDNN_LINEAR or packed and not cpu._CAN_PACK:
        pytest.skip("this torch build has no oneDNN fused linear / weight packing")
    monkeypatch.setattr(cpu, "_ONEDNN_LINEAR", fused)
    monkeypatch.setattr(cpu, "PACK_WEIGHTS", packed)
    return fused


def test_packed_weight_follows_the_weight_and_dies_with_it():
    import gc

    from semask.layers import _derived

    if not cpu._CAN_PACK:
        pytest.skip("this torch build has no oneDNN weight packing")
    torch.manual_seed(0)
    x, w = torch.randn(64, 24), torch.randn(32, 24)
    slot = (id(w), "onednn")
    with torch.no_grad():
        torch.testing.assert_close(cpu.linear(x, w), F.linear(x, w), **TOL)
        entry = _derived._CACHE[slot]
        assert entry[0]() is w and entry[3].is_mkldnn  # the packed copy was used
        w.mul_(-2)  # in place (an optimizer step, load_state_dict): the packed copy is rebuilt
        torch.testing.assert_close(cpu.linear(x, w), F.linear(x, w), **TOL)
        w.data = torch.randn(32, 24)  # replaced (what .to() does)
        torch.testing.assert_close(cpu.linear(x, w), F.linear(x, w), **TOL)
    assert _derived._CACHE[slot][3] is not entry[3]
    entry = None
    ref = _derived._CACHE[slot][0]
    del w
    gc.collect()
    assert ref() is None and (slot not in _derived._CACHE or _derived._CACHE[slot][0] is not ref)


def test_weight_packing_can_be_switched_off(monkeypatch):
    from semask.layers import _derived, set_weight_packing

    if not cpu._CAN_PACK:
        pytest.skip("this torch build has no oneDNN weight packing")
    monkeypatch.setattr(cpu, "PACK_WEIGHTS", True)  # restored after the test
    x, w = torch.randn(64, 24), torch.randn(32, 24)
    slot = (id(w), "onednn")
    with torch.no_grad():
        cpu.linear(x, w)
        assert slot in _derived._CACHE
        set_weight_packing(False)
        assert slot not in _derived._CACHE  # the copies are freed
        torch.testing.assert_close(cpu.linear(x, w), F.linear(x, w), **TOL)
        assert slot not in _derived._CACHE


def test_models_copy_and_pickle_without_their_inference_caches(tiny_swin_kwargs):
    import copy
    import io

    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", **tiny_swin_kwargs, fpn_channels=16).eval()
    x = torch.randn(1, 3, 64, 64)
    fresh = io.BytesIO()
    torch.save(model, fresh)
    with torch.no_grad():
        ref = model(x).clone()  # fills the caches: packed weights, fused qkv, folded BN, window bias
        clone = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        assert buf.tell() == fresh.tell()  # the caches are not pickled
        buf.seek(0)
        restored = torch.load(buf, weights_only=False)
        torch.testing.assert_close(clone(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(restored(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("fusion", [{}, {"gelu": "none"}, {"gelu": "tanh"}, {"residual": True}])
def test_fused_linear_matches_torch(onednn, fusion):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 40)[:, :, :24]  # non-contiguous rows
    w, b = torch.randn(32, 24) * 0.2, torch.randn(32)
    ref = F.linear(x, w, b)
    res = torch.randn(3, 50, 32) if fusion.get("residual") else None
    if "gelu" in fusion:
        ref = F.gelu(ref, approximate=fusion["gelu"])
    if res is not None:
        ref = res + ref
    with torch.no_grad():
        got = cpu.linear(x, w, b, gelu=fusion.get("gelu"), residual=res)
        no_bias = cpu.linear(x, w)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(no_bias, F.linear(x, w), **TOL)
    with pytest.raises(ValueError, match="either gelu or residual"):
        cpu.linear(x, w, b, gelu="none", residual=ref)


def test_fused_linear_keeps_autograd_and_autocast():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(5, 4)
    y = cpu.linear(x, w, residual=torch.ones(5, 8))  # autograd on: the differentiable plain ops
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu.linear(x, w.detach()).dtype == torch.bfloat16  # autocast still applies


def test_mlp_residual_matches_module(onednn):
    from timm.layers import GluMlp, Mlp

    torch.manual_seed(0)
    x = torch.randn(2, 30, 16)
    # fused / called as they are (another activation, a gated subclass, dropout active in training)
    for mlp in [Mlp(16, 64).eval(), Mlp(16, 64, act_layer=torch.nn.ReLU).eval(), GluMlp(16, 64).eval(),
                Mlp(16, 64, drop=0.5).train()]:
        torch.manual_seed(1)
        with torch.no_grad():
            got = cpu.mlp_residual(mlp, x)
            torch.manual_seed(1)
            torch.testing.assert_close(got, x + mlp(x), **TOL)
            if not mlp.training:
                h = x * 2
                torch.testing.assert_close(cpu.mlp_residual(mlp, x, h), x + mlp(h), **TOL)
    mlp = Mlp(16, 64, act_layer=torch.nn.ReLU).eval()
    seen = []  # a module with hooks is called, so the hooks fire
    handle = mlp.fc1.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        cpu.mlp_residual(Mlp(16, 64).eval(), x)
        fused = Mlp(16, 64).eval()
        fused.fc2.register_forward_hook(lambda *a: seen.append(2))
        cpu.mlp_residual(fused, x)
        cpu.linear_module(mlp.fc1, x)
    handle.remove()
    assert seen == [2, 1]


@pytest.mark.parametrize("shape,size,channels_last", [
    ((1, 40, 16, 16), (64, 64), False),  # the logits resize: x4, several channel groups
    ((2, 5, 7, 9), (21, 18), False),  # x3 / x2, batch 2
    ((1, 3, 5, 5), (5, 20), False),  # x1 on one axis
    ((2, 16, 8, 8), (16, 24), True),  # channels-last stays channels-last
    ((1, 4, 6, 6), (13, 12), False),  # not an integer factor: F.interpolate
])
def test_upsample_bilinear_matches_interpolate(shape, size, channels_last, monkeypatch):
    x = torch.randn(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    lerps = []
    real_lerp = torch.lerp
    monkeypatch.setattr(torch, "lerp", lambda *a, **k: lerps.append(1) or real_lerp(*a, **k))
    with torch.no_grad():
        got = cpu.upsample_bilinear(x, size)
    integer = size[0] % shape[2] == 0 and size[1] % shape[3] == 0
    assert bool(lerps) == integer  # the fast path ran exactly where it applies
    torch.testing.assert_close(got, ref, **TOL)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    lerps.clear()
    with torch.enable_grad():  # training: F.interpolate itself
        torch.testing.assert_close(cpu.upsample_bilinear(x, size), ref)
        assert cpu.upsample_bilinear(x, size, align_corners=True).shape == ref.shape
    assert not lerps


def _backbones(tiny_swin_kwargs):
    from semask.backbones.mit import SeMaskMiT

    yield SeMaskSwinTransformer(**tiny_swin_kwargs, sem_global=(False, True, False, True))
    yield SeMaskMiT(num_classes=5, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))
    yield semask.wrap("convnext_atto", num_classes=5, sem_window_size=4)


@pytest.mark.parametrize("grad", [False, True])
def test_backbones_skip_priors_on_request(tiny_swin_kwargs, grad):
    # the segmentor's inference needs no prior maps: every SeMask backbone can skip assembling them
    torch.manual_seed(0)
    x = torch.randn(1, 3, 45, 61)
    for bb in _backbones(tiny_swin_kwargs):
        bb.eval()
        with torch.set_grad_enabled(grad):
            feats, priors = bb(x)
            only, none = bb(x, with_priors=False)
        assert len(priors) == len(feats) and none == []
        for a, b in zip(feats, only):
            torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_segmentor_logits_do_not_depend_on_priors(tiny_swin_kwargs, monkeypatch):
    model = semask.create_model("semask_swin_tiny_fpn", **tiny_swin_kwargs, fpn_channels=16).eval()
    seen = []
    real = SeMaskSwinTransformer.forward

    def forward(self, x, with_priors=True):
        seen.append(with_priors)
        return real(self, x, with_priors)

    monkeypatch.setattr(SeMaskSwinTransformer, "forward", forward)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        ref = model.forward_all(x)["logits"]
    assert seen == [False, True]
    torch.testing.assert_close(logits, ref, atol=0, rtol=0)


def test_model_built_under_inference_mode_follows_in_place_reloads(tiny_swin_kwargs):
    # its parameters are inference tensors (no version counter): the inference caches must not serve
    # fused / packed / folded weights of the old values after load_state_dict
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = semask.create_model("semask_swin_tiny_fpn", **tiny_swin_kwargs, fpn_channels=16).eval()
        model(x)
        sd = {k: v * 1.5 + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(sd)
        got = model(x)
        fresh = semask.create_model("semask_swin_tiny_fpn", **tiny_swin_kwargs, fpn_channels=16).eval()
        fresh.load_state_dict(sd)
        torch.testing.assert_close(got, fresh(x), **TOL)
