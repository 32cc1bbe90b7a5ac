"""SeMask MiT + SegFormer head: exact reference against transformers' SegFormer, checkpoint mapping,
pretrained loading, parameter counts, timm / smp interop, training."""
from __future__ import annotations

import re

import pytest
import torch

import semask
from semask.backbones.mit import SeMaskMiT, mit_checkpoint_filter_fn, segformer_checkpoint_filter_fn

transformers = pytest.importorskip("transformers")
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("single_thread")
# a mit-b0-like config with tiny widths (uneven depths and every sr ratio exercised)
TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1))
HF_TINY = dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], depths=[1, 2, 1, 1],
               sr_ratios=[8, 4, 2, 1], decoder_hidden_size=16, num_labels=5)

# transformers 5 names -> the names in the Hub files (transformers < 5), written independently of
# semask's mapping; test_legacy_names_are_the_hub_layout checks them against transformers' own loader
_TO_LEGACY = [
    (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.", r"segformer.encoder.block.\1.\2."),
    (r"^segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"attention\.q_proj", "attention.self.query"), (r"attention\.k_proj", "attention.self.key"),
    (r"attention\.v_proj", "attention.self.value"),
    (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
    (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
    (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "mlp.dense1"), (r"mlp\.fc2", "mlp.dense2"),
    (r"layernorm_before", "layer_norm_1"), (r"layernorm_after", "layer_norm_2"),
    (r"decode_head\.linear_projections", "decode_head.linear_c"),
]


def _legacy(state):
    out = {}
    for k, v in state.items():
        for pattern, repl in _TO_LEGACY:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def reference():
    """A random SegformerForSemanticSegmentation with non-trivial weights and BN statistics."""
    torch.manual_seed(0)
    ref = SegformerForSemanticSegmentation(SegformerConfig(**HF_TINY)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        for name, b in ref.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    return ref


def _tiny_mit(**kw) -> SeMaskMiT:
    return SeMaskMiT(num_classes=5, **{**TINY, **kw})


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_mit_equals_segformer_encoder(reference, layout):
    state = {f"segformer.{k}": v for k, v in reference.segformer.state_dict().items()}
    if layout == "hub":  # nvidia/mit-b* files: legacy names plus an ImageNet classifier
        state = _legacy(state)
        state["classifier.weight"] = torch.zeros(1000, 32)
    model = _tiny_mit(semantic_layers=False).eval()
    model.load_state_dict(mit_checkpoint_filter_fn(state, model), strict=True)
    x = torch.randn(2, 3, 67, 45)  # odd sizes: ceil arithmetic of the overlapping embeddings
    with torch.no_grad():
        ref = reference.segformer(pixel_values=x, output_hidden_states=True).hidden_states
        feats, priors = model(x)
    assert priors == [] and len(feats) == 4
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, **TOL)


def test_legacy_names_are_the_hub_layout(reference, tmp_path):
    # transformers' own loader renames Hub-layout keys; loading our legacy dict must leave nothing out
    reference.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    legacy = _legacy({f"segformer.{k}": v.contiguous() for k, v in reference.segformer.state_dict().items()})
    assert any(".attention.self.sr." in k for k in legacy) and any("encoder.block.1.1." in k for k in legacy)
    save_file(legacy, str(tmp_path / "model.safetensors"))
    loaded, info = SegformerModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, reference.segformer.state_dict()[k], atol=0, rtol=0)


def test_segformer_segmentor_equals_transformers(reference):
    model = semask.create_model("semask_mit_b0_segformer", num_classes=5, decoder_channels=16,
                                semantic_layers=False, **TINY).eval()
    model.load_state_dict(segformer_checkpoint_filter_fn(_legacy(reference.state_dict()), model), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = reference(pixel_values=x).logits
        out = model.forward_all(x)
    assert out["head_sem"] is None
    torch.testing.assert_close(out["head_seg"], ref, **TOL)


def test_pretrained_machinery_loads_hub_checkpoint(reference, tmp_path):
    """``pretrained_backbone=`` / timm's ``pretrained=True`` go through mit_checkpoint_filter_fn;
    the semantic layers keep their init (gamma 0) and the MiT weights are SegFormer's."""
    import timm
    from safetensors.torch import save_file

    legacy = _legacy({f"segformer.{k}": v.contiguous() for k, v in reference.segformer.state_dict().items()})
    legacy["classifier.weight"] = torch.zeros(1000, 32)
    path = tmp_path / "model.safetensors"
    save_file(legacy, str(path))
    seg = semask.create_model("semask_mit_b0_segformer", num_classes=5, decoder_channels=16,
                              pretrained_backbone=str(path), **TINY).eval()
    bb = timm.create_model("semask_mit_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                           num_classes=5, **TINY).eval()
    for model in (seg.backbone, bb):
        sem = [m for m in model.modules() if isinstance(m, semask.SemanticAttention)]
        assert len(sem) == 4 and all(m.gamma.item() == 0.0 for m in sem)
        torch.testing.assert_close(model.stages[1].blocks[1].attn.kv.weight,
                                   torch.cat([reference.segformer.stages[1].blocks[1].attention.k_proj.weight,
                                              reference.segformer.stages[1].blocks[1].attention.v_proj.weight]))
    # with gamma = 0 the only change from SegFormer is the semantic layer's LayerNorm before each stage
    # norm; with identity affine params LN(LN(x)) == LN(x) up to eps, so stage features stay SegFormer's
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = reference.segformer(pixel_values=x, output_hidden_states=True).hidden_states
        feats, priors = bb(x)
    assert [p.shape[1] for p in priors] == [5] * 4
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, atol=2e-3, rtol=2e-3)
    wrong = {k: v for k, v in legacy.items() if "encoder.block.1.1." not in k}
    with pytest.raises(ValueError, match="do not fit this MiT backbone.*Missing"):
        timm.create_model("semask_mit_b0", pretrained=True, pretrained_cfg_overlay=dict(state_dict=wrong),
                          num_classes=5, **TINY)


_SIZES = {0: ([32, 64, 160, 256], [2, 2, 2, 2], 256), 1: ([64, 128, 320, 512], [2, 2, 2, 2], 256),
          2: ([64, 128, 320, 512], [3, 4, 6, 3], 768), 3: ([64, 128, 320, 512], [3, 4, 18, 3], 768),
          4: ([64, 128, 320, 512], [3, 8, 27, 3], 768), 5: ([64, 128, 320, 512], [3, 6, 40, 3], 768)}


@pytest.mark.parametrize("b", range(6))
def test_parameter_counts_match_segformer(b):
    dims, depths, channels = _SIZES[b]

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        ref = SegformerForSemanticSegmentation(SegformerConfig(hidden_sizes=dims, depths=depths, num_labels=150,
                                                               decoder_hidden_size=channels))
        plain = semask.create_model(f"semask_mit_b{b}_segformer", num_classes=150, semantic_layers=False)
        ours = semask.create_model(f"semask_mit_b{b}_segformer", num_classes=150)
    assert count(plain) == count(ref)
    assert count(plain.backbone) == count(ref.segformer)
    # per stage: LayerNorm (2C), q and k (C -> 150), v and res (C -> C), gamma
    sem = sum(2 * c + 2 * (c * 150 + 150) + 2 * (c * c + c) + 1 for c in dims)
    assert count(ours) - count(plain) == sem


def test_semantic_outputs_shapes_and_gradients():
    model = _tiny_mit(sem_global=(False, True, False, True), sem_window_size=4).train()
    for p in model.parameters():
        if p.numel() == 1:
            p.data.fill_(0.5)  # gamma: make the semantic branch matter
    x = torch.randn(2, 3, 37, 53, requires_grad=True)
    feats, priors = model(x)
    h, w = 10, 14
    for i, (f, p) in enumerate(zip(feats, priors)):
        assert f.shape == (2, TINY["embed_dims"][i], h, w) and p.shape == (2, 5, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    (sum(f.square().mean() for f in feats) + sum(p.mean() for p in priors)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    gammas = [m.gamma.grad for m in model.modules() if isinstance(m, semask.SemanticAttention)]
    assert all(g is not None and g.abs() > 0 for g in gammas)


def test_semantic_layer_feeds_next_stage():
    model = _tiny_mit().eval()
    seen = {}
    model.stages[0].semantic_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("sem0", o[1]))
    model.stages[1].register_forward_hook(lambda m, i, o: seen.__setitem__("in1", i[0]))
    with torch.no_grad():
        feats, _ = model(torch.randn(1, 3, 32, 32))
    stage0 = model.stages[0]
    expected = stage0.norm(seen["sem0"]).transpose(1, 2).reshape(feats[0].shape)
    torch.testing.assert_close(seen["in1"], expected, atol=0, rtol=0)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = semask.create_model("semask_mit_b0_segformer", num_classes=3, decoder_channels=16, **TINY).train()
    x = torch.randn(2, 3, 32, 32)
    y = (torch.arange(32)[None, :, None] // 11).expand(2, 32, 32).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model(x, y)
        assert set(out) >= {"loss", "loss_ce", "loss_cate"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.85 * losses[0]


def test_reset_classifier_uses_conv_seg():
    model = semask.create_model("semask_mit_b0_segformer", num_classes=3, decoder_channels=16, **TINY).eval()
    model.reset_classifier(6)
    out = model.forward_all(torch.randn(1, 3, 32, 32))
    assert out["logits"].shape == (1, 6, 32, 32) and out["head_sem"].shape[1] == 6


def test_errors():
    with pytest.raises(ValueError, match="one entry per stage"):
        SeMaskMiT(embed_dims=(8, 16), **{k: v for k, v in TINY.items() if k != "embed_dims"})
    with pytest.raises(ValueError, match="input channels"):
        _tiny_mit()(torch.randn(1, 4, 32, 32))


def test_pretrained_true_fetches_nvidia_mit_from_the_hub(reference, monkeypatch):
    """``pretrained=True`` asks the Hub for nvidia/mit-b0 (network stubbed: semask's own safe Hub
    reader, which timm's loader never replaces) and maps its keys."""
    import timm

    import semask.backbones.mit as mit

    requested = []
    legacy = _legacy({f"segformer.{k}": v for k, v in reference.segformer.state_dict().items()})

    def fake_hub(model_id, *args, **kwargs):
        requested.append(model_id)
        return model_id, dict(legacy)

    monkeypatch.setattr(mit, "read_hub_weights", fake_hub)
    model = timm.create_model("semask_mit_b0", pretrained=True, num_classes=5, **TINY)
    assert requested == ["nvidia/mit-b0"]
    torch.testing.assert_close(model.stages[3].norm.weight, reference.segformer.stages[3].layer_norm.weight)


def test_load_mit_pretrained_sources(reference, tmp_path, monkeypatch):
    """Folder with a .bin (read weights_only), hf-hub ids, and the errors of load_mit_pretrained."""
    import semask.backbones.mit as mit
    from semask.backbones.mit import load_mit_pretrained

    legacy = _legacy({f"segformer.{k}": v for k, v in reference.segformer.state_dict().items()})
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    seg = semask.create_model("semask_mit_b0_segformer", num_classes=5, decoder_channels=16, **TINY)
    bb = load_mit_pretrained(seg, tmp_path)
    assert bb is seg.backbone
    torch.testing.assert_close(bb.stages[0].patch_embed.proj.weight,
                               reference.segformer.stages[0].patch_embeddings.proj.weight)
    requested = []
    monkeypatch.setattr(mit, "read_hub_weights",
                        lambda model_id, *a, **k: requested.append(model_id) or (model_id, dict(legacy)))
    load_mit_pretrained(_tiny_mit(), "hf-hub:someone/my-mit@v1")
    assert requested == ["hf-hub:someone/my-mit@v1"]
    with pytest.raises(ValueError, match="no published MiT weights"):
        load_mit_pretrained(_tiny_mit(), True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_mit_pretrained(_tiny_mit(), tmp_path / "empty")
    with pytest.raises(ValueError, match="no SeMask MiT"):
        load_mit_pretrained(torch.nn.Linear(2, 2), legacy)
