"""semask.wrap: SeMask semantic layers inside hierarchical timm backbones (ConvNeXt, PVT v2, Swin V2,
MaxViT, ...), the generic semask_fpn / semask_segformer models, timm interop and errors."""
from __future__ import annotations

import pytest
import timm
import torch

import semask
from semask.backbones.wrap import SeMaskWrapped, StageAdapter, list_wrappable_families, register_adapter


pytestmark = pytest.mark.usefixtures("single_thread")


# tiny members of each family (random weights), input 64x64
TINY = {
    "convnext_tiny": dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
    "pvt_v2_b0": dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
    "swinv2_tiny_window8_256": dict(img_size=64, window_size=4, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
    "maxvit_tiny_tf_224": dict(img_size=64, embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=16,
                               transformer_dim_head=8),
}


def _tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **TINY[name])


def _set_gamma(model: torch.nn.Module, value: float) -> None:
    for m in model.modules():
        if isinstance(m, semask.SemanticAttention):
            m.gamma.data.fill_(value)


@pytest.mark.parametrize("name", [
    "convnext_tiny", "pvt_v2_b0",
    pytest.param("swinv2_tiny_window8_256", marks=pytest.mark.slow),
    pytest.param("maxvit_tiny_tf_224", marks=pytest.mark.slow),
])
def test_full_size_forward_backward(name):
    """Default input size of the timm pretrained cfg, random weights, batch 1."""
    torch.manual_seed(0)
    bb = semask.wrap(name, num_classes=5)
    ref_info = timm.create_model(name, pretrained=False, features_only=True).feature_info
    size = timm.get_pretrained_cfg(name).input_size
    x = torch.randn(1, *size, requires_grad=True)
    feats, priors = bb(x)
    assert [f.shape[1] for f in feats] == ref_info.channels()[-4:]
    for f, p, r in zip(feats, priors, ref_info.reduction()[-4:]):
        assert f.shape[-2:] == p.shape[-2:] == (size[1] // r, size[2] // r)
        assert p.shape[:2] == (1, 5)
    (sum(f.mean() for f in feats) + sum(p.mean() for p in priors)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(TINY))
def test_identity_at_init_in_residual_mode(name):
    """sem_residual=True and gamma = 0: the semantic layers are the identity on the stream, so the
    wrapped features equal timm's own stage outputs (checks every layout conversion of the adapter)."""
    model = _tiny(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=4, intermediates_only=True)  # last 4 = the stages
        bb = semask.wrap(model, num_classes=3, sem_residual=True, out_norm=False, sem_window_size=4).eval()
        feats, priors = bb(x)
    assert len(feats) == len(ref) == 4
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    assert all(p.shape[:2] == (2, 3) for p in priors)


_QUICK_FAMILIES = ["resnet18", "regnety_002", "efficientformerv2_s0", "mambaout_femto", "edgenext_xx_small",
                   "efficientvit_b0", "hgnetv2_b0", "repvit_m1"]
_SLOW_FAMILIES = ["swin_tiny_patch4_window7_224", "focalnet_tiny_srf", "davit_tiny", "coatnet_0_rw_224", "fastvit_t8",
                  "poolformerv2_s12", "inception_next_tiny", "nextvit_small"]


@pytest.mark.parametrize("name", _QUICK_FAMILIES + [pytest.param(n, marks=pytest.mark.slow) for n in _SLOW_FAMILIES])
def test_more_families_identity_at_init(name):
    """Every other adapter row: full-size random model at its default input size, residual mode at
    gamma = 0 reproduces timm's stage outputs exactly."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=4, intermediates_only=True)
        feats, priors = semask.wrap(model, num_classes=3, sem_residual=True, out_norm=False).eval()(x)
    for f, r, p in zip(feats, ref, priors):
        torch.testing.assert_close(f, r, atol=1e-6, rtol=0)
        assert p.shape == (1, 3, *f.shape[-2:])


@pytest.mark.parametrize("name", list(TINY))
def test_reweighted_tokens_feed_next_stage(name):
    bb = semask.wrap(_tiny(name), num_classes=3, sem_window_size=4).eval()
    _set_gamma(bb, 0.7)
    seen = {}
    bb.semantic_layers[1].register_forward_hook(lambda m, i, o: seen.__setitem__("sem1", o[1]))
    bb.stages[2].register_forward_hook(lambda m, i, o: seen.__setitem__("in2", i[0]))
    with torch.no_grad():
        feats, _ = bb(torch.randn(1, 3, 64, 64))
    h, w = feats[1].shape[-2:]
    expected = seen["sem1"].view(1, h, w, -1)  # NHWC stream after the semantic layer
    got = seen["in2"] if seen["in2"].shape[-1] == expected.shape[-1] else seen["in2"].permute(0, 2, 3, 1)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("head", ["semask_fpn", "semask_segformer"])
def test_training_steps_lower_the_loss(name, head):
    torch.manual_seed(0)
    kw = dict(decoder_channels=16) if head == "semask_segformer" else dict(fpn_channels=16)
    model = semask.create_model(head, backbone=_tiny(name), num_classes=3, **kw).train()
    assert isinstance(model.backbone, SeMaskWrapped)
    x = torch.randn(2, 3, 64, 64)
    y = (torch.arange(64)[None, :, None] // 22).expand(2, 64, 64).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert "loss_cate" in out and model(x, y, return_logits=True)["logits"].shape == (2, 3, 64, 64)
    assert losses[-1] < 0.85 * losses[0], losses


def test_per_stage_options_and_reset_classes():
    bb = semask.wrap(_tiny("convnext_tiny"), num_classes=4, sem_global=(True, False, True, False), sem_window_size=3,
                     out_indices=(1, 3))
    assert [m.global_attn for m in bb.semantic_layers] == [True, False, True, False]
    assert bb.semantic_layers[1].window_size == 3
    assert [f["reduction"] for f in bb.feature_info] == [8, 32]
    assert semask.wrap(_tiny("convnext_tiny"), num_classes=4).sem_global == (False, False, True, True)
    bb.reset_classes(9)
    feats, priors = bb(torch.randn(1, 3, 64, 64))
    assert len(feats) == len(priors) == 2 and all(p.shape[1] == 9 for p in priors)
    assert bb.num_classes == 9 and bb.in_chans == 3
    with pytest.raises(ValueError, match="one entry per stage"):
        semask.wrap(_tiny("convnext_tiny"), num_classes=4, sem_global=(True, False))


def test_unused_timm_parts_are_removed():
    bb = semask.wrap(_tiny("convnext_tiny"), num_classes=3)
    feats, priors = bb(torch.randn(1, 3, 64, 64))
    (sum(f.sum() for f in feats) + sum(p.sum() for p in priors)).backward()
    no_grad = [n for n, p in bb.named_parameters() if p.grad is None]
    assert no_grad == []  # classifier head and final norm are gone (DDP needs every parameter used)


@pytest.mark.parametrize("name", ["convnext_tiny", "pvt_v2_b0"])
def test_timm_features_only_and_smp(name):
    fm = timm.create_model("semask_wrap", backbone=name, num_classes=3, features_only=True, out_indices=(1, 2, 3),
                           sem_residual=True, **TINY[name])
    assert isinstance(fm.model, SeMaskWrapped) and fm.model.sem_residual
    outs = fm(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == fm.feature_info.channels() == [16, 24, 32]
    assert fm.feature_info.reduction() == [8, 16, 32] and [o.shape[-1] for o in outs] == [8, 4, 2]
    smp = pytest.importorskip("segmentation_models_pytorch")
    net = smp.Unet("tu-semask_wrap", encoder_weights=None, classes=2, decoder_channels=(16,) * 5, backbone=name,
                   num_classes=3, **TINY[name])
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_generic_models_from_names():
    with torch.device("meta"):
        fpn = semask.create_model("semask_fpn", backbone="convnext_tiny", num_classes=150)
        seg = semask.create_model("semask_segformer", backbone="pvt_v2_b0", num_classes=19, sem_residual=True)
        mit = semask.create_model("semask_fpn", backbone="semask_mit_b0", num_classes=19)
        swin = semask.create_model("semask_segformer", backbone="semask_swin_tiny", num_classes=19)
    assert isinstance(fpn.backbone, SeMaskWrapped) and fpn.decode_head.in_channels == (96, 192, 384, 768)
    assert fpn.backbone.semantic_layers[0].class_injection[0].mlp_cls_q.out_features == 150
    assert seg.backbone.sem_residual and seg.decode_head.in_channels == (32, 64, 160, 256)
    assert type(mit.backbone).__name__ == "SeMaskMiT" and mit.decode_head.conv_seg.out_channels == 19
    assert type(swin.backbone).__name__ == "SeMaskSwinTransformer" and swin.decode_head.in_channels[-1] == 768
    assert fpn.semask_config["model_kwargs"] == {"backbone": "convnext_tiny"}


def test_errors():
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="plain ViT.*single stride-16"):
        semask.wrap(vit, num_classes=3)
    with pytest.raises(ValueError, match="no stage adapter"):
        semask.wrap(torch.nn.Conv2d(3, 8, 3), num_classes=3)
    with pytest.raises(ValueError, match="Unknown model"):
        semask.wrap("not_a_timm_model", num_classes=3)
    with pytest.raises(ValueError, match="already has semantic layers"):
        semask.wrap(semask.wrap(_tiny("convnext_tiny"), num_classes=3), num_classes=3)
    with pytest.raises(ValueError, match="classes"):
        semask.create_model("semask_fpn", backbone=semask.wrap(_tiny("convnext_tiny"), num_classes=3), num_classes=5)
    with pytest.raises(ValueError, match="input channels"):
        semask.wrap(_tiny("convnext_tiny"), num_classes=3)(torch.randn(1, 1, 64, 64))
    assert {"ConvNeXt", "PyramidVisionTransformerV2", "SwinTransformerV2", "MaxxVit"} <= set(list_wrappable_families())


def test_register_adapter_for_new_family():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 8, 4, 4)
            self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.Conv2d(8, 16, 2, 2)])
            self.feature_info = [dict(num_chs=8, reduction=4, module="blocks.0"),
                                 dict(num_chs=16, reduction=8, module="blocks.1")]

    register_adapter("Toy", StageAdapter(stem=("embed",), stages="blocks"))
    feats, priors = semask.wrap(Toy(), num_classes=2)(torch.randn(1, 3, 32, 32))
    assert [f.shape for f in feats] == [(1, 8, 8, 8), (1, 16, 4, 4)] and priors[1].shape == (1, 2, 4, 4)


def test_save_and_reload_roundtrip(tmp_path):
    from semask.hub import save_pretrained

    model = semask.create_model("semask_fpn", backbone="convnext_tiny", num_classes=4, fpn_channels=16,
                                sem_residual=True, **TINY["convnext_tiny"]).eval()
    _set_gamma(model, 0.3)
    save_pretrained(model, tmp_path / "m")
    again = semask.create_model("semask_fpn", pretrained=str(tmp_path / "m")).eval()
    assert again.backbone.sem_residual
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
