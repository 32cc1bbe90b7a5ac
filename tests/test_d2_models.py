"""SeMask MaskFormer / Mask2Former / FaPN / MSFaPN: parity with the official detectron2 code on the
d2 fixtures, checkpoint conversion, parameter counts, deformable ops, matcher, losses, training."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED, load_parity

import semask  # noqa: F401  (registers the models)
from semask.decoders.ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_grid_sample
from semask.hub.convert import convert_official_checkpoint, convert_state_dict
from semask import create_model, get_pretrained_cfg
from semask.models.criterion import (
    HungarianMatcher, SetCriterion, dice_loss, semantic_targets, sigmoid_focal_loss, uncertain_point_coords,
)
from semask.models.mask_former import D2_CONVERSION_RULES, infer_d2_kwargs

FIXTURES = ["maskformer", "mask2former", "mask2former_k19", "fapn", "msfapn", "fapn_k19_b2"]
ARCH = {
    "BasePixelDecoder": "semask_swin_large_maskformer",
    "MSDeformAttnPixelDecoder": "semask_swin_large_mask2former",
    "PixelFANDecoder": "semask_swin_large_fapn_mask2former",
    "MSDeformAttnPixelFANDecoder": "semask_swin_large_msfapn_mask2former",
}
TOL = dict(atol=1e-4, rtol=1e-4)


def fixture_model_kwargs(meta: dict) -> tuple:
    """(architecture, create_model kwargs) of a d2 fixture, from its official config."""
    cfg = json.loads(meta["model_cfg"])
    sw, sh, mf = cfg["SWIN"], cfg["SEM_SEG_HEAD"], cfg["MASK_FORMER"]
    arch = ARCH[sh["PIXEL_DECODER_NAME"]]
    kinds = json.loads(meta["semantic_layer_kinds"])
    return arch, dict(
        num_classes=int(meta["num_classes"]), embed_dim=sw["EMBED_DIM"], depths=sw["DEPTHS"],
        num_heads=sw["NUM_HEADS"], window_size=sw["WINDOW_SIZE"], sem_window_size=sw["SEM_WINDOW_SIZE"],
        sem_global=[k == "SeMaskBlock" for k in kinds], conv_dim=sh["CONVS_DIM"], mask_dim=sh["MASK_DIM"],
        hidden_dim=mf["HIDDEN_DIM"], num_queries=mf["NUM_OBJECT_QUERIES"], nheads=mf["NHEADS"],
        dim_feedforward=mf["DIM_FEEDFORWARD"], enc_layers=sh["TRANSFORMER_ENC_LAYERS"],
        # Mask2Former-type cfg DEC_LAYERS counts the query-only prediction too
        dec_layers=mf["DEC_LAYERS"] - (0 if arch.endswith("_maskformer") else 1),
    )


def _official_state_dict(parity_dir: Path, name: str) -> dict:
    ckpt = torch.load(parity_dir / "d2" / f"{name}.pth", map_location="cpu", weights_only=True)
    return ckpt["model"]


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_with_official(parity_dir, name):
    t, meta = load_parity(f"d2/{name}")
    arch, kwargs = fixture_model_kwargs(meta)
    model = create_model(arch, **kwargs).eval()
    state, report = convert_state_dict(_official_state_dict(parity_dir, name), model, D2_CONVERSION_RULES)
    assert report.ok, report.format()
    assert "criterion.empty_weight" in report.dropped
    model.load_state_dict(state, strict=True)

    seen = {}
    hooks = [model.backbone.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patch_embed", o))]
    for i, stage in enumerate(model.backbone.layers):
        def hook(m, inp, out, i=i):
            seen[f"stage{i}.pre_sem"], seen[f"stage{i}.post_sem"] = inp[0], out[1]
        hooks.append(stage.semantic_layer.register_forward_hook(hook))
    with torch.no_grad():
        out = model.forward_all(t["ref.input_padded"])
    for h in hooks:
        h.remove()
    # README debugging order: patch_embed, stages, feat/sem, sem_pred, pixel.*, aux*, pred_*, semseg
    torch.testing.assert_close(seen["patch_embed"], t["ref.patch_embed"], **TOL)
    for i in range(4):
        torch.testing.assert_close(seen[f"stage{i}.pre_sem"], t[f"ref.stage{i}.pre_sem"], **TOL)
        torch.testing.assert_close(seen[f"stage{i}.post_sem"], t[f"ref.stage{i}.post_sem"], **TOL)
        torch.testing.assert_close(out["features"][i], t[f"ref.feat.res{i + 2}"], **TOL)
        torch.testing.assert_close(out["priors"][i], t[f"ref.sem.res{i + 2}"], **TOL)
    torch.testing.assert_close(out["sem_pred"], t["ref.sem_pred"], **TOL)
    torch.testing.assert_close(out["mask_features"], t["ref.pixel.mask_features"], **TOL)
    if "ref.pixel.ms0" in t:
        for j in range(3):
            torch.testing.assert_close(out["multi_scale"][j], t[f"ref.pixel.ms{j}"], **TOL)
    n_aux = len([k for k in t if re.fullmatch(r"ref\.aux\d+\.pred_logits", k)])
    assert len(out["aux_outputs"]) == n_aux
    for j, aux in enumerate(out["aux_outputs"]):
        torch.testing.assert_close(aux["pred_logits"], t[f"ref.aux{j}.pred_logits"], **TOL)
        torch.testing.assert_close(aux["pred_masks"], t[f"ref.aux{j}.pred_masks"], **TOL)
    torch.testing.assert_close(out["pred_logits"], t["ref.pred_logits"], **TOL)
    torch.testing.assert_close(out["pred_masks"], t["ref.pred_masks"], **TOL)
    # the public API: unpadded input, pad to 32 + crop inside
    with torch.no_grad():
        semseg = model(t["ref.input"])
    assert semseg.shape == t["ref.semseg"].shape
    torch.testing.assert_close(semseg, t["ref.semseg"], **TOL)


def test_convert_official_file_end_to_end(parity_dir, tmp_path):
    """`semask convert` path on a Cityscapes-like file (K=19, all windowed, sem window 4 != window 6)."""
    t, meta = load_parity("d2/mask2former_k19")
    src = parity_dir / "d2" / "mask2former_k19.pth"
    out = convert_official_checkpoint(src, tmp_path / "m", "semask_swin_large_mask2former",
                                      sem_global=(False,) * 4, sem_window_size=4)
    cfg = json.loads((out / "config.json").read_text())
    # shapes tell K, widths, layer counts and the deformable heads; the rest came from the overrides
    assert cfg["num_classes"] == 19
    assert {k: cfg["model_kwargs"][k] for k in ("conv_dim", "mask_dim", "num_queries", "dec_layers", "enc_layers")} \
        == dict(conv_dim=64, mask_dim=48, num_queries=12, dec_layers=6, enc_layers=2)
    model = create_model("semask_swin_large_mask2former", pretrained=str(out)).eval()
    assert model.sem_seg_head.pixel_decoder.transformer.encoder.layers[0].self_attn.n_heads == 8
    with torch.no_grad():
        torch.testing.assert_close(model(t["ref.input"]), t["ref.semseg"], **TOL)
    # fine-tuning on another K keeps every class-independent tensor, re-draws the class head
    tuned = create_model("semask_swin_large_mask2former", pretrained=str(out), num_classes=7)
    assert tuned.sem_seg_head.predictor.class_embed.out_features == 8 and tuned.criterion.empty_weight.shape == (8,)
    torch.testing.assert_close(tuned.sem_seg_head.pixel_decoder.layer_1.weight, model.sem_seg_head.pixel_decoder.layer_1.weight)
    assert tuned(torch.randn(1, 3, 40, 40)).shape == (1, 7, 40, 40)


def test_tied_groupnorm_registered_once_and_checked(parity_dir):
    _, meta = load_parity("d2/fapn")
    arch, kwargs = fixture_model_kwargs(meta)
    model = create_model(arch, **kwargs)
    pd = model.sem_seg_head.pixel_decoder
    for level in (1, 2, 3):
        assert getattr(pd, f"align_{level}")._offset_norm is getattr(pd, f"layer_{level}").norm
    assert not any(".offset.norm." in k for k in model.state_dict())
    twin = copy.deepcopy(pd)  # copies keep the tie
    assert twin.align_1._offset_norm is twin.layer_1.norm and twin.layer_1.norm is not pd.layer_1.norm
    sd = dict(_official_state_dict(parity_dir, "fapn"))
    _, report = convert_state_dict(sd, model, D2_CONVERSION_RULES)
    assert report.ok and "sem_seg_head.pixel_decoder.align_2.offset.norm.weight" in report.dropped
    sd["sem_seg_head.pixel_decoder.align_2.offset.norm.weight"] = sd["sem_seg_head.pixel_decoder.align_2.offset.norm.weight"] + 1
    _, report = convert_state_dict(sd, model, D2_CONVERSION_RULES)
    assert not report.ok and any("align_2.offset.norm.weight" in k for k, _ in report.value_mismatches)


# --------------------------------------------------------------------------------------------------
# full-size models (meta device: no memory, no compute)

@pytest.mark.parametrize("name,params_m", [
    ("semask_swin_large_maskformer.ade20k", 218.719),
    ("semask_swin_large_mask2former.ade20k", 222.632),
    ("semask_swin_large_mask2former.cityscapes", 221.843),
    ("semask_swin_large_fapn_mask2former.ade20k", 226.745),
    ("semask_swin_large_msfapn_mask2former.ade20k", 223.851),
])
def test_parameter_counts(name, params_m):
    with torch.device("meta"):
        model = create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == params_m


@pytest.mark.parametrize("family,name", [
    ("maskformer", "semask_swin_large_maskformer.ade20k"), ("mask2former", "semask_swin_large_mask2former.ade20k"),
    ("fapn", "semask_swin_large_fapn_mask2former.ade20k"), ("msfapn", "semask_swin_large_msfapn_mask2former.ade20k"),
])
def test_full_size_keys_match_official_checkpoints(family, name):
    tsv = SHARED / "docs" / "keys" / f"d2_{family}_semask_swin_large_ade20k.tsv"
    if not tsv.exists():
        pytest.skip(f"{tsv} not found")
    shapes = {k: json.loads(s) for k, s in (line.rstrip("\n").split("\t")[:2] for line in tsv.open() if line.strip())}
    with torch.device("meta"):
        model = create_model(name)
        official = {k: torch.empty(s) for k, s in shapes.items()}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied = re.compile(D2_CONVERSION_RULES.tied[0][0])
    expected = {k: s for k, s in shapes.items()
                if k != "criterion.empty_weight" and not k.endswith("relative_position_index") and not tied.fullmatch(k)}
    assert ours == expected
    # the converter's shape-based plan sees no difference for the tag (so `--model <tag>` converts strictly)
    assert infer_d2_kwargs(official) == infer_d2_kwargs(model.state_dict())


def test_pretrained_cfgs():
    city = get_pretrained_cfg("semask_swin_large_mask2former.cityscapes")
    assert city.num_classes == 19 and len(city.class_names) == 19
    assert city.arch_kwargs == dict(sem_global=(False,) * 4, sem_window_size=7)
    with torch.device("meta"):
        m = create_model("semask_swin_large_mask2former.cityscapes")
    assert m.backbone.sem_window_size == 7 and m.backbone.window_size == 12 and not any(m.backbone.sem_global)
    fapn = get_pretrained_cfg("semask_swin_large_fapn_mask2former.ade20k")
    assert fapn.license == "cc-by-nc-4.0" and fapn.metrics["miou_ms"] == 58.25 and len(fapn.class_names) == 150


# --------------------------------------------------------------------------------------------------
# deformable attention

def test_ms_deform_attn_gather_matches_grid_sample():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (6, 10), (12, 19)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(2, s, 4, 8, generator=g, requires_grad=True)
    # locations well outside [0, 1] too: zero padding, as grid_sample
    loc = (torch.rand(2, 30, 4, 3, 4, 2, generator=g) * 2.4 - 0.7).requires_grad_()
    attn = torch.rand(2, 30, 4, 3, 4, generator=g).softmax(-1).requires_grad_()
    ours, ref = ms_deform_attn(value, shapes, loc, attn), ms_deform_attn_grid_sample(value, shapes, loc, attn)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    cot = torch.randn(ours.shape, generator=g)
    g1 = torch.autograd.grad((ours * cot).sum(), (value, loc, attn))
    g2 = torch.autograd.grad((ref * cot).sum(), (value, loc, attn))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ms_deform_attn_module_impls_agree():
    torch.manual_seed(0)
    m = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=3)
    for p in m.parameters():  # non-trivial offsets and weights
        torch.nn.init.normal_(p, std=0.3)
    shapes = [(4, 6), (2, 3)]
    x = torch.randn(2, 30, 32)
    ref = torch.rand(2, 30, 2, 2)
    out = m(x, ref, x, shapes)
    m.impl = "grid_sample"
    torch.testing.assert_close(m(x, ref, x, shapes), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(32, impl="cuda")


def test_ms_deform_attn_samples_the_right_pixel():
    """A point at a pixel centre of level 1 returns that pixel's value (hand-made case)."""
    shapes = [(2, 2), (3, 4)]
    value = torch.zeros(1, 4 + 12, 1, 1)
    value[0, 4 + 1 * 4 + 2, 0, 0] = 5.0  # level 1, row 1, col 2
    loc = torch.zeros(1, 1, 1, 2, 1, 2)
    loc[0, 0, 0, 1, 0] = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 3])
    attn = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2, 1)
    assert ms_deform_attn(value, shapes, loc, attn).item() == pytest.approx(0.75 * 5.0)


