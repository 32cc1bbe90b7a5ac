"""Loading files we did not write: the user's weights are used, nothing is unpickled, and every bad
input gives an error that names the file and the fix (offline: temp Hub caches only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import semask
from semask.cli import main as cli
from _fake_hub import add_to_fake_hub

TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, fpn_channels=8,
            drop_path_rate=0.0)
TIMM = "convnext_atto"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = semask.create_model("semask_swin_tiny_fpn", **TINY)
    return model, model.save_pretrained(tmp_path / "saved")


class _Evil:
    """Unpickling this would create ``marker``: proof that nothing was executed when it does not exist."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_file(path: Path, marker: Path) -> Path:
    evil = _Evil()
    evil.marker = str(marker)
    torch.save({"state_dict": {"w": torch.zeros(1), "x": evil}}, path)
    return path


def _timm_weights(seed: int = 1) -> dict:
    torch.manual_seed(seed)
    m = timm.create_model(TIMM, pretrained=False)
    return {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}


def _trunk(model) -> dict:
    return {k: v for k, v in model.backbone.model.state_dict().items()}


# ------------------------------------------------ pretrained_backbone of wrapped timm backbones (6, 9)
def test_wrapped_timm_backbone_loads_the_users_file(tmp_path, hub):
    weights = _timm_weights()
    save_file(weights, str(tmp_path / "mine.safetensors"))
    model = semask.create_model("semask_fpn", backbone=TIMM, num_classes=3,
                                pretrained_backbone=str(tmp_path / "mine.safetensors"))
    trunk = _trunk(model)
    checked = [k for k in weights if k in trunk]
    assert len(checked) > 50
    for k in checked:
        assert torch.equal(trunk[k], weights[k]), k


