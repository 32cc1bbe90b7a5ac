"""Contracts of the ecosystem around semask (issue #19): meta-device builds (accelerate / transformers),
timm's headless-model API and optimizer factory, torchvision v2 transforms, TorchScript / FX errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import timm
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.optim import create_optimizer_v2

import semask

TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
TINY_MIT = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1))
TINY_WRAP = dict(backbone="convnext_tiny", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))
TINY_TIMM_SWIN = dict(backbone="swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=16,
                      depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
TINY_D2 = dict(TINY_SWIN, num_classes=5, conv_dim=32, mask_dim=16, hidden_dim=32, num_queries=6, nheads=4,
               dim_feedforward=32, dec_layers=2, enc_layers=1)

# every registered backbone with a tiny architecture of its family (the default cfgs are per name)
BACKBONES = {
    **{f"semask_swin_{s}": TINY_SWIN for s in ("tiny", "small", "base", "large")},
    **{f"semask_mit_b{b}": TINY_MIT for b in range(6)},
    "semask_wrap": TINY_WRAP,
}

# one builder per family (backbones and segmentors)
FAMILIES = {
    "swin": lambda: semask.create_model("semask_swin_tiny", num_classes=5, **TINY_SWIN),
    "mit": lambda: semask.create_model("semask_mit_b0", num_classes=5, **TINY_MIT),
    "wrapped": lambda: semask.wrap(timm.create_model("swin_tiny_patch4_window7_224", **{
        k: v for k, v in TINY_TIMM_SWIN.items() if k != "backbone"}), num_classes=5),
    "fpn": lambda: semask.create_model("semask_swin_tiny_fpn", num_classes=5, fpn_channels=8, **TINY_SWIN),
    "segformer": lambda: semask.create_model("semask_mit_b0_segformer", num_classes=5, decoder_channels=16,
                                             **TINY_MIT),
    "wrapped_fpn": lambda: semask.create_model("semask_fpn", num_classes=5, fpn_channels=8, **TINY_TIMM_SWIN),
    "maskformer": lambda: semask.create_model("semask_swin_large_maskformer", **TINY_D2),
    "mask2former": lambda: semask.create_model("semask_swin_large_mask2former", **TINY_D2),
    "fapn": lambda: semask.create_model("semask_swin_large_fapn_mask2former", **TINY_D2),
    "msfapn": lambda: semask.create_model("semask_swin_large_msfapn_mask2former", **TINY_D2),
}


def _first_output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0][-1]


# --------------------------------------------------------------------------------------------------
# 1. meta-device builds

@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_build_to_empty_equals_eager(family):
    torch.manual_seed(0)
    eager = FAMILIES[family]().eval()
    with torch.device("meta"):
        lazy = FAMILIES[family]()
    assert all(b.is_meta for b in lazy.buffers())
    lazy.to_empty(device="cpu")
    reinit_non_persistent_buffers(lazy)  # what accelerate / transformers users (and _init_weights) call
    lazy.load_state_dict(eager.state_dict())
    lazy.eval()
    # every buffer, non-persistent ones included, is back
    ref = dict(eager.named_buffers())
    got = dict(lazy.named_buffers())
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_first_output(lazy(x)), _first_output(eager(x)), atol=0, rtol=0)


def test_transformers_upernet_save_pretrained_round_trip(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # TimmBackboneConfig builds timm.create_model("semask_swin_tiny", features_only=True); from_pretrained
    # builds it on the meta device and re-creates non-persistent buffers through init_non_persistent_buffers
    backbone = transformers.TimmBackboneConfig(backbone="semask_swin_tiny", out_indices=[0, 1, 2, 3])
    cfg = transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=5,
                                     use_auxiliary_head=False)
    torch.manual_seed(0)
    model = transformers.UperNetForSemanticSegmentation(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    again = transformers.UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = again(pixel_values=x).logits
    assert got.shape == (1, 5, 64, 64)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# 2. timm's headless contract (timm's own test bodies, re-written for our backbones)

def _timm_backbone(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **BACKBONES[name], **kwargs).eval()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_timm_forward_features(name):
    model = _timm_backbone(name)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out = model.forward_features(x)
        pooled = model.forward_head(out, pre_logits=True)
    assert isinstance(model.num_features, int) and model.num_features == model.head_hidden_size
    assert out.shape == (2, model.num_features, 3, 2)
    assert not torch.isnan(out).any()
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(pooled, out.mean((2, 3)))
    assert [c for c in model.feature_channels] == [f["num_chs"] for f in model.feature_info]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_timm_forward_intermediates(name):
    model = _timm_backbone(name)
    info = timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info)))
    assert len(info.channels()) >= 3
    h, w = 96, 70
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        feats = model.forward_features(x)
    assert len(inter) == len(info.channels())
    for c, r, t in zip(info.channels(), info.reduction(), inter):
        assert t.shape[0] == 2 and t.shape[1] == c
        assert t.shape[2] <= math.ceil(h / r) + 1 and t.shape[3] <= math.ceil(w / r) + 1
        assert not torch.isnan(t).any()
    torch.testing.assert_close(final, feats)
    assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, inter[-2:]))

    # pruning keeps the earlier stages' outputs and removes the rest
    n_params = sum(p.numel() for p in model.parameters())
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    assert sum(p.numel() for p in model.parameters()) < n_params
    with torch.no_grad():
        pruned = model.forward_intermediates(x, intermediates_only=True)
    assert len(pruned) == 2 and all(torch.equal(a, b) for a, b in zip(pruned, inter[:2]))
    assert model.num_features == info.channels()[1]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_timm_default_cfgs(name):
    model = _timm_backbone(name, num_classes=0)  # timm's "no classifier": K keeps its default
    assert model.num_classes == model.num_semantic_classes == 150
    assert model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    state = model.state_dict()
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        out = model.forward_features(x)
        assert tuple(out.shape[2:]) == tuple(cfg["pool_size"])
        assert out.shape[1] == model.num_features
        model.reset_classifier(0)
        pooled = model.forward_head(model.forward_features(x))
        assert pooled.shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        unpooled = model.forward_head(model.forward_features(x))
        assert unpooled.shape[2:] == tuple(cfg["pool_size"])
    assert cfg["classifier"] is None  # headless: nothing to look up in the state dict
    if cfg["first_conv"]:  # wrapped: the timm model's own first conv, no fixed name
        assert f"{cfg['first_conv']}.weight" in state
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406)) and cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="no image classifier"):
        model.reset_classifier(10)


def test_num_classes_and_num_semantic_classes():
    # semask's API: num_classes is K
    model = semask.create_model("semask_swin_tiny", num_classes=7, **TINY_SWIN)
    assert model.num_semantic_classes == 7
    # the unambiguous name, also through timm with its headless num_classes=0
    model = timm.create_model("semask_mit_b0", num_classes=0, num_semantic_classes=9, **TINY_MIT)
    assert model.num_semantic_classes == 9
    _, priors = model(torch.randn(1, 3, 64, 64))
    assert priors[0].shape[1] == 9
    fm = timm.create_model("semask_wrap", num_classes=0, num_semantic_classes=4, features_only=True, **TINY_WRAP)
    assert fm.model.num_semantic_classes == 4
    with pytest.raises(ValueError, match="disagree"):
        timm.create_model("semask_swin_tiny", num_classes=5, num_semantic_classes=9, **TINY_SWIN)


def test_output_stride_errors_are_clear():
    for name, kw in [("semask_swin_tiny", TINY_SWIN), ("semask_mit_b0", TINY_MIT)]:
        with pytest.raises(ValueError, match="output_stride=32 only"):
            semask.create_model(name, num_classes=5, output_stride=16, **kw)


# --------------------------------------------------------------------------------------------------
# 3. timm's optimizer factory

def _lr_scales(model: torch.nn.Module) -> dict:
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.75)
    return {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", ["semask_swin_tiny", "semask_mit_b0", "semask_wrap"])
def test_layer_decay_one_scale_per_block_group(name):
    model = _timm_backbone(name)
    scales = _lr_scales(model)
    params = dict(model.named_parameters())

    def scale_of(prefix: str) -> float:
        found = {scales[id(p)][0] for n, p in params.items() if n.startswith(prefix)}
        assert len(found) == 1, (prefix, found)  # one scale for the whole block
        return found.pop()

    order = []  # parameter groups, shallow to deep
    for i in range(4):
        if name == "semask_swin_tiny":
            order += ["patch_embed."] * (i == 0) + [f"layers.{i}.blocks.{j}." for j in range(2)]
            order += [f"layers.{i}.semantic_layer."]
        elif name == "semask_mit_b0":
            order += [f"stages.{i}.patch_embed."] + [f"stages.{i}.blocks.{j}." for j in range(TINY_MIT["depths"][i])]
            order += [f"stages.{i}.semantic_layer."]
        else:
            order += ["model.stem."] * (i == 0) + [f"model.stages.{i}.blocks.0.", f"semantic_layers.{i}."]
    got = [scale_of(p) for p in order]
    assert got == sorted(got) and len(set(got)) == len(got)  # every group its own scale, deeper = larger
    assert max(got) == 1.0 and min(got) == pytest.approx(0.75 ** (len(got) - 1))
    assert len({s for s, _ in scales.values()}) == len(got)


def test_no_weight_decay_official_rule():
    model = semask.create_model("semask_swin_tiny_fpn", num_classes=5, fpn_channels=8, ape=True, **TINY_SWIN)
    names = model.no_weight_decay()
    assert "backbone.absolute_pos_embed" in names
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in names
    assert "backbone.norm0.weight" in names and "backbone.layers.0.blocks.0.norm1.bias" in names
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" not in names
    assert names == {f"backbone.{n}" for n in model.backbone.no_weight_decay()} | {n for n, _ in model.named_parameters()
                                                      if n.startswith("decode_head.") and "norm" in n}
    scales = _lr_scales(model)
    params = dict(model.named_parameters())
    assert scales[id(params["backbone.layers.0.blocks.0.attn.relative_position_bias_table"])][1] == 0.0
    assert scales[id(params["backbone.absolute_pos_embed"])][1] == 0.0
    assert scales[id(params["backbone.layers.0.blocks.0.attn.qkv.weight"])][1] == 0.05
    # segmentor groups: backbone block groups, then the decoder as the last group (scale 1)
    assert scales[id(params["decode_head.conv_seg.weight"])][0] == 1.0
    assert len({s for s, _ in scales.values()}) == 14  # stem + 8 blocks + 4 semantic layers + decoder


def test_maskformer_optimizer_groups():
    model = FAMILIES["mask2former"]()
    scales = _lr_scales(model)
    assert len({s for s, _ in scales.values()}) == 1 + 8 + 4 + 1  # stem, blocks, semantic layers, head
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in model.no_weight_decay()


# --------------------------------------------------------------------------------------------------
# 8. gradient checkpointing on segmentors

@pytest.mark.parametrize("family", ["fpn", "segformer", "mask2former"])
def test_segmentor_grad_checkpointing_same_gradients(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().train()
    for m in model.modules():  # no randomness between the two passes
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "DropPath":
            m.p = 0.0
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))

    def grads():
        model.zero_grad()
        torch.manual_seed(1)  # the mask-loss point sampling
        model(x, labels)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    flags = [m.grad_checkpointing for m in model.backbone.modules() if hasattr(m, "grad_checkpointing")]
    assert flags and all(flags)
    ckpt = grads()
    model.set_grad_checkpointing(False)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


def test_py_typed_is_shipped():
    root = Path(semask.__file__).parent
    assert (root / "py.typed").is_file()
    text = (root.parent / "pyproject.toml").read_text()
    assert "py.typed" in text


# --------------------------------------------------------------------------------------------------
# 7. torchvision v2 transforms on our datasets

def _tiny_folder(root: Path) -> None:
    from PIL import Image
    import numpy as np

    (root / "img").mkdir()
    (root / "ann").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        label = np.zeros((20, 30), dtype=np.uint8)
        label[:, :7] = 3  # left stripe: a flip moves it to the right
        label[2:5, 10:12] = 1
        Image.fromarray(label).save(root / "ann" / f"{i}.png")


def test_v2_random_flip_moves_image_and_label(tmp_path):
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from semask.data.datasets import SegmentationFolder, collate_samples
    from semask.data.transforms import train_transforms

    _tiny_folder(tmp_path)
    plain = SegmentationFolder(tmp_path / "img", tmp_path / "ann")
    flipped = SegmentationFolder(tmp_path / "img", tmp_path / "ann", transforms=v2.RandomHorizontalFlip(p=1.0))
    raw, out = plain[0], flipped[0]
    assert isinstance(raw["image"], tv_tensors.Image) and isinstance(raw["label"], tv_tensors.Mask)
    assert torch.equal(out["image"], raw["image"].flip(-1))
    assert torch.equal(out["label"], raw["label"].flip(-1))
    assert (out["label"][:, -7:] == 3).all() and (out["label"][:, :-7] != 3).all()
    assert out["path"] == raw["path"]
    # a v2 resize keeps label ids (nearest for masks)
    resized = SegmentationFolder(tmp_path / "img", tmp_path / "ann", transforms=v2.Resize((40, 60)))[0]
    assert resized["label"].shape == (40, 60) and set(resized["label"].unique().tolist()) <= {0, 1, 3}
    # our own pipeline and collate take the tv_tensors as they are
    ours = SegmentationFolder(tmp_path / "img", tmp_path / "ann", transforms=train_transforms(crop_size=(16, 16)))
    batch = collate_samples([ours[0], ours[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].shape == (2, 16, 16)


# --------------------------------------------------------------------------------------------------
# 4. preprocessing metadata

@pytest.mark.parametrize("name,side", [("semask_swin_tiny_fpn.ade20k", 512), ("semask_swin_tiny_fpn.cityscapes", 1024),
                                       ("semask_swin_large_mask2former.ade20k", 640)])
def test_resolve_data_config_is_the_official_pipeline(name, side):
    from timm.data import resolve_data_config
    from semask.inference import model_cfg, normalization

    arch = name.split(".")[0]
    tiny = {k: v for k, v in TINY_D2.items() if k != "num_classes"} if "former" in arch else dict(TINY_SWIN, fpn_channels=8)
    model = semask.create_model(name, **tiny)
    data = resolve_data_config(model=model)
    assert data["input_size"] == (3, side, side)
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data["std"] == pytest.approx((0.229, 0.224, 0.225))
    # our predict pipeline keeps the official 0..255 normalisation, from the same cfg
    mean, std = normalization(model_cfg(model))
    assert mean == pytest.approx((123.675, 116.28, 103.53)) and std == pytest.approx((58.395, 57.12, 57.375))
    # a timm pipeline built from that config feeds the model the same tensor as ours
    from PIL import Image
    import numpy as np
    from timm.data import create_transform
    from semask.inference import normalize_images, to_image_tensor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    timm_x = create_transform(**data)(img)
    ours = normalize_images(to_image_tensor(img)[None], mean, std)[0]
    torch.testing.assert_close(timm_x, ours, atol=1e-5, rtol=1e-5)


def test_saved_configs_in_old_units_still_load():
    from semask.models import PretrainedCfg
    from semask.inference import normalization

    old = dict(PretrainedCfg().to_dict(), mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
    cfg = PretrainedCfg.from_dict(old)
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406))
    assert normalization(old) == normalization(cfg.to_dict())


# --------------------------------------------------------------------------------------------------
# 6. TorchScript and FX: clear errors naming what to use

@pytest.mark.parametrize("family", ["swin", "mit", "wrapped", "fpn"])
def test_torchscript_and_fx_raise_clear_errors(family):
    model = FAMILIES[family]().eval()
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.export"):
        torch.jit.script(model)
    if family != "fpn":  # backbones (a segmentor's own label checks stop FX before its backbone)
        with pytest.raises(RuntimeError, match="torch.fx symbolic tracing.*torch.export"):
            torch.fx.symbolic_trace(model)
    if family == "swin":
        from torchvision.models.feature_extraction import create_feature_extractor

        with pytest.raises(RuntimeError, match="forward_intermediates"):
            create_feature_extractor(model, return_nodes=["norm0"])
        model.eval()  # torchvision left it in train mode when tracing failed
    # what the errors recommend works
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(_first_output(program.module()(x)), _first_output(model(x)))


def test_pruned_features_only_loads_pretrained_trunk():
    # features_only=True prunes the stages after the last out index (timm's FeatureGetterNet); loading
    # a full MiT checkpoint into it still works (strictly, for the stages kept)
    torch.manual_seed(0)
    full = semask.create_model("semask_mit_b0", num_classes=5, semantic_layers=False, **TINY_MIT).eval()
    fm = timm.create_model("semask_mit_b0", features_only=True, out_indices=(0, 1), pretrained=True,
                           pretrained_cfg_overlay=dict(state_dict=full.state_dict()), num_classes=5,
                           semantic_layers=False, **TINY_MIT).eval()
    assert len(fm.model.stages) == 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, ref = fm(x), full(x)[0][:2]
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, ref))