def test_ms_deform_attn_module_rejects_bad_shapes():
    m = MSDeformAttn(16, n_levels=2, n_heads=2, n_points=2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        m(torch.randn(1, 5, 16), torch.rand(1, 5, 2, 2), torch.randn(1, 7, 16), [(2, 2), (1, 2)])


# --------------------------------------------------------------------------------------------------
# matcher and losses

def test_matcher_finds_global_optimum_not_greedy():
    # class cost only: greedy would give q0->t0 (0.9) then q1->t1 (0.1); the optimum is q0->t1, q1->t0
    probs = torch.tensor([[0.9, 0.08, 0.01, 0.01], [0.85, 0.01, 0.1, 0.04], [0.01, 0.01, 0.01, 0.97]])
    probs[0, 2] = 0.8
    probs = probs / probs.sum(-1, keepdim=True)
    outputs = {"pred_logits": probs.log()[None], "pred_masks": torch.zeros(1, 3, 4, 4)}
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.zeros(2, 4, 4)}]
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0)
    (qi, ti), = matcher(outputs, targets)
    assert dict(zip(qi.tolist(), ti.tolist())) == {0: 1, 1: 0}


@pytest.mark.parametrize("num_points", [0, 256])
def test_matcher_pairs_masks_by_shape(num_points):
    """Same class scores everywhere: the mask costs alone must pair each query with its mask."""
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(3, 8, 8)
    m[0, :4], m[1, 4:], m[2, :, :4] = 1, 1, 1
    pred = (m[[2, 0, 1]] * 2 - 1) * 8.0  # query q predicts target [2, 0, 1][q]
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_masks": pred[None]}
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": m}]
    matcher = HungarianMatcher(1.0, 20.0 if num_points == 0 else 5.0, 1.0 if num_points == 0 else 5.0, num_points)
    (qi, ti), = matcher(outputs, targets, generator=g)
    assert dict(zip(qi.tolist(), ti.tolist())) == {0: 2, 1: 0, 2: 1}
    cost = matcher.cost_matrix(outputs["pred_logits"][0], pred, targets[0], generator=g)
    assert (cost[torch.arange(3), torch.tensor([2, 0, 1])] < cost.min(1).values + 1e-6).all()


