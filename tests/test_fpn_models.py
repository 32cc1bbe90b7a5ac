"""SeMask-FPN registered models: pretrained tags, parameter counts (spec section 7), class resets, OHEM."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import semask
from semask.data.classes import get_dataset_meta, list_datasets
from semask.models._registry import get_pretrained_cfg

W, G = False, True
SIZES = ("tiny", "small", "base", "large")

# spec section 7 (official modules, official configs), millions of parameters: (full, plain full)
SPEC_PARAMS = {
    ("tiny", "ade20k"): (34.656, 32.650), ("small", "ade20k"): (55.974, 53.968),
    ("base", "ade20k"): (96.486, 93.116), ("large", "ade20k"): (210.792, 203.648),
    ("tiny", "cityscapes"): (34.244, 32.616), ("small", "cityscapes"): (55.562, 53.934),
    ("base", "cityscapes"): (95.948, 93.082), ("large", "cityscapes"): (210.003, 203.615),
}
# spec section 1.4 (FPN tree) and section 5 (OHEM), written out per checkpoint
EXPECTED_PATTERN = {"tiny": (W, W, G, G), "small": (W, W, G, G), "base": (W, W, W, W), "large": (W, W, G, G)}
README_MIOU = {("tiny", "ade20k"): (42.06, 43.36), ("large", "cityscapes"): (78.53, 80.39),
               ("base", "coco_stuff10k"): (44.63, 46.30)}

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, fpn_channels=8)


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return semask.create_model(name, **kwargs)


def test_every_released_fpn_checkpoint_has_a_tag():
    tags = semask.list_pretrained("semask_swin_*_fpn*")
    assert sorted(tags) == sorted(f"semask_swin_{s}_fpn.{d}" for s in SIZES
                                  for d in ("ade20k", "cityscapes", "coco_stuff10k"))
    # aliases resolve to the same tags
    assert get_pretrained_cfg("semask_swin_t_fpn.cityscapes").num_classes == 19


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dataset", ["ade20k", "cityscapes", "coco_stuff10k"])
def test_tag_metadata(size, dataset):
    cfg = get_pretrained_cfg(f"semask_swin_{size}_fpn.{dataset}")
    k = {"ade20k": 150, "cityscapes": 19, "coco_stuff10k": 171}[dataset]
    assert cfg.num_classes == k and len(cfg.class_names) == k and len(cfg.palette) == k
    assert cfg.class_names == get_dataset_meta(dataset)[0]
    pattern = (W,) * 4 if dataset == "cityscapes" else EXPECTED_PATTERN[size]
    assert tuple(cfg.arch_kwargs["sem_global"]) == pattern
    ohem = dataset == "coco_stuff10k" or (dataset == "ade20k" and size == "large")
    assert cfg.arch_kwargs.get("ohem") == (dict(min_kept=100_000) if ohem else None)
    crop = 768 if dataset == "cityscapes" else (640 if size == "large" else 512)
    assert cfg.crop_size == (crop, crop)
    assert cfg.test_scale == ((2048, 1024) if dataset == "cityscapes" else (4 * crop, crop))
    assert cfg.reduce_zero_label == (dataset != "cityscapes")
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406)) and cfg.std == pytest.approx((0.229, 0.224, 0.225))
    assert cfg.source_url.startswith("https://drive.google.com/file/d/")
    assert cfg.hf_hub_id == f"semask/semask_swin_{size}_fpn.{dataset}"
    assert cfg.license == "apache-2.0"
    assert 30 < cfg.metrics["miou"] < cfg.metrics["miou_ms"] < 90
    if (size, dataset) in README_MIOU:
        assert (cfg.metrics["miou"], cfg.metrics["miou_ms"]) == README_MIOU[(size, dataset)]


def test_tags_have_distinct_sources():
    cfgs = [get_pretrained_cfg(n) for n in semask.list_pretrained("semask_swin_*_fpn*")]
    assert len({c.source_url for c in cfgs}) == len({c.hf_hub_id for c in cfgs}) == len(cfgs) == 12


def test_dataset_meta():
    sizes = {"ade20k": 150, "cityscapes": 19, "coco_stuff": 171, "camvid": 11}
    for name in list_datasets():
        classes, palette = get_dataset_meta(name)
        assert len(classes) == len(palette) == sizes[name] and len(set(classes)) == len(classes)
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
    assert get_dataset_meta("COCO-Stuff10k") == get_dataset_meta("coco_stuff")
    assert get_dataset_meta("cityscapes")[0][:3] == ("road", "sidewalk", "building")  # trainId order
    assert get_dataset_meta("camvid")[0][0] == "sky" and get_dataset_meta("camvid")[0][-1] == "bicyclist"
    with pytest.raises(ValueError, match="known datasets"):
        get_dataset_meta("pascal")


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_match_spec(size):
    """Counted on the meta device; spec section 7 rounds to 1e3 parameters."""
    for dataset in ("ade20k", "cityscapes"):
        full, plain = SPEC_PARAMS[(size, dataset)]
        name = f"semask_swin_{size}_fpn.{dataset}"
        assert _params_m(_meta_model(name)) == pytest.approx(full, abs=6e-4)
        assert _params_m(_meta_model(name, semantic_layers=False)) == pytest.approx(plain, abs=6e-4)
    # COCO-Stuff (K=171) is not in the spec: parameters are affine in K, so extrapolate from K=150/19
    (f150, p150), (f19, p19) = SPEC_PARAMS[(size, "ade20k")], SPEC_PARAMS[(size, "cityscapes")]
    per_class, per_class_plain = (f150 - f19) / 131, (p150 - p19) / 131
    coco = f"semask_swin_{size}_fpn.coco_stuff10k"
    assert _params_m(_meta_model(coco)) == pytest.approx(f150 + 21 * per_class, abs=1e-3)
    assert _params_m(_meta_model(coco, semantic_layers=False)) == pytest.approx(p150 + 21 * per_class_plain, abs=1e-3)


def test_tag_builds_official_training_setup():
    large = _meta_model("semask_swin_large_fpn.ade20k")
    tiny = _meta_model("semask_swin_tiny_fpn.ade20k")
    assert large.ohem == dict(min_kept=100_000) and tiny.ohem is None
    assert tiny.loss_reduction == "valid"  # users' default; "mmseg" reproduces the official loss
    assert tuple(tiny.backbone.sem_global) == (W, W, G, G)
    assert tuple(_meta_model("semask_swin_base_fpn.ade20k").backbone.sem_global) == (W,) * 4
    assert tuple(_meta_model("semask_swin_tiny_fpn.cityscapes").backbone.sem_global) == (W,) * 4
    assert not _meta_model("semask_swin_tiny_fpn", semantic_layers=False).has_semantic_layers


def _ohem_model(**ohem):
    return semask.create_model("semask_swin_tiny_fpn", num_classes=3, loss_reduction="mmseg", ohem=ohem, **TINY)


def test_ohem_keeps_the_hardest_pixels_mmseg_semantics():
    # 1 image, 2x3 pixels, 3 classes; one pixel is ignored
    logits = torch.tensor([[[4.0, 0.0, 1.0], [0.0, 2.0, 0.0]],
                           [[0.0, 3.0, 1.0], [0.0, 0.0, 5.0]],
                           [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]]).unsqueeze(0)
    labels = torch.tensor([[[0, 0, 2], [1, 255, 2]]])
    ce = -F.log_softmax(logits, 1).gather(1, labels.clamp_max(2).unsqueeze(1)).squeeze(1)[0]
    valid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]
    hardest2 = [(1, 2), (0, 1)]  # CE 5.01 and 3.09; the others are 2.24, 1.10, 0.04
    assert sorted(valid, key=lambda p: -ce[p].item())[:2] == hardest2
    loss = _ohem_model(min_kept=2).compute_losses(logits, None, labels)["loss_ce"]
    # kept pixels weigh 1, the rest 0, and mmseg still divides by ALL pixels (6, ignored included)
    assert loss.item() == pytest.approx(sum(ce[p].item() for p in hardest2) / 6, rel=1e-6)
    # min_kept >= number of valid pixels: every valid pixel is kept -> plain mmseg CE
    loss_all = _ohem_model(min_kept=100).compute_losses(logits, None, labels)["loss_ce"]
    assert loss_all.item() == pytest.approx(sum(ce[p].item() for p in valid) / 6, rel=1e-6)
    # thresh: keep pixels whose ground-truth probability is below max(thresh, p_(min_kept))
    # (gt probabilities 0.96, 0.05, 0.33, 0.11, 0.007: with min_kept=1 the cut is max(0.5, 0.05))
    kept = [(0, 1), (0, 2), (1, 0), (1, 2)]
    loss_t = _ohem_model(min_kept=1, thresh=0.5).compute_losses(logits, None, labels)["loss_ce"]
    assert loss_t.item() == pytest.approx(sum(ce[p].item() for p in kept) / 6, rel=1e-6)
    # a threshold below the min_kept-th probability (0.05) is raised to it; strict "<" keeps 1 pixel
    loss_k = _ohem_model(min_kept=1, thresh=0.01).compute_losses(logits, None, labels)["loss_ce"]
    assert loss_k.item() == pytest.approx(ce[1, 2].item() / 6, rel=1e-6)


def test_ohem_only_on_the_main_loss():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 32, 32)
    labels = torch.randint(0, 3, (1, 32, 32))
    plain = _ohem_model(min_kept=10).eval()
    plain.ohem = None
    with torch.no_grad():
        out = plain.forward_all(images)
        a = plain.compute_losses(out["head_seg"], out["head_sem"], labels)
        plain.ohem = dict(min_kept=10)
        b = plain.compute_losses(out["head_seg"], out["head_sem"], labels)
    assert torch.equal(a["loss_cate"], b["loss_cate"])
    assert b["loss_ce"] < a["loss_ce"]  # only 10 of 1024 pixels contribute, divided by all 1024
