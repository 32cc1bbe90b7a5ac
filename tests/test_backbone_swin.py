"""SeMask Swin backbone: official parity, parameter counts, odd sizes, batching, checkpointing, errors."""
from __future__ import annotations

import pytest
import torch

import semask
from semask.backbones.swin import SeMaskSwinTransformer
from semask.layers import SemanticAttention, SemanticLayer

from conftest import fpn_backbone_kwargs, load_parity

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["micro_windowed", "micro_global"])
def test_parity_with_official_backbone(parity_dir, name):
    sd, meta = load_parity(f"fpn/{name}")
    model = SeMaskSwinTransformer(**fpn_backbone_kwargs(meta)).eval()
    # our parameter names are the official ones; only the recomputable index buffer is dropped
    state = {k[len("backbone."):]: v for k, v in sd.items()
             if k.startswith("backbone.") and not k.endswith("relative_position_index")}
    model.load_state_dict(state, strict=True)
    acts = {}
    model.patch_embed.register_forward_hook(lambda m, i, o: acts.__setitem__("patch_embed", o))
    for s, stage in enumerate(model.layers):
        stage.semantic_layer.register_forward_hook(
            lambda m, i, o, s=s: acts.update({f"stage{s}.pre_sem": i[0], f"stage{s}.post_sem": o[1]}))
    with torch.no_grad():
        feats, priors = model(sd["ref.input"])
    torch.testing.assert_close(acts["patch_embed"], sd["ref.patch_embed"], **TOL)
    assert len(feats) == len(priors) == len(model.layers)
    for s in range(len(feats)):
        torch.testing.assert_close(acts[f"stage{s}.pre_sem"], sd[f"ref.stage{s}.pre_sem"], **TOL)
        torch.testing.assert_close(acts[f"stage{s}.post_sem"], sd[f"ref.stage{s}.post_sem"], **TOL)
        torch.testing.assert_close(feats[s], sd[f"ref.feat{s}"], **TOL)
        torch.testing.assert_close(priors[s], sd[f"ref.sem{s}"], **TOL)


@pytest.mark.parametrize("name,expected", [
    ("semask_swin_tiny", 29_526_382), ("semask_swin_small", 50_844_196),
    ("semask_swin_base", 90_251_366), ("semask_swin_large", 202_344_702),
])
def test_official_parameter_counts(name, expected):
    with torch.device("meta"):
        model = semask.create_model(name, num_classes=150)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 3) == round(expected / 1e6, 3)
    assert all(p.is_meta for p in model.parameters())


def test_plain_baseline_count_and_no_priors():
    with torch.device("meta"):
        plain = semask.create_model("semask_swin_tiny", semantic_layers=False)
    assert round(sum(p.numel() for p in plain.parameters()) / 1e6, 3) == 27.521


@pytest.mark.parametrize("hw", [(1, 1), (7, 13), (67, 93), (225, 225)])
def test_odd_sizes(tiny_swin_kwargs, hw):
    model = SeMaskSwinTransformer(**tiny_swin_kwargs, sem_global=(False, True, False, True)).eval()
    with torch.no_grad():
        feats, priors = model(torch.randn(1, 3, *hw))
    h, w = -(-hw[0] // 4), -(-hw[1] // 4)
    for i, (f, p) in enumerate(zip(feats, priors)):
        assert f.shape == (1, 16 * 2 ** i, h, w) and p.shape == (1, 5, h, w)
        assert torch.isfinite(f).all() and torch.isfinite(p).all()
        h, w = (h + 1) // 2, (w + 1) // 2


def test_frozen_stages(tiny_swin_kwargs):
    model = SeMaskSwinTransformer(**tiny_swin_kwargs, frozen_stages=2).train()
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
    assert not model.layers[0].training and model.layers[1].training


def test_out_indices_contract(tiny_swin_kwargs):
    model = SeMaskSwinTransformer(**tiny_swin_kwargs, out_indices=(-1, 1)).eval()
    assert model.out_indices == (1, 3)
    feats, priors = model(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [32, 128] and len(priors) == 2
    with pytest.raises(ValueError, match="out_indices"):
        SeMaskSwinTransformer(**tiny_swin_kwargs, out_indices=(0, 4))
    with pytest.raises(ValueError, match="duplicates"):
        SeMaskSwinTransformer(**tiny_swin_kwargs, out_indices=(1, 1))


def test_strict_constructor_and_output_stride():
    with pytest.raises(TypeError):
        semask.create_model("semask_swin_tiny", not_an_arg=1)
    with pytest.raises(ValueError, match="output_stride"):
        semask.create_model("semask_swin_tiny", output_stride=16)
    with pytest.raises(ValueError, match="Unknown model"):
        semask.create_model("semask_swin_tinyy")


@pytest.mark.parametrize("x,match", [
    (torch.randn(3, 32, 32), "4-D"),
    (torch.randn(1, 4, 32, 32), "3 input channels"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
])
def test_bad_input_errors(tiny_swin_kwargs, x, match):
    model = SeMaskSwinTransformer(**tiny_swin_kwargs)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_semantic_attention_standalone():
    torch.manual_seed(0)
    blk = SemanticAttention(dim=8, num_classes=3).eval()
    blk.gamma.data.fill_(0.5)
    x = torch.randn(2, 10, 8)
    prior, y = blk(x)
    q, k, v = blk.mlp_cls_q(x), blk.mlp_cls_k(x), blk.mlp_v(x)
    ref = x + 0.5 * blk.mlp_res(torch.softmax(q @ k.transpose(1, 2), -1) @ v)  # unscaled softmax
    torch.testing.assert_close(prior, q)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)


def test_semantic_layer_windowed_equals_per_window_global():
    torch.manual_seed(0)
    win = SemanticLayer(8, 3, window_size=4, global_attn=False).eval()
    glob = SemanticLayer(8, 3, global_attn=True).eval()
    glob.load_state_dict(win.state_dict())
    for layer in (win, glob):
        layer.class_injection[0].gamma.data.fill_(1.0)
    x = torch.randn(1, 8 * 8, 8)
    prior, y = win(x, (8, 8))
    # top-left 4x4 window computed globally on its own
    tl = x.view(1, 8, 8, 8)[:, :4, :4].reshape(1, 16, 8)
    p_tl, y_tl = glob(tl, (4, 4))
    torch.testing.assert_close(y.view(1, 8, 8, 8)[:, :4, :4].reshape(1, 16, 8), y_tl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(prior.view(1, 8, 8, 3)[:, :4, :4].reshape(1, 16, 3), p_tl, atol=1e-6, rtol=1e-6)


def test_train_after_inference_mode(tiny_swin_kwargs):
    # nothing built under inference_mode (indices, masks) may leak into a later backward pass
    model = SeMaskSwinTransformer(**tiny_swin_kwargs)
    x = torch.randn(1, 3, 44, 60)
    with torch.inference_mode():
        model.eval()(x)
    feats, priors = model.train()(x)
    sum(f.sum() for f in feats + priors).backward()
    assert model.patch_embed.proj.weight.grad is not None