def test_mask_loss_values_by_hand():
    # focal at logit 0, target 1: alpha 0.25 * CE ln2 * (1 - 0.5)^2
    assert sigmoid_focal_loss(torch.zeros(1, 1), torch.ones(1, 1), 1).item() == pytest.approx(0.25 * math.log(2) * 0.25)
    # dice of logit 0 on a 2-pixel target: 1 - (2 * 1 + 1) / (1 + 2 + 1)
    assert dice_loss(torch.zeros(1, 2), torch.ones(1, 2), 1).item() == pytest.approx(1 - 3 / 4)
    # confident and right -> ~0
    assert dice_loss(torch.full((1, 4), 20.0), torch.ones(1, 4), 1).item() < 1e-6


def test_class_and_semantic_losses_by_hand():
    k, q = 3, 2
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])  # (1, Q, K+1)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :, 8:] = 255  # right half ignored
    targets = semantic_targets(labels)
    assert targets[0]["labels"].tolist() == [0] and targets[0]["masks"].sum() == 128
    good = torch.full((1, q, 16, 16), -10.0)
    good[0, 0, :, :8] = 10.0  # query 0 predicts exactly the class-0 segment
    bad = good.clone()
    bad[0, 0] = -good[0, 0]  # ... and here exactly its complement
    crit = SetCriterion(k, HungarianMatcher(2.0, 5.0, 5.0, num_points=512), mask_loss="point", num_points=512)
    sem = torch.randn(1, k, 16, 16, generator=torch.Generator().manual_seed(1))

    def run(masks):
        return crit({"pred_logits": logits, "pred_masks": masks}, targets, sem, labels,
                    generator=torch.Generator().manual_seed(0))

    losses = run(good)
    # class CE: query 0 -> class 0, query 1 -> no object (weight 0.1); weighted mean over queries
    ce0 = -F.log_softmax(logits[0, 0], -1)[0]
    ce1 = -F.log_softmax(logits[0, 1], -1)[3]
    assert losses["loss_ce"].item() == pytest.approx(2.0 * (ce0 + 0.1 * ce1).item() / 1.1, rel=1e-5)
    # semantic CE: mean over the 128 valid pixels only, weight 0.4
    valid = labels != 255
    ce_pix = F.cross_entropy(sem, labels.clamp_max(k - 1), reduction="none")[valid].mean()
    assert losses["loss_cate"].item() == pytest.approx(0.4 * ce_pix.item(), rel=1e-5)
    # right masks: small point BCE / dice (only the bilinear border blurs); complement: large
    wrong = run(bad)
    # (importance sampling puts 75% of the points on the blurred boundary, hence the margin)
    assert losses["loss_dice"].item() < 0.2 * 5.0 and wrong["loss_dice"].item() > 0.8 * 5.0
    assert wrong["loss_mask"].item() > 5 * losses["loss_mask"].item()
    assert losses["loss"].item() == pytest.approx(sum(v.item() for n, v in losses.items() if n != "loss"), rel=1e-6)


