"""ImageNet initialisation from timm's Swin checkpoints, checked against timm's own SwinTransformer."""
from __future__ import annotations

import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import semask
from semask.hub.timm_init import default_imagenet_source, load_imagenet_backbone, timm_swin_to_semask
from _fake_hub import add_to_fake_hub

TIMM_TINY = "swin_tiny_patch4_window7_224"


def _timm_key(ours: str) -> str:
    """Our (official) key -> timm >= 0.9's: PatchMerging moves from the end of stage i to the start of i+1."""
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", ours)


@pytest.fixture(scope="module")
def timm_tiny(tmp_path_factory):
    """timm's Swin-T with random weights (always_partition: keep the shift on the 7x7 last stage, as the
    official code does) and its state dict saved in timm's exact layout."""
    torch.manual_seed(0)
    model = timm.create_model(TIMM_TINY, pretrained=False, always_partition=True).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file(state, str(path))
    return model, state, path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_default_sources_are_timm_hub_repos():
    expect = {"semask_swin_tiny": "timm/swin_tiny_patch4_window7_224.ms_in1k",
              "semask_swin_small": "timm/swin_small_patch4_window7_224.ms_in1k",
              "semask_swin_base": "timm/swin_base_patch4_window12_384.ms_in22k",
              "semask_swin_large": "timm/swin_large_patch4_window12_384.ms_in22k"}
    for name, repo in expect.items():
        with torch.device("meta"):
            bb = semask.create_model(name)
        assert default_imagenet_source(bb) == f"hf-hub:{repo}"


def test_imagenet_init_equals_timm_features(timm_tiny, hub, caplog):
    tmodel, state, path = timm_tiny
    add_to_fake_hub(hub, "timm/swin_tiny_patch4_window7_224.ms_in1k", {"model.safetensors": path})
    with caplog.at_level(logging.INFO, logger="semask.hub"):
        bb = semask.create_model("semask_swin_tiny", semantic_layers=False, pretrained_backbone=True,
                                 drop_path_rate=0.0).eval()
    # every stored trunk tensor is loaded exactly, under the remapped key
    ours = bb.state_dict()
    loaded = [k for k in ours if not k.startswith("norm")]
    assert len(loaded) == len(state) - 4  # all but head.fc.{weight,bias}, norm.{weight,bias}
    for k in loaded:
        assert torch.equal(ours[k], state[_timm_key(k)]), k
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "loaded 169 tensors" in msg and "norm0.weight" in msg and "head.fc.weight" in msg
    # same stage outputs as timm's own Swin (input 224 = 32 x window: no padding anywhere)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    stage_out = {}
    for i, stage in enumerate(bb.layers):
        stage.register_forward_hook(lambda m, inp, out, i=i: stage_out.__setitem__(i, out[0]))
    with torch.no_grad():
        ref = tmodel.forward_intermediates(x, intermediates_only=True)
        feats, priors = bb(x)
    assert priors == []
    for i in range(4):
        b, c, h, w = ref[i].shape
        got = stage_out[i].transpose(1, 2).reshape(b, c, h, w)
        torch.testing.assert_close(got, ref[i], atol=2e-5, rtol=1e-5)
        # norm_i is at its init (1, 0): the feature is LayerNorm of timm's stage output
        torch.testing.assert_close(feats[i], F.layer_norm(ref[i].permute(0, 2, 3, 1), (c,)).permute(0, 3, 1, 2),
                                   atol=1e-4, rtol=1e-4)
    # timm's factory: a bare SeMask backbone's pretrained=True is the ImageNet init (features_only too)
    tf = timm.create_model("semask_swin_tiny", pretrained=True, features_only=True, semantic_layers=False).eval()
    with torch.no_grad():
        for got, want in zip(tf(x), feats):
            assert torch.equal(got, want)


def test_imagenet_init_keeps_semantic_layers_norms_and_heads(tmp_path):
    state = _small_timm_state()
    path = tmp_path / "small.safetensors"
    save_file(state, str(path))
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", num_classes=5, embed_dim=16, depths=(1, 1, 1, 1),
                                num_heads=(1, 1, 2, 2), fpn_channels=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_imagenet_backbone(model, path)
    after = model.state_dict()
    for k, v in after.items():
        rel = k[len("backbone."):]
        if k.startswith("backbone.") and rel in report["loaded"]:
            assert torch.equal(v, state[_timm_key(rel)]), k
        else:  # semantic layers (gamma 0), norm0..3, decode head
            assert torch.equal(v, before[k]), k
    kept = set(report["not_loaded"])
    assert {f"norm{i}.weight" for i in range(4)} <= kept
    assert all(".semantic_layer." in k or k.startswith("norm") for k in kept)
    assert len(kept) == 4 * 11 + 8  # per stage: norm1 (2), q, k, v, res (8), gamma; plus norm0..3
    assert all(after[f"backbone.layers.{i}.semantic_layer.class_injection.0.gamma"].item() == 0 for i in range(4))


def _small_timm_state(seed: int = 0):
    torch.manual_seed(seed)
    m = timm.create_model(TIMM_TINY, pretrained=False, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def test_window_in_chans_and_official_layout(tmp_path):
    state = _small_timm_state()
    kw = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=12, in_chans=4)
    bb = semask.create_model("semask_swin_tiny", **kw)
    mapped, ignored, notes = timm_swin_to_semask(state, bb)
    assert sorted(ignored) == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    old = state["layers.2.blocks.0.attn.relative_position_bias_table"]  # (13*13, 2)
    expect = F.interpolate(old.t().reshape(1, 2, 13, 13), size=(23, 23), mode="bicubic", align_corners=False)
    torch.testing.assert_close(mapped["layers.2.blocks.0.attn.relative_position_bias_table"],
                               expect.reshape(2, -1).t(), atol=1e-6, rtol=0)
    w = state["patch_embed.proj.weight"]
    torch.testing.assert_close(mapped["patch_embed.proj.weight"], torch.cat([w, w[:, :1]], 1) * 3 / 4)
    assert any("window 7 -> 12" in n for n in notes) and any("in_chans 3 -> 4" in n for n in notes)
    # the official / timm < 0.9 layout (downsample at the end of stage i, with buffers) maps the same
    official = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
                for k, v in state.items()}
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    mapped_official, _, _ = timm_swin_to_semask(official, bb)
    assert mapped_official.keys() == mapped.keys()
    assert all(torch.equal(mapped_official[k], mapped[k]) for k in mapped)
    # through create_model with a local file
    save_file(state, str(tmp_path / "small.safetensors"))
    loaded = semask.create_model("semask_swin_tiny", pretrained_backbone=str(tmp_path / "small.safetensors"), **kw)
    for k, v in mapped.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert loaded.eval()(torch.randn(1, 4, 64, 64))[0][0].shape == (1, 16, 16, 16)


def test_wrong_size_checkpoint_loads_nothing(tmp_path):
    save_file(_small_timm_state(), str(tmp_path / "small.safetensors"))
    bb = semask.create_model("semask_swin_tiny", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing was loaded.*missing.*layers\.0\.blocks\.1"):
        load_imagenet_backbone(bb, tmp_path / "small.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())


def test_offline_missing_imagenet_weights(hub):
    with torch.device("meta"):
        bb = semask.create_model("semask_swin_base")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors of Hub repo timm/swin_base_patch4_window12_384"):
        load_imagenet_backbone(bb, True)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_imagenet_backbone(bb, "does/not/exist.safetensors")
