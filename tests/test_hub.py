"""Hub loading, saving and publishing: offline, against a fake Hub cache in huggingface_hub's layout."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import semask
from semask.models import _registry
from _fake_hub import add_model_dir, add_to_fake_hub

TAG = "semask_swin_tiny_fpn.ade20k"
TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, fpn_channels=8,
            drop_path_rate=0.0)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (gamma != 0, BN stats != init) so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(t.abs() + noise.abs() if "running_var" in name else t + noise)
    return model.eval()


def _tiny(seed: int = 0, name: str = TAG, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomise(semask.create_model(name, **{**TINY, **kw}), seed)


@pytest.fixture
def saved(tmp_path):
    """(model, folder) of a tiny randomised FPN model saved with save_pretrained."""
    model = _tiny(0)
    folder = model.save_pretrained(tmp_path / "saved", metrics={"miou": 12.5})
    return model, folder


def _same_state(a: torch.nn.Module, b_state: dict, skip=()) -> None:
    sa = a.state_dict()
    assert set(sa) == set(b_state)
    for k, v in sa.items():
        if k not in skip:
            assert torch.equal(v, b_state[k]), k


def _x(c: int = 3) -> torch.Tensor:
    return torch.randn(1, c, 64, 48, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- saving
def test_save_pretrained_from_pretrained_round_trip(saved):
    model, folder = saved
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "semask_swin_tiny_fpn" and config["num_classes"] == 150
    assert config["metrics"] == {"miou": 12.5}
    loaded = semask.from_pretrained(folder)
    assert type(loaded) is type(model)
    _same_state(loaded, model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_x()), model(_x()))
    assert loaded.pretrained_cfg["class_names"] == model.pretrained_cfg["class_names"]
    again = semask.SeMaskSegmentor.from_pretrained(str(folder))
    _same_state(again, model.state_dict())
    card = (folder / "README.md").read_text()
    for text in ("license: apache-2.0", "library_name: semask", "semask_swin_tiny_fpn.ade20k", "classes: 150",
                 "| mIoU (single scale) | 12.5 |", "0: wall", "jain2023semask", "## Citation", "ade20k"):
        assert text in card, text
    # module-level function == method
    other = semask.save_pretrained(model, folder.parent / "other", model_card=False)
    assert not (other / "README.md").exists()
    assert load_file(str(other / "model.safetensors")).keys() == load_file(str(folder / "model.safetensors")).keys()


def test_pretrained_path_and_safetensors_file(saved):
    model, folder = saved
    for src in (folder, str(folder / "model.safetensors")):
        _same_state(semask.create_model(TAG, pretrained=src, **TINY), model.state_dict())


# ------------------------------------------------------------------------------------- hub loading
def test_pretrained_true_loads_the_tag_from_the_hub_cache(saved, hub, caplog):
    model, folder = saved
    repo = semask.get_pretrained_cfg(TAG).hf_hub_id
    assert repo and repo.count("/") == 1
    add_model_dir(hub, repo, folder)
    with caplog.at_level(logging.INFO, logger="semask.hub"):
        loaded = semask.create_model(TAG, pretrained=True, **TINY)
    _same_state(loaded, load_file(str(folder / "model.safetensors")))
    assert any(repo in r.getMessage() for r in caplog.records)


def test_revision_pinning_and_cache_dir(tmp_path, hub, monkeypatch):
    repo = "semask-test/tiny-fpn"
    monkeypatch.setitem(_registry._pretrained_cfgs["semask_swin_tiny_fpn"], "ade20k",
                        replace(_registry._pretrained_cfgs["semask_swin_tiny_fpn"]["ade20k"], hf_hub_id=repo))
    a, b = _tiny(1), _tiny(2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    add_model_dir(hub, repo, tmp_path / "a", revision="main")
    commit_b = add_model_dir(hub, repo, tmp_path / "b", revision="v1.0")
    _same_state(semask.create_model(TAG, pretrained=True, **TINY), a.state_dict())
    _same_state(semask.create_model(TAG, pretrained=True, revision="v1.0", **TINY), b.state_dict())
    _same_state(semask.create_model(TAG, pretrained=True, revision=commit_b, **TINY), b.state_dict())
    _same_state(semask.create_model(f"hf-hub:{repo}@{commit_b}"), b.state_dict())
    # the cfg's own pin
    monkeypatch.setitem(_registry._pretrained_cfgs["semask_swin_tiny_fpn"], "ade20k",
                        replace(_registry._pretrained_cfgs["semask_swin_tiny_fpn"]["ade20k"], hf_hub_id=repo,
                                hf_hub_revision=commit_b))
    _same_state(semask.create_model(TAG, pretrained=True, **TINY), b.state_dict())
    # cache_dir= instead of HF_HUB_CACHE
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        semask.create_model(TAG, pretrained=True, **TINY)
    _same_state(semask.create_model(TAG, pretrained=True, cache_dir=str(hub), **TINY), b.state_dict())


def test_hf_hub_name_builds_from_config(saved, hub):
    model, folder = saved
    add_model_dir(hub, "someone/my-semask", folder)
    loaded = semask.create_model("hf-hub:someone/my-semask")  # architecture + kwargs from config.json
    _same_state(loaded, model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_x()), model(_x()))
    assert loaded.pretrained_cfg["dataset"] == "ade20k"
    _same_state(semask.from_pretrained("someone/my-semask"), model.state_dict())


# -------------------------------------------------------------------------------------- adaptation
CLASS_KEYS = {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"} | {
    f"backbone.layers.{i}.semantic_layer.class_injection.0.mlp_cls_{qk}.{p}"
    for i in range(4) for qk in "qk" for p in ("weight", "bias")}


def test_num_classes_adaptation(saved, hub, caplog):
    model, folder = saved
    add_model_dir(hub, "someone/my-semask", folder)
    for load in (lambda: semask.from_pretrained(folder, num_classes=7),
                 lambda: semask.create_model("hf-hub:someone/my-semask", num_classes=7),
                 lambda: semask.create_model(TAG, pretrained=folder / "model.safetensors", num_classes=7, **TINY)):
        with caplog.at_level(logging.INFO, logger="semask.hub"):
            caplog.clear()
            m = load()
        state = m.state_dict()
        for k, v in model.state_dict().items():
            if k in CLASS_KEYS:
                assert state[k].shape[0] == 7, k
            else:
                assert torch.equal(state[k], v), k
        assert m.num_classes == 7 and m.backbone.num_classes == 7
        assert state["decode_head.conv_seg.bias"].abs().sum() == 0  # official init: zero bias
        assert any("re-initialised 18 class-dependent" in r.getMessage() for r in caplog.records)
        with torch.no_grad():
            assert m.eval()(_x()).shape == (1, 7, 64, 48)


def test_in_chans_adaptation(saved):
    from timm.models._manipulate import adapt_input_conv

    model, folder = saved
    w = model.state_dict()["backbone.patch_embed.proj.weight"]
    for c in (1, 4):
        m = semask.from_pretrained(folder, in_chans=c)
        got = m.state_dict()["backbone.patch_embed.proj.weight"]
        assert got.shape == (8, c, 4, 4)
        assert torch.allclose(got, adapt_input_conv(c, w))
        with torch.no_grad():
            assert m.eval()(_x(c)).shape == (1, 150, 64, 48)
    assert torch.allclose(semask.from_pretrained(folder, in_chans=1).state_dict()["backbone.patch_embed.proj.weight"],
                          w.sum(1, keepdim=True))


def test_window_adaptation(saved):
    model, folder = saved
    m = semask.from_pretrained(folder, window_size=6)
    key = "backbone.layers.2.blocks.0.attn.relative_position_bias_table"
    old = model.state_dict()[key]  # (7*7, heads) for window 4
    heads = old.shape[1]
    expect = F.interpolate(old.t().reshape(1, heads, 7, 7), size=(11, 11), mode="bicubic", align_corners=False)
    assert torch.allclose(m.state_dict()[key], expect.reshape(heads, 121).t(), atol=1e-6)
    # everything else loaded unchanged
    for k, v in model.state_dict().items():
        if not k.endswith("relative_position_bias_table"):
            assert torch.equal(m.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------- failures
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_corrupt_or_truncated_weights(saved, hub, tmp_path):
    model, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    target = _tiny(5)
    before = _snapshot(target)
    for i, bad in enumerate((data[: len(data) // 2], b"\x00" * 64, b"not safetensors")):
        add_to_fake_hub(hub, f"someone/broken{i}", {"config.json": (folder / "config.json").read_text(),
                                                     "model.safetensors": bad})
        with pytest.raises(ValueError, match="corrupt or truncated"):
            semask.hub.load_pretrained(target, f"hf-hub:someone/broken{i}")
        _same_state(target, before)
    add_to_fake_hub(hub, "someone/badconfig", {"config.json": "{not json", "model.safetensors": data})
    with pytest.raises(ValueError, match="config.json"):
        semask.create_model("hf-hub:someone/badconfig")


def test_config_of_another_architecture(saved, hub, tmp_path):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "semask_swin_base_fpn"
    repo = semask.get_pretrained_cfg(TAG).hf_hub_id
    add_to_fake_hub(hub, repo, {"config.json": json.dumps(config), "model.safetensors": folder / "model.safetensors"})
    with pytest.raises(ValueError, match="semask_swin_base_fpn.*semask.create_model"):
        semask.create_model(TAG, pretrained=True, **TINY)
    add_to_fake_hub(hub, "other/lib", {"config.json": json.dumps({"format": "transformers", "architecture": "x"}),
                                       "model.safetensors": folder / "model.safetensors"})
    with pytest.raises(ValueError, match="not a semask model config"):
        semask.from_pretrained("other/lib")


def test_offline_missing_files_name_repo_and_file(saved, hub, monkeypatch):
    model, folder = saved
    add_to_fake_hub(hub, "someone/half", {"config.json": folder / "config.json"})
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors of Hub repo someone/half .*HF_HUB_OFFLINE"):
        semask.create_model("hf-hub:someone/half")
    with pytest.raises(FileNotFoundError, match=r"config\.json of Hub repo someone/nothing.*no local folder"):
        semask.from_pretrained("someone/nothing")
    # a pickle-only repo is never unpickled: safetensors are required
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    add_to_fake_hub(hub, "someone/pickled", {"config.json": folder / "config.json",
                                             "pytorch_model.bin": b"\x80\x04pickle"})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        semask.create_model("hf-hub:someone/pickled")


def test_unfit_weights_leave_the_model_unchanged(saved, tmp_path):
    model, folder = saved
    state = load_file(str(folder / "model.safetensors"))
    state["backbone.layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    del state["backbone.norm0.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    target = _tiny(3)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"nothing was loaded.*missing.*norm0.*unexpected.*extra.*shape mismatch.*fc1"):
        semask.hub.load_pretrained(target, tmp_path / "bad.safetensors")
    _same_state(target, before)


def test_bad_requests():
    with pytest.raises(ValueError, match="either pretrained"):
        semask.create_model(TAG, pretrained=True, pretrained_backbone=True, **TINY)
    with pytest.raises(ValueError, match="Hub model id"):
        semask.create_model("hf-hub:no-slash")
    with pytest.raises(ValueError, match="no pretrained tag"):
        semask.hub.load_pretrained(_tiny(0), True)


def test_no_hf_hub_id_says_what_to_do(monkeypatch):
    # neither a Hub repo nor an official release (those are fetched: tests/test_official_weights.py)
    monkeypatch.setitem(_registry._pretrained_cfgs["semask_swin_tiny_fpn"], "ade20k",
                        replace(_registry._pretrained_cfgs["semask_swin_tiny_fpn"]["ade20k"], hf_hub_id=None,
                                source_url=None))
    with pytest.raises(ValueError, match="semask convert"):
        semask.create_model(TAG, pretrained=True, **TINY)


# ------------------------------------------------------------------------------------------ publish
def test_push_to_hub_uploads_config_weights_and_card(monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        calls["upload"] = dict(repo_id=repo_id, kw=kw, files={p.name: p.read_bytes() for p in folder.iterdir()})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = _tiny(0)
    assert model.push_to_hub("me/semask-tiny", metrics={"miou": 40.0}, private=True) == "commit-info"
    assert calls["create_repo"] == ("me/semask-tiny", dict(private=True, exist_ok=True))
    up = calls["upload"]
    assert up["repo_id"] == "me/semask-tiny" and up["kw"]["commit_message"] == "Upload SeMask model"
    assert set(up["files"]) == {"config.json", "model.safetensors", "README.md"}
    from safetensors.torch import load as load_bytes

    _same_state(model, load_bytes(up["files"]["model.safetensors"]))
    config = json.loads(up["files"]["config.json"])
    assert config["architecture"] == "semask_swin_tiny_fpn" and config["metrics"] == {"miou": 40.0}
    card = up["files"]["README.md"].decode()
    assert 'semask.create_model("hf-hub:me/semask-tiny")' in card and "| 40.0 |" in card


# ------------------------------------------------------------------------------ MaskFormer family
D2_TINY = dict(num_classes=5, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
               conv_dim=32, mask_dim=16, hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=32, dec_layers=2,
               enc_layers=1)


@pytest.mark.parametrize("arch", ["semask_swin_large_mask2former", "semask_swin_large_maskformer"])
def test_mask_former_save_pretrained_round_trip(arch, tmp_path, monkeypatch):
    from semask.models.mask_former import SeMaskMaskFormer

    torch.manual_seed(0)
    model = _randomise(semask.create_model(arch, **D2_TINY), 0)
    folder = model.save_pretrained(tmp_path / "m2f")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = SeMaskMaskFormer.from_pretrained(folder).eval()
    assert type(loaded) is SeMaskMaskFormer
    _same_state(loaded, model.state_dict())
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(TypeError, match="not a SeMaskSegmentor"):
        semask.SeMaskSegmentor.from_pretrained(folder)
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            pass

        def upload_folder(self, repo_id, folder_path, **kw):
            uploads.append(sorted(p.name for p in Path(folder_path).iterdir()))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model.push_to_hub("someone/m2f")
    assert uploads == [["README.md", "config.json", "model.safetensors"]]


def test_save_pretrained_is_atomic_per_file(tmp_path, monkeypatch):
    """A save interrupted while writing the weights leaves the previous folder as it was."""
    import semask.core.folder as folder

    model = semask.create_model("semask_swin_tiny_fpn", num_classes=5, embed_dim=16, depths=(2, 2, 2, 2),
                                num_heads=(1, 2, 2, 4), fpn_channels=16)
    out = semask.save_pretrained(model, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dies_halfway(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(folder, "save_file", dies_halfway)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        semask.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file, nothing truncated
    reloaded = semask.from_pretrained(out)
    assert not torch.equal(next(reloaded.parameters()), next(model.parameters()))