def test_wrapped_timm_backbone_reads_a_pth_safely(tmp_path, hub):
    weights = _timm_weights(2)
    torch.save({"state_dict": weights}, tmp_path / "mine.pth")
    model = semask.create_model("semask_fpn", backbone=TIMM, num_classes=3, pretrained_backbone=str(tmp_path / "mine.pth"))
    assert torch.equal(_trunk(model)["stem.0.weight"], weights["stem.0.weight"])
    marker = tmp_path / "ran"
    _evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match=r"evil\.pth holds pickled Python objects .* NOT loaded"):
        semask.create_model("semask_fpn", backbone=TIMM, pretrained_backbone=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_timm_default_weights_go_through_the_safe_loader(tmp_path, hub, monkeypatch):
    hub_id = timm.get_pretrained_cfg(TIMM).hf_hub_id  # timm/convnext_atto.d2_in1k
    weights = _timm_weights(3)
    save_file(weights, str(tmp_path / "w.safetensors"))
    add_to_fake_hub(hub, hub_id, {"model.safetensors": tmp_path / "w.safetensors"})
    model = semask.create_model("semask_fpn", backbone=TIMM, num_classes=3, pretrained_backbone=True)
    assert torch.equal(_trunk(model)["stem.0.weight"], weights["stem.0.weight"])
    # a repo with only a pickle: read with weights_only (refused, never run), whatever torch/timm do by default
    marker = tmp_path / "ran"
    _evil_file(tmp_path / "evil.bin", marker)
    other = hub / "other"
    other.mkdir()
    add_to_fake_hub(other, hub_id, {"pytorch_model.bin": tmp_path / "evil.bin"})
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin holds pickled Python objects .* NOT loaded"):
        semask.create_model("semask_fpn", backbone=TIMM, pretrained_backbone=True)
    assert not marker.exists()


def test_timm_entry_point_semask_wrap_uses_the_safe_loader(tmp_path, hub):
    weights = _timm_weights(4)
    add_to_fake_hub(hub, timm.get_pretrained_cfg(TIMM).hf_hub_id, {"model.safetensors": _st(tmp_path, weights)})
    m = timm.create_model("semask_wrap", backbone=TIMM, num_classes=3, pretrained=True)
    assert torch.equal(m.model.state_dict()["stem.0.weight"], weights["stem.0.weight"])


def _st(tmp_path: Path, state: dict, name: str = "w.safetensors") -> Path:
    save_file(state, str(tmp_path / name))
    return tmp_path / name


def test_wrapped_timm_weights_of_another_architecture(tmp_path, hub):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors do not fit the timm model"):
        semask.create_model("semask_fpn", backbone=TIMM, pretrained_backbone=str(tmp_path / "other.safetensors"))


# ---------------------------------------------------------------------------- Swin / MiT backbones
def test_swin_pretrained_backbone_pth_is_read_not_called_corrupt(tmp_path, hub):
    torch.manual_seed(5)
    src = semask.create_model("semask_swin_tiny", **{k: v for k, v in TINY.items() if k != "fpn_channels"})
    sd = {k: v + 0.5 for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "swin.pth")
    model = semask.create_model("semask_swin_tiny_fpn", pretrained_backbone=str(tmp_path / "swin.pth"), **TINY)
    got = model.backbone.state_dict()
    assert torch.equal(got["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(got["layers.0.blocks.0.attn.qkv.weight"], sd["layers.0.blocks.0.attn.qkv.weight"])


def test_corrupt_safetensors_as_pretrained_backbone(tmp_path, hub):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name, kw in (("semask_mit_b0_segformer", {}), ("semask_swin_tiny_fpn", TINY)):
        with pytest.raises(ValueError, match=r"cannot read .*bad\.safetensors: the file is corrupt or truncated"):
            semask.create_model(name, pretrained_backbone=str(tmp_path / "bad.safetensors"), **kw)


def test_mit_weights_missing_offline_name_the_repo(hub):
    with pytest.raises(FileNotFoundError, match=r"nvidia/mit-b0.*HF_HUB_OFFLINE"):
        semask.create_model("semask_mit_b0_segformer", pretrained_backbone=True)


def test_mit_bin_in_a_folder_is_read_safely(tmp_path, hub):
    marker = tmp_path / "ran"
    folder = tmp_path / "mit"
    folder.mkdir()
    _evil_file(folder / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin holds pickled Python objects"):
        semask.create_model("semask_mit_b0_segformer", pretrained_backbone=str(folder))
    assert not marker.exists()


# ------------------------------------------------------------------------------ model folders (8)
@pytest.mark.parametrize("content, match", [
    ("{junk", r"cannot parse .*config\.json .*corrupt or truncated"),
    ("[1, 2]", r"config\.json must hold a JSON object"),
    (json.dumps({"architecture": 123, "num_classes": 150}), r"config\.json: 'architecture' must be a model name"),
    (json.dumps({"architecture": "semask_swin_tiny_fpn", "num_classes": "five"}),
     r"config\.json: 'num_classes' must be a positive integer, got 'five'"),
    (json.dumps({"architecture": "semask_swin_tiny_fpn", "model_kwargs": [1]}), r"'model_kwargs' must be a JSON object"),
])
@pytest.mark.parametrize("how", ["from_pretrained", "create_model"])
def test_bad_config_json(saved, content, match, how):
    _, folder = saved
    (folder / "config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        if how == "from_pretrained":
            semask.from_pretrained(folder)
        else:
            semask.create_model("semask_swin_tiny_fpn", pretrained=str(folder), **TINY)


def test_missing_local_folder_is_not_called_a_bad_hub_id(tmp_path, hub):
    for path in (tmp_path / "no" / "such" / "folder", "./runs/missing-model", "model.safetensors"):
        with pytest.raises(FileNotFoundError, match="no local folder"):
            semask.from_pretrained(path)


def test_integer_and_bool_tensors_do_not_load_into_float_weights(saved):
    model, folder = saved
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    key = "decode_head.conv_seg.weight"
    for dtype in (torch.int64, torch.bool):
        bad = dict(state)
        bad[key] = torch.ones(state[key].shape, dtype=dtype)
        save_file(bad, str(weights))
        with pytest.raises(ValueError, match=rf"{key}: torch\.{str(dtype)[6:]} vs model torch\.float32"):
            semask.from_pretrained(folder)
        target = semask.create_model("semask_swin_tiny_fpn", **TINY)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match="dtype"):
            semask.hub.load_pretrained(target, str(weights))
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


# -------------------------------------------------------------------------------- semask convert
def test_convert_of_a_folder_says_it_is_a_folder(saved, tmp_path, capsys):
    _, folder = saved
    assert cli(["convert", str(folder), str(tmp_path / "out"), "--model", "semask_swin_tiny_fpn"]) != 0
    err = capsys.readouterr().err
    assert "is a folder, not a checkpoint file" in err and "does not exist" not in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_a_missing_file_still_says_so(tmp_path, capsys):
    assert cli(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "out"), "--model", "semask_swin_tiny_fpn"]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_no_file_reader_outside_the_safe_loader():
    """Item 9 as a static check: no torch.load / timm file loader / timm.create_model(pretrained=...)
    anywhere but semask.core.checkpoint (whose torch.load always passes weights_only=True)."""
    import ast

    root = Path(semask.__file__).parent
    readers = {"load_state_dict_from_hf", "load_state_dict_from_url", "load_checkpoint", "load_state_dict"}
    offenders = []
    for path in root.rglob("*.py"):
        safe = path.name == "checkpoint.py" and path.parent.name == "core"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            where = f"{path.relative_to(root)}:{node.lineno}"
            if name == "load" and owner == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not safe or not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{where} torch.load")
            elif (name in readers and owner in ("timm", "models", "_helpers", "_hub")) or (
                    name in ("load_state_dict_from_hf", "load_state_dict_from_url") and owner == ""):
                offenders.append(f"{where} {name}")
            elif name == "create_model" and owner == "timm":
                kw = {k.arg: k.value for k in node.keywords}
                if "pretrained" in kw and not (isinstance(kw["pretrained"], ast.Constant) and kw["pretrained"].value is False):
                    offenders.append(f"{where} timm.create_model(pretrained=...)")
    assert not offenders, offenders
