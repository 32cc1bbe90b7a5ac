"""The training step: the fused resize + cross-entropy equals resizing first (values and gradients),
on the official fixtures too, and a small training step stays under its recorded memory bound."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import semask
from semask.backbones import _base, swin as swin_module
from semask.losses import segmentation_ce, upsampled_ce
from semask.models import segmentor as segmentor_module
from semask.profiling import PeakMemory

from conftest import fpn_backbone_kwargs, load_parity


def _reference_ce(logits, labels, ignore_index=255, reduction="valid", align_corners=False):
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    return segmentation_ce(up, labels, ignore_index, reduction)


@pytest.mark.parametrize("shape, size, align_corners", [
    ((2, 150, 16, 16), (64, 64), False),   # x4, the stride-4 logits of a crop
    ((1, 7, 17, 23), (68, 92), False),     # x4, odd stride-4 map
    ((1, 5, 9, 9), (18, 18), False),       # x2
    ((1, 3, 3, 5), (120, 200), False),     # x40: many slabs of one input row
    ((1, 7, 17, 23), (67, 93), False),     # not an integer factor: whole-map resize
    ((2, 5, 9, 9), (33, 35), True),        # align_corners: whole-map resize
    ((1, 4, 8, 8), (8, 8), False),         # same size: no resize
])
@pytest.mark.parametrize("reduction", ["valid", "mmseg"])
@pytest.mark.parametrize("batch_slabs", [False, True])
def test_upsampled_ce_equals_resize_then_ce(shape, size, align_corners, reduction, batch_slabs, monkeypatch):
    monkeypatch.setattr("semask.losses._SLAB_BYTES", 4096)  # many slabs even at these small sizes
    if batch_slabs:  # the accelerators' slabs, which span the batch (the CPU's hold one image)
        monkeypatch.setattr("semask.losses._images_per_slab", lambda x: x.shape[0])
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    labels = torch.randint(0, shape[1], (shape[0], *size))
    labels[:, : size[0] // 3, : size[1] // 2] = 255
    ref_x = x.detach().clone().requires_grad_()
    ref = _reference_ce(ref_x, labels, reduction=reduction, align_corners=align_corners)
    ref.backward()
    out = upsampled_ce(x, labels, reduction=reduction, align_corners=align_corners)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)


def test_upsampled_ce_edge_cases():
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    ignored = torch.full((1, 16, 16), 255)
    loss = upsampled_ce(x, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    # (B, 1, H, W) labels and a scaled upstream gradient
    labels = torch.randint(0, 3, (1, 1, 16, 16))
    x.grad = None
    (2.5 * upsampled_ce(x, labels)).backward()
    ref_x = x.detach().clone().requires_grad_()
    (2.5 * _reference_ce(ref_x, labels.squeeze(1))).backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no gradient wanted: only the value
        torch.testing.assert_close(upsampled_ce(x, labels), _reference_ce(x, labels.squeeze(1)))
    with pytest.raises(ValueError, match="reduction"):
        upsampled_ce(x, labels, reduction="sum")


def test_upsampled_ce_bf16_logits_get_bf16_gradients():
    x = torch.randn(1, 5, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 5, (1, 32, 32))
    loss = upsampled_ce(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = _reference_ce(x.detach().float(), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def _plain_upsampled_ce(logits, labels, ignore_index=255, reduction="valid", align_corners=False):
    # the previous implementation: the full-size logits resized first, then the CE
    return _reference_ce(logits, labels.squeeze(1) if labels.ndim == 4 else labels, ignore_index, reduction,
                         align_corners)


@pytest.mark.parametrize("name", ["micro_windowed", "micro_global"])
def test_training_gradients_equal_the_previous_implementation_on_official_weights(name, monkeypatch):
    ref, meta = load_parity(f"fpn/{name}")
    model = semask.create_model("semask_fpn", backbone="semask_swin_tiny", fpn_channels=32,
                                loss_reduction="mmseg", **fpn_backbone_kwargs(meta))
    state = {k: v for k, v in ref.items() if not k.startswith("ref.")}
    model.load_state_dict(state, strict=False)
    model.eval()  # no dropout: both runs see the same network
    # a crop that is a multiple of 4 takes the fused path (the fixture's own size is odd)
    x = ref["ref.input"][..., :64, :92]
    labels = ref["ref.label"][..., :64, :92]

    def grads():
        model.zero_grad(set_to_none=True)
        losses = model(x, labels)
        losses["loss"].backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused_losses, fused = grads()
    # the previous implementation: full-size logits resized first, and contiguous NCHW maps out of the
    # backbone (the official layout) instead of channels-last views
    monkeypatch.setattr(segmentor_module, "upsampled_ce", _plain_upsampled_ce)
    monkeypatch.setattr(swin_module, "tokens_to_map", lambda t, hw: _base.tokens_to_map(t, hw).contiguous())
    assert all(f.is_contiguous() for f in model.backbone(x)[0])
    plain_losses, plain = grads()
    for key in ("loss_ce", "loss_cate"):
        torch.testing.assert_close(fused_losses[key], plain_losses[key], rtol=1e-5, atol=1e-6)
    assert fused.keys() == plain.keys() and len(fused) > 20
    for n in plain:
        torch.testing.assert_close(fused[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
    assert "logits" not in fused_losses


def _train_step_peak(model, x, labels) -> int:
    model.zero_grad(set_to_none=True)
    with PeakMemory(exclude=list(model.parameters()) + list(model.buffers())) as mem:
        model(x, labels)["loss"].backward()
    return mem.peak


def test_training_step_memory_bound(monkeypatch):
    """Regression guard on the activation memory of a small SeMask-T-shaped training step (the peak of
    tensor memory, counted the same way on any machine), and the fused loss's saving."""
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", num_classes=150, embed_dim=32, depths=(2, 2, 2, 2),
                                num_heads=(1, 2, 4, 8), fpn_channels=64).train()
    x = torch.randn(2, 3, 128, 128)
    labels = torch.randint(0, 150, (2, 128, 128))
    fused = _train_step_peak(model, x, labels)
    monkeypatch.setattr(segmentor_module, "upsampled_ce", _plain_upsampled_ce)
    plain = _train_step_peak(model, x, labels)
    # the full-size (B, K, H, W) resized logits and their log-softmax of both losses are no longer kept
    # (4 x 19.7 MB, of which at least 3 are alive at the plain step's peak)
    assert plain - fused > 3 * 2 * 150 * 128 * 128 * 4
    # recorded: 46.0 MiB (the bound leaves 20% for other torch versions' kernels)
    assert fused < 55 * 2**20, f"training step peak {fused / 2**20:.1f} MiB exceeds the recorded bound"


