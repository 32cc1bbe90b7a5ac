"""``semask convert``: official checkpoints -> model folders; parity with the official outputs and
clean failures (nothing written, non-zero exit, no code executed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import semask
from semask.cli import main as cli
from semask.hub.convert import (
    ConversionError,
    ConversionRules,
    convert_official_checkpoint,
    convert_state_dict,
    infer_swin_kwargs,
    load_official_checkpoint,
)
from conftest import load_parity

ARCH = "semask_swin_tiny_fpn"
# what the weights cannot tell (tests/conftest.py reads the same from the fixtures' metadata)
FIXTURE_ARGS = {"micro_windowed": ["--sem-global", "W,W,W,W"],
                "micro_global": ["--sem-global", "W,W,G", "--sem-window-size", "4"]}


def _pth(parity_dir: Path, name: str) -> Path:
    return parity_dir / "fpn" / f"{name}.pth"


def _assert_nothing_written(dst: Path) -> None:
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]  # no temp left


@pytest.fixture(scope="module")
def converted(parity_dir, tmp_path_factory):
    """Both fpn fixtures converted through the CLI (the path users take)."""
    out = {}
    for name, extra in FIXTURE_ARGS.items():
        dst = tmp_path_factory.mktemp("conv") / name
        assert cli(["convert", str(_pth(parity_dir, name)), str(dst), "--model", ARCH, *extra]) == 0
        out[name] = dst
    return out


@pytest.mark.parametrize("name", list(FIXTURE_ARGS))
def test_parity_through_converter(converted, name):
    ref, meta = load_parity(f"fpn/{name}")
    dst = converted[name]
    assert {"config.json", "model.safetensors"} <= {p.name for p in dst.iterdir()}
    model = semask.create_model(ARCH, pretrained=str(dst), loss_reduction="mmseg").eval()
    assert model.num_classes == int(meta["num_classes"])
    with torch.no_grad():
        out = model.forward_all(ref["ref.input"])
        losses = model.compute_losses(out["head_seg"], out["head_sem"], ref["ref.label"])
        logits = model(ref["ref.input"])
    for key in ("head_seg", "head_sem", "logits"):
        torch.testing.assert_close(out[key], ref[f"ref.{key}"], atol=1e-4, rtol=1e-4, msg=key)
    torch.testing.assert_close(logits, ref["ref.logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(losses["loss_ce"], ref["ref.loss_ce"].reshape(()), atol=0, rtol=1e-4)
    torch.testing.assert_close(losses["loss_cate"], ref["ref.loss_cate"].reshape(()), atol=0, rtol=1e-4)


def test_config_records_everything_needed(converted, parity_dir):
    cfg = json.loads((converted["micro_global"] / "config.json").read_text())
    assert cfg["architecture"] == ARCH and cfg["num_classes"] == 21
    kw = cfg["model_kwargs"]
    assert kw["sem_global"] == [False, False, True] and kw["sem_window_size"] == 4
    assert kw["depths"] == [1, 1, 1] and kw["num_heads"] == [3, 6, 12] and kw["window_size"] == 5
    assert kw["out_indices"] == [0, 1, 2] and kw["fpn_channels"] == 32
    assert "embed_dim" not in kw  # 96 is the tiny preset already
    assert cfg["pretrained_cfg"]["num_classes"] == 21 and cfg["pretrained_cfg"]["tag"] == ""
    assert cfg["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # timm's units
    src = cfg["converted_from"]
    assert src["file"] == "micro_global.pth" and len(src["sha256"]) == 64
    # every official tensor is in the folder except the recomputed relative_position_index buffers
    official, _ = load_official_checkpoint(_pth(parity_dir, "micro_global"))
    ours = load_file(str(converted["micro_global"] / "model.safetensors"))
    assert set(official) - set(ours) == {k for k in official if k.endswith("relative_position_index")}
    assert set(ours) <= set(official)
    for k, v in ours.items():
        assert torch.equal(v, official[k]), k


def test_python_api_matches_cli(converted, parity_dir, tmp_path):
    dst = convert_official_checkpoint(_pth(parity_dir, "micro_windowed"), tmp_path / "w", ARCH,
                                      sem_global=(False,) * 4)
    a = load_file(str(dst / "model.safetensors"))
    b = load_file(str(converted["micro_windowed"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def micro_tag():
    """A temporary tag describing the micro_global fixture, as a release tag describes its checkpoint."""
    from semask.models._registry import PretrainedCfg, _pretrained_cfgs, register_pretrained_cfgs

    kwargs = dict(depths=(1, 1, 1), num_heads=(3, 6, 12), window_size=5, out_indices=(0, 1, 2), fpn_channels=32,
                  sem_global=(False, False, True), sem_window_size=4)
    register_pretrained_cfgs(ARCH, {"_test_micro": PretrainedCfg(num_classes=21, arch_kwargs=kwargs, dataset="x")})
    yield f"{ARCH}._test_micro"
    del _pretrained_cfgs[ARCH]["_test_micro"]


def test_tagged_conversion(parity_dir, tmp_path, micro_tag):
    dst = convert_official_checkpoint(_pth(parity_dir, "micro_global"), tmp_path / "out", micro_tag)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["pretrained_cfg"]["tag"] == "_test_micro" and cfg["pretrained_cfg"]["dataset"] == "x"
    assert cfg["model_kwargs"]["sem_window_size"] == 4
    ref, _ = load_parity("fpn/micro_global")
    model = semask.create_model(ARCH, pretrained=str(dst)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ref.input"]), ref["ref.logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_release_tag_full_size(tmp_path):
    """A full-size Swin-T Cityscapes checkpoint in the official layout converts under its tag."""
    torch.manual_seed(0)
    model = semask.create_model(f"{ARCH}.cityscapes")
    sd = dict(model.state_dict())
    sd.update({f"backbone.{k}": v for k, v in model.backbone.named_buffers() if k.endswith("relative_position_index")})
    assert len(sd) == 277  # the official Swin-T FPN checkpoint layout (spec section 6)
    src = tmp_path / "city.pth"
    torch.save({"meta": {"CLASSES": ("road",) * 19, "iter": 80000}, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": []}}, src)
    dst = convert_official_checkpoint(src, tmp_path / "out", f"{ARCH}.cityscapes")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["pretrained_cfg"]["tag"] == "cityscapes" and cfg["num_classes"] == 19
    assert cfg["model_kwargs"] == {"sem_global": [False] * 4}  # shapes matched the tag: nothing adopted
    assert cfg["converted_from"]["official_meta"] == {"iter": 80000}
    loaded = semask.create_model(ARCH, pretrained=str(dst))  # untagged name: the folder's config decides
    assert tuple(loaded.backbone.sem_global) == (False,) * 4 and loaded.num_classes == 19
    assert loaded.pretrained_cfg["dataset"] == "cityscapes"
    mine = loaded.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ failures


def _convert_cli(src: Path, dst: Path, model: str = ARCH, extra=()) -> int:
    return cli(["convert", str(src), str(dst), "--model", model, *extra])


def test_refuses_other_architecture(parity_dir, tmp_path, capsys):
    d2 = parity_dir / "d2" / "mask2former.pth"
    if not d2.exists():
        pytest.skip("d2 fixture absent")
    assert _convert_cli(d2, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "not a SeMask-FPN (mmseg) checkpoint" in err and "detectron2" in err
    _assert_nothing_written(tmp_path / "out")


def test_refuses_shape_mismatch_with_the_tag(parity_dir, tmp_path, capsys):
    """A K=7 embed-32 checkpoint under a K=7 tag of the tiny (embed 96) architecture."""
    from semask.models._registry import PretrainedCfg, _pretrained_cfgs, register_pretrained_cfgs

    register_pretrained_cfgs(ARCH, {"_test_k7": PretrainedCfg(num_classes=7, arch_kwargs=dict(sem_global=False))})
    try:
        assert _convert_cli(_pth(parity_dir, "micro_windowed"), tmp_path / "out", f"{ARCH}._test_k7") == 1
    finally:
        del _pretrained_cfgs[ARCH]["_test_k7"]
    err = capsys.readouterr().err
    assert "does not fit semask_swin_tiny_fpn._test_k7" in err and "embed_dim: checkpoint 32, model 96" in err
    _assert_nothing_written(tmp_path / "out")


def test_refuses_class_count_mismatch(parity_dir, tmp_path, capsys):
    assert _convert_cli(_pth(parity_dir, "micro_global"), tmp_path / "out", f"{ARCH}.ade20k") == 1
    err = capsys.readouterr().err
    assert "K=21" in err and "expects K=150" in err
    _assert_nothing_written(tmp_path / "out")


def test_refuses_truncated_file(parity_dir, tmp_path, capsys):
    data = _pth(parity_dir, "micro_global").read_bytes()
    src = tmp_path / "truncated.pth"
    src.write_bytes(data[: len(data) // 2])
    assert _convert_cli(src, tmp_path / "out", extra=FIXTURE_ARGS["micro_global"]) == 1
    assert "truncated" in capsys.readouterr().err
    _assert_nothing_written(tmp_path / "out")


class _Payload:
    """Unpickling this would create a file (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_refuses_pickled_objects_without_running_them(parity_dir, tmp_path, capsys):
    sd, _ = load_official_checkpoint(_pth(parity_dir, "micro_global"))
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": _Payload(marker)}, "state_dict": sd}, src)
    assert not marker.exists()
    assert _convert_cli(src, tmp_path / "out", extra=FIXTURE_ARGS["micro_global"]) == 1
    err = capsys.readouterr().err
    assert "not tensors" in err and "io.open" in err and "NOT loaded" in err
    assert not marker.exists()
    _assert_nothing_written(tmp_path / "out")


def test_reports_missing_and_unexpected_tensors(parity_dir, tmp_path, capsys):
    sd, _ = load_official_checkpoint(_pth(parity_dir, "micro_global"))
    del sd["backbone.layers.1.semantic_layer.norm1.bias"]
    sd["decode_head.extra.weight"] = torch.zeros(3)
    sd["backbone.layers.0.blocks.0.attn.qkv.bias"] = torch.zeros(5)
    src = tmp_path / "broken.pth"
    torch.save({"state_dict": sd}, src)
    with pytest.raises(ConversionError) as info:
        convert_official_checkpoint(src, tmp_path / "out", ARCH, sem_global=(False, False, True))
    report = info.value.report
    assert report.missing == ["backbone.layers.1.semantic_layer.norm1.bias"]
    assert report.unexpected == ["decode_head.extra.weight"]
    assert report.shape_mismatches == [("backbone.layers.0.blocks.0.attn.qkv.bias", (5,), (288,))]
    msg = str(info.value)
    assert "missing (model tensors not filled) (1)" in msg and "unexpected (checkpoint tensors not used) (1)" in msg
    _assert_nothing_written(tmp_path / "out")
    assert _convert_cli(src, tmp_path / "out", extra=["--sem-global", "W,W,G"]) == 1
    _assert_nothing_written(tmp_path / "out")


def test_stage_pattern_must_be_given_for_other_stage_counts(parity_dir, tmp_path, capsys):
    assert _convert_cli(_pth(parity_dir, "micro_global"), tmp_path / "out") == 1
    assert "has 3 stages" in capsys.readouterr().err
    _assert_nothing_written(tmp_path / "out")
    with pytest.raises(SystemExit):
        cli(["convert", "a.pth", "b", "--model", ARCH, "--sem-global", "W,X"])


def test_existing_output_and_overwrite(parity_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_official_checkpoint(_pth(parity_dir, "micro_windowed"), dst, ARCH, sem_global=False)
    assert (dst / "keep.txt").read_text() == "mine"
    convert_official_checkpoint(_pth(parity_dir, "micro_windowed"), dst, ARCH, sem_global=False, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_writing_leaves_nothing(parity_dir, tmp_path, monkeypatch):
    import semask.hub.convert as hub_convert

    def disk_full(model, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(hub_convert, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_official_checkpoint(_pth(parity_dir, "micro_windowed"), tmp_path / "new" / "deeper" / "out", ARCH,
                                    sem_global=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder, its temp copy, nor the parents it created


def test_bare_and_ddp_state_dicts(parity_dir, tmp_path):
    sd, _ = load_official_checkpoint(_pth(parity_dir, "micro_windowed"))
    src = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, src)
    got, meta = load_official_checkpoint(src)
    assert meta == {} and got.keys() == sd.keys()
    with pytest.raises(ValueError, match="no tensors"):
        torch.save({"state_dict": {}}, tmp_path / "empty.pth")
        load_official_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "nope.pth")


def test_numpy_values_in_meta_are_data_not_code(parity_dir, tmp_path):
    """mmcv stores numpy scalars in ``meta``; they load (also as numpy-1.x pickles) without unpickling code."""
    import zipfile

    import numpy as np

    sd, _ = load_official_checkpoint(_pth(parity_dir, "micro_windowed"))
    src = tmp_path / "np2.pth"
    torch.save({"meta": {"iter": np.int64(80000), "hook_msgs": {"best_score": np.float64(0.5)},
                         "PALETTE": np.arange(21).reshape(7, 3)}, "state_dict": sd}, src)
    old = tmp_path / "np1.pth"  # the same file as numpy 1.x names the globals (official files)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(old, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data.replace(b"numpy._core.", b"numpy.core.") if name.endswith("data.pkl") else data)
    for path in (src, old):
        _, meta = load_official_checkpoint(path)
        assert meta["hook_msgs"]["best_score"] == 0.5 and meta["PALETTE"].shape == (7, 3)
    dst = convert_official_checkpoint(old, tmp_path / "out", ARCH, sem_global=False)
    assert json.loads((dst / "config.json").read_text())["converted_from"]["official_meta"] == {"iter": 80000}


def test_push_to_hub_uploads_the_folder(parity_dir, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, **kw):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw.get("exist_ok")))

        def upload_folder(self, repo_id, folder_path, **kw):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert _convert_cli(_pth(parity_dir, "micro_windowed"), tmp_path / "out",
                        extra=["--sem-global", "W,W,W,W", "--push-to-hub", "me/semask-micro"]) == 0
    assert calls == [("create_repo", "me/semask-micro", True),
                     ("upload_folder", "me/semask-micro", ["README.md", "config.json", "model.safetensors"])]
    assert "me/semask-micro" in (tmp_path / "out" / "README.md").read_text()  # the card points at the repo


def test_infer_swin_kwargs_reads_the_official_presets():
    with torch.device("meta"):
        sd = semask.create_model("semask_swin_base_fpn.ade20k").state_dict()
    got = infer_swin_kwargs(sd)
    assert got["embed_dim"] == 128 and got["depths"] == (2, 2, 18, 2) and got["num_heads"] == (4, 8, 16, 32)
    assert got["window_size"] == 12 and got["num_sem_blocks"] == (1, 1, 1, 1) and got["semantic_layers"]
    assert got["out_indices"] == (0, 1, 2, 3) and got["mlp_ratio"] == 4.0


def test_rules_contract_rename_drop_tied():
    """The per-family contract other families (detectron2 checkpoints) plug into."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pixel_decoder = nn.Linear(2, 3)
            self.gn = nn.GroupNorm(1, 3)
            self.register_buffer("table", torch.arange(4), persistent=False)

    net = Net()
    rules = ConversionRules(
        family="test", required=(), class_keys=(), infer=lambda sd: {},
        rename=(("sem_seg_head.pixel_decoder.", "pixel_decoder."), ("norm.", "gn.")),
        drop=(r"criterion\.empty_weight",), tied=((r"align\.norm\.(.*)", r"norm.\1"),),
    )
    src = {"sem_seg_head.pixel_decoder.weight": torch.ones(3, 2), "sem_seg_head.pixel_decoder.bias": torch.ones(3),
           "norm.weight": torch.ones(3), "norm.bias": torch.zeros(3), "align.norm.weight": torch.ones(3),
           "align.norm.bias": torch.zeros(3), "criterion.empty_weight": torch.ones(5), "table": torch.arange(4)}
    out, report = convert_state_dict(src, net, rules)
    assert report.ok, report.format()
    assert sorted(out) == sorted(net.state_dict())
    assert set(report.dropped) == {"criterion.empty_weight", "table", "align.norm.weight", "align.norm.bias"}
    src["align.norm.bias"] = torch.ones(3)  # a "tied" copy that differs, and a wrong recomputed buffer
    src["table"] = torch.zeros(4, dtype=torch.long)
    _, report = convert_state_dict(src, net, rules)
    assert [k for k, _ in report.value_mismatches] == ["align.norm.bias", "table"]


def test_integer_or_bool_tensors_for_float_weights_are_reported():
    net = nn.Linear(2, 3)
    rules = ConversionRules(family="test", required=(), class_keys=(), infer=lambda sd: {})
    for dtype in (torch.int64, torch.bool):
        out, report = convert_state_dict({"weight": torch.ones(3, 2, dtype=dtype), "bias": torch.ones(3)}, net, rules)
        assert not report.ok and report.value_mismatches == [("weight", f"dtype {dtype} where the model has torch.float32")]
        assert report.missing == [] and "weight" not in out
    out, report = convert_state_dict({"weight": torch.ones(3, 2, dtype=torch.float16), "bias": torch.ones(3)}, net, rules)
    assert report.ok and out["weight"].dtype == torch.float32  # half -> float is a plain cast


def test_family_rules_are_registered_next_to_their_models():
    from semask.core.registry import get_conversion_rules
    from semask.models.fpn import FPN_CONVERSION_RULES
    from semask.models.mask_former import D2_CONVERSION_RULES

    assert get_conversion_rules("semask_swin_tiny_fpn") is FPN_CONVERSION_RULES
    assert get_conversion_rules("semask_swin_large_mask2former") is D2_CONVERSION_RULES
    with pytest.raises(ValueError, match="no converter for 'semask_mit_b0_segformer'"):
        get_conversion_rules("semask_mit_b0_segformer")