def test_importance_sampling_prefers_uncertain_points():
    logits = torch.full((2, 1, 16, 16), 10.0)
    logits[:, :, :, 4:12] = 0.0  # uncertain stripe: x in [0.25, 0.75) (half of the 600 candidates)
    coords = uncertain_point_coords(logits, 200, 3.0, 0.75, torch.Generator().manual_seed(0))
    assert coords.shape == (2, 200, 2)
    x = coords[..., 0]
    assert ((x[:, :150] > 0.25) & (x[:, :150] < 0.75)).all()  # the 150 importance-sampled points
    assert ((x[:, 150:] < 0.25) | (x[:, 150:] > 0.75)).float().mean() > 0.25  # the other 50: uniform


# --------------------------------------------------------------------------------------------------
# API and training on tiny configs

TINY = dict(num_classes=5, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
            conv_dim=32, mask_dim=16, hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=32, dec_layers=2,
            enc_layers=1)


def test_api_shapes_and_errors():
    model = create_model("semask_swin_large_msfapn_mask2former", **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 37, 50))
    assert out.shape == (2, 5, 37, 50) and (out >= 0).all() and (out <= 6).all()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="must match"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="family"):
        semask.models.mask_former.create_semask_mask_former("segformer")


@pytest.mark.parametrize("arch", ["semask_swin_large_maskformer", "semask_swin_large_fapn_mask2former"])
def test_training_steps_lower_the_loss(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_points=128, **TINY).train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 20:] = 2
    labels[0, :8] = 4
    labels[1, -5:] = 255

    def total() -> float:
        with torch.no_grad():
            return model.loss(images, labels, generator=torch.Generator().manual_seed(0))["loss"].item()

    model.eval()
    before = total()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(5):
        losses = model(images, labels)
        assert {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_cate", "loss_ce_0"} <= set(losses)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    model.eval()
    assert total() < 0.85 * before