def test_peak_memory_counts_live_tensors():
    with PeakMemory() as mem:
        a = torch.ones(1000, 1000)
        b = torch.ones(1000, 1000)
        del a
        c = b * 2
        del c
    assert mem.peak == 8_000_000 and mem.current == 4_000_000
    with pytest.raises(ValueError, match="cpu and cuda"):
        PeakMemory("mps").__enter__()


def test_compiled_training_step_has_no_graph_break_and_equal_gradients():
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", num_classes=5, embed_dim=16, depths=(2, 2, 2, 2),
                                num_heads=(1, 2, 2, 4), fpn_channels=16).eval()  # eval: no dropout draws
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))

    def step(images, target):
        return model(images, target)["loss"]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(x, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager = grads(step)
    torch._dynamo.reset()
    # fullgraph=True: any graph break raises; aot_eager traces forward and backward without codegen
    compiled_loss, compiled = grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled.keys() == eager.keys()
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_training_gradients_follow_fp32():
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", num_classes=5, embed_dim=16, depths=(2, 2, 2, 2),
                                num_heads=(1, 2, 2, 4), fpn_channels=16).eval()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))

    def grads(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model(x, labels)
        losses["loss"].backward()
        return losses, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref_losses, ref = grads(False)
    losses, g = grads(True)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert losses["loss_ce"].dtype == torch.float32  # the losses themselves run in fp32
    torch.testing.assert_close(losses["loss"], ref_losses["loss"], rtol=2e-2, atol=0)
    assert F.cosine_similarity(g, ref, dim=0) > 0.99


@pytest.mark.parametrize("scale, rows", [(4, 9), (2, 5), (3, 1)])
def test_resize_rows_equal_the_whole_map(scale, rows):
    from semask.losses import resize_rows, row_slabs

    x = torch.randn(2, 3, rows, 7)
    whole = F.interpolate(x, size=(rows * scale, 7 * scale), mode="bilinear", align_corners=False)
    slabs = row_slabs(rows, row_bytes=100, budget=150)
    assert slabs[0][0] == 0 and slabs[-1][1] == rows
    parts = torch.cat([resize_rows(x, r0, r1, scale, 7 * scale) for r0, r1 in slabs], dim=2)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)


@pytest.mark.parametrize("size, padded", [((32, 32), (32, 32)), ((30, 45), (32, 48)), ((17, 19), (20, 20))])
def test_mask_former_semantic_inference_in_slabs(size, padded, monkeypatch):
    from semask.models import mask_former

    monkeypatch.setattr(mask_former, "_MASK_SLAB_BYTES", 256)  # one input row per slab
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 7, 5), torch.randn(2, 7, padded[0] // 4, padded[1] // 4)
    up = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)[..., : size[0], : size[1]]
    ref = torch.einsum("bqc,bqhw->bchw", logits.softmax(-1)[..., :-1], up.sigmoid())
    out = mask_former.SeMaskMaskFormer.semantic_inference(logits, masks, size, padded)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_channels_last_training_gives_the_same_gradients():
    torch.manual_seed(0)
    kwargs = dict(num_classes=7, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), fpn_channels=16)
    ref = semask.create_model("semask_swin_tiny_fpn", **kwargs).eval()
    cl = semask.create_model("semask_swin_tiny_fpn", **kwargs).eval()
    cl.load_state_dict(ref.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    x, labels = torch.randn(2, 3, 64, 96), torch.randint(0, 7, (2, 64, 96))
    a = ref(x, labels)
    a["loss"].backward()
    b = cl(x.contiguous(memory_format=torch.channels_last), labels)
    b["loss"].backward()
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), cl.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name, kwargs", [
    ("semask_swin_tiny", dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))),
    ("semask_mit_b0", dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))),
])
def test_backbone_maps_are_channels_last_views_and_logits_contiguous(name, kwargs):
    # the heads and the semantic decoder's resizes run channels-last on these maps (PyTorch's NCHW
    # bilinear resize and its adjoint are several times slower on CPUs); the logits users get are NCHW
    backbone = semask.create_model(name, num_classes=5, **kwargs)
    feats, priors = backbone(torch.randn(2, 3, 64, 96))
    for t in feats + priors:
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    seg = semask.create_model("semask_fpn", backbone=name, num_classes=5, fpn_channels=8, **kwargs).eval()
    assert seg(torch.randn(2, 3, 64, 96)).is_contiguous()
