"""``pretrained=True`` without a published Hub repo: the tag's official release, from a mirror or
Google Drive, converted once into the semask cache and then loaded offline; failures that explain
themselves and leave nothing in the cache; ``semask publish``.

Nothing leaves the machine: the mirror and a Hub that knows no repo are HTTP servers on 127.0.0.1
serving the official-format fixtures under Drive-id names; "no network" is a proxy on a closed
loopback port. The test tags describe the micro fixtures as a release tag describes its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import semask
from semask.cli import main as cli
from semask.data.classes import get_dataset_meta
from semask.hub import official
from semask.hub.convert import convert_official_checkpoint, load_official_checkpoint
from semask.models._registry import PretrainedCfg, _pretrained_cfgs, register_pretrained_cfgs
from conftest import PARITY_DIR, REPO_ROOT, fpn_backbone_kwargs, load_parity
from test_d2_models import fixture_model_kwargs

FPN_ARCH, D2_TAG, FPN_TAG = "semask_swin_tiny_fpn", "_test_official", "_test_official"
FPN_NAME = f"{FPN_ARCH}.{FPN_TAG}"
FPN_ID, D2_ID = "1semaskTestFpnMicroGlobal0001", "1semaskTestMask2FormerAde0001"
FPN_FILE, D2_FILE = PARITY_DIR / "fpn" / "micro_global.pth", PARITY_DIR / "d2" / "mask2former.pth"
HUB_REPO = "semask-test/not-published"
_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
# failure cases: Drive id -> what the mirror serves for it
BAD = {"html": "1semaskTestQuotaPage000001", "truncated": "1semaskTestTruncated00001",
       "cut": "1semaskTestConnCut00000001", "stall": "1semaskTestStalled0000001",
       "other_arch": "1semaskTestOtherArch00001", "sha": "1semaskTestShaMismatch001",
       "missing": "1semaskTestNotInMirror001"}
QUOTA_PAGE = ("<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
              "<p class=\"uc-error-subcaption\">Too many users have viewed or downloaded this file recently. "
              "Please try accessing the file again later.</p></body></html>")


def _meta(name: str) -> Dict[str, str]:
    with safe_open(str(PARITY_DIR / f"{name}.safetensors"), "pt") as f:
        return f.metadata()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fpn_cfg(file_id: str, sha256=None) -> PretrainedCfg:
    kwargs = fpn_backbone_kwargs(_meta("fpn/micro_global"))
    k = kwargs.pop("num_classes")
    kwargs["fpn_channels"] = 32  # the fixture's FPN head width (tests/test_convert.py uses the same)
    return PretrainedCfg(num_classes=k, arch_kwargs=kwargs, dataset="micro21", hf_hub_id=HUB_REPO,
                         source_url=_DRIVE.format(file_id), source_sha256=sha256,
                         class_names=tuple(f"class{i}" for i in range(k)), metrics={"miou": 12.5})


def register_test_tags() -> Tuple[str, str]:
    """Tags for the micro FPN fixture (Hub repo that does not exist, sha256 recorded) and the d2
    Mask2Former fixture (no Hub repo, CC BY-NC like the released d2 weights); returns both names."""
    register_pretrained_cfgs(FPN_ARCH, {FPN_TAG: _fpn_cfg(FPN_ID, _sha(FPN_FILE))})
    register_pretrained_cfgs(FPN_ARCH, {f"_test_bad_{kind}": _fpn_cfg(i, "0" * 64 if kind == "sha" else None)
                                        for kind, i in BAD.items()})
    arch, kwargs = fixture_model_kwargs(_meta("d2/mask2former"))
    k = kwargs.pop("num_classes")
    classes, palette = get_dataset_meta("ade20k")
    register_pretrained_cfgs(arch, {D2_TAG: PretrainedCfg(
        num_classes=k, arch_kwargs=kwargs, dataset="ade20k", class_names=classes, palette=palette,
        source_url=_DRIVE.format(D2_ID), license="cc-by-nc-4.0", metrics={"miou": 56.4, "miou_ms": 57.5})})
    return FPN_NAME, f"{arch}.{D2_TAG}"


# ----------------------------------------------------------------------------------------- servers


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream", length=None, **headers):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.count(self.path)
        self._send(404, b"", X_Error_Code="RepoNotFound")  # what the Hub answers for an unknown repo

    def do_GET(self) -> None:
        srv = self.server
        srv.count(self.path)
        if self.path.startswith("/hub/"):
            body = b"Repository not found"
            self._send(404, body, "text/plain", X_Error_Code="RepoNotFound")
            self.wfile.write(body)
            return
        kind, data = srv.routes.get(self.path, ("missing", b""))
        if kind == "missing":
            self._send(404, b"not found", "text/plain")
            self.wfile.write(b"not found")
        elif kind == "html":
            self._send(200, data, "text/html; charset=utf-8")
            self.wfile.write(data)
        elif kind in ("file", "truncated"):  # "truncated": a half file, served completely
            self._send(200, data)
            self.wfile.write(data)
        elif kind == "slow":  # about a second, so that concurrent loaders overlap
            self._send(200, data)
            step = len(data) // 10 + 1
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                time.sleep(0.1)
        elif kind in ("cut", "stall"):  # announce everything, send half; then drop / go quiet
            self._send(200, data, length=len(data))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if kind == "stall":
                time.sleep(2.0)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: Dict[str, Tuple[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes, self.counts, self._lock = routes, {}, threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_port}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def count(self, path: str) -> None:
        with self._lock:
            self.counts[path] = self.counts.get(path, 0) + 1

    def hits(self, prefix: str) -> int:
        with self._lock:
            return sum(n for p, n in self.counts.items() if p.startswith(prefix))

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _routes(slow: bool = False) -> Dict[str, Tuple[str, bytes]]:
    fpn, d2 = FPN_FILE.read_bytes(), D2_FILE.read_bytes()
    return {
        f"/mirror/{FPN_ID}.pth": ("slow" if slow else "file", fpn),
        f"/mirror/{D2_ID}.pth": ("file", d2),
        f"/mirror/{BAD['html']}.pth": ("html", QUOTA_PAGE.encode()),
        f"/mirror/{BAD['truncated']}.pth": ("truncated", fpn[: len(fpn) // 2]),
        f"/mirror/{BAD['cut']}.pth": ("cut", fpn),
        f"/mirror/{BAD['stall']}.pth": ("stall", fpn),
        f"/mirror/{BAD['other_arch']}.pth": ("file", d2),
        f"/mirror/{BAD['sha']}.pth": ("file", fpn),
    }


@pytest.fixture(scope="module")
def tags(parity_dir):
    names = register_test_tags()
    yield names
    for arch in (FPN_ARCH, names[1].split(".")[0]):
        for tag in [t for t in _pretrained_cfgs[arch] if t.startswith("_test_")]:
            del _pretrained_cfgs[arch][tag]


@pytest.fixture(scope="module")
def server(tags):
    srv = _Server(_routes())
    yield srv
    srv.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends


@pytest.fixture
def env(tmp_path, monkeypatch, server):
    """Empty semask and Hub caches, a Hub that has no such repo, the mirror on 127.0.0.1."""
    from huggingface_hub import constants

    cache = tmp_path / "semask-cache"
    monkeypatch.setenv("SEMASK_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("SEMASK_WEIGHTS_MIRROR", f"{server.url}/mirror")
    monkeypatch.setenv("SEMASK_DOWNLOAD_RETRIES", "0")
    hub = f"{server.url}/hub"  # huggingface_hub read HF_ENDPOINT at import: point its constants there too
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.setattr(constants, "ENDPOINT", hub)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub + "/{repo_id}/resolve/{revision}/{filename}")
    return cache


def _cache_entries(cache: Path) -> list:
    """Everything in the cache except the per-tag lock files."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if ".locks" not in p.parts) \
        if cache.exists() else []


def _fpn_logits(model: torch.nn.Module) -> None:
    ref, _ = load_parity("fpn/micro_global")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ref["ref.input"]), ref["ref.logits"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- success


def test_every_official_tag_has_the_route():
    from semask.commands.publish import official_tags

    names = [n for n in official_tags() if "._test" not in n]
    assert len([n for n in names if n.endswith(("ade20k", "cityscapes", "coco_stuff10k")) and "_fpn." in n]) == 12
    assert sorted(n for n in names if "_fpn." not in n) == [
        "semask_swin_large_fapn_mask2former.ade20k", "semask_swin_large_mask2former.ade20k",
        "semask_swin_large_mask2former.cityscapes", "semask_swin_large_maskformer.ade20k",
        "semask_swin_large_msfapn_mask2former.ade20k"]
    for n in names:
        cfg = semask.get_pretrained_cfg(n)
        assert official.has_official_release(cfg) and official.drive_file_id(cfg.source_url) in cfg.source_url


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("SEMASK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert official.cache_root() == tmp_path / "xdg" / "semask"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert official.cache_root() == Path.home() / ".cache" / "semask"
    monkeypatch.setenv("SEMASK_CACHE", str(tmp_path / "mine"))
    assert official.cache_root() == tmp_path / "mine"


def test_fpn_via_mirror_then_from_the_cache_offline_with_the_server_stopped(env, tags, server, monkeypatch, caplog):
    srv = _Server(_routes())  # a mirror of its own, to be stopped (the Hub stays on `server`)
    monkeypatch.setenv("SEMASK_WEIGHTS_MIRROR", f"{srv.url}/mirror/")
    hub_before = server.hits("/hub/")
    try:
        with caplog.at_level(logging.INFO, logger="semask.hub"):
            _fpn_logits(semask.create_model(FPN_NAME, pretrained=True))
        # the Hub was asked first (it has no such repo), then the mirror
        assert server.hits("/hub/") > hub_before and srv.hits(f"/mirror/{FPN_ID}.pth") == 1
        loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"loaded 114 tensors into {FPN_NAME} ")]
        assert len(loaded) == 1 and "official release https://drive.google.com/file/d/" + FPN_ID in loaded[0]
        assert f"via mirror {srv.url}/mirror/{FPN_ID}.pth" in loaded[0] and "CC BY-NC" not in loaded[0]
        folder = env / "models" / FPN_NAME
        assert _cache_entries(env) == ["models", f"models/{FPN_NAME}"] + [
            f"models/{FPN_NAME}/{f}" for f in ("README.md", "config.json", "model.safetensors", "source.json")]
        note = json.loads((folder / "source.json").read_text())
        assert note["sha256"] == _sha(FPN_FILE) and note["official_url"] == _DRIVE.format(FPN_ID)
        assert note["fetched_from"] == f"{srv.url}/mirror/{FPN_ID}.pth"
        assert json.loads((folder / "config.json").read_text())["converted_from"]["sha256"] == note["sha256"]
        before, hub_before = dict(srv.counts), server.hits("/hub/")
        _fpn_logits(semask.create_model(FPN_NAME, pretrained=True))  # online, servers up: no request at all
        assert srv.counts == before and server.hits("/hub/") == hub_before
    finally:
        srv.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fpn_logits(semask.create_model(FPN_NAME, pretrained=True))
    # a different K for finetuning starts from the cached release too
    assert semask.create_model(FPN_NAME, pretrained=True, num_classes=3).num_classes == 3


def test_d2_family_via_mirror_logs_the_cc_by_nc_origin(env, tags, server, caplog):
    d2_name = tags[1]
    hub_before = server.hits("/hub/")
    with caplog.at_level(logging.INFO, logger="semask.hub"):
        model = semask.create_model(d2_name, pretrained=True).eval()
    ref, _ = load_parity("d2/mask2former")
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ref.input"]), ref["ref.semseg"], atol=1e-4, rtol=1e-4)
    assert server.hits("/hub/") == hub_before  # no hf_hub_id: the Hub is not asked
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ") and d2_name in r.getMessage()][-1]
    assert D2_ID in line and "CC BY-NC 4.0" in line and "non-commercial" in line
    assert model.pretrained_cfg["license"] == "cc-by-nc-4.0"


def test_local_mirror_folder_and_file_url(env, tags, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{FPN_ID}.pth").symlink_to(FPN_FILE)
    for value in (str(mirror), mirror.as_uri()):
        monkeypatch.setenv("SEMASK_CACHE", str(tmp_path / f"cache{len(value)}"))
        monkeypatch.setenv("SEMASK_WEIGHTS_MIRROR", value)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the mirror is the user's own copy: used offline too
        _fpn_logits(semask.create_model(FPN_NAME, pretrained=True))


_CHILD = r"""
import logging, os, sys, time
from pathlib import Path
sys.path[:0] = [os.environ["T_TESTS"]]
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import semask
from test_official_weights import _fpn_logits, register_test_tags
name = register_test_tags()[0]
(Path(os.environ["T_BARRIER"]) / "child").touch()
while not (Path(os.environ["T_BARRIER"]) / "parent").exists():
    time.sleep(0.002)
_fpn_logits(semask.create_model(name, pretrained=True))
print("LOADED")
"""


def test_two_processes_download_once_and_both_load(env, tags, tmp_path, monkeypatch, caplog):
    """This process and a child start loading at the same moment (as torchrun ranks do)."""
    srv = _Server(_routes(slow=True))
    monkeypatch.setenv("SEMASK_WEIGHTS_MIRROR", f"{srv.url}/mirror")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    child_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    child_env.update(PYTHONPATH=str(REPO_ROOT), T_TESTS=str(REPO_ROOT / "tests"), T_BARRIER=str(barrier),
                     HF_HUB_DISABLE_PROGRESS_BARS="1")
    try:
        child = subprocess.Popen([sys.executable, "-c", _CHILD], env=child_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (barrier / "child").exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        (barrier / "parent").touch()
        with caplog.at_level(logging.WARNING, logger="semask.hub"):
            _fpn_logits(semask.create_model(FPN_NAME, pretrained=True))
        out, err = child.communicate(timeout=120)
    finally:
        srv.stop()
    assert child.returncode == 0 and "LOADED" in out, err[-2000:]
    assert srv.hits(f"/mirror/{FPN_ID}.pth") == 1  # one download for both
    # one of the two fetched; the other waited on the lock (or, if it came late, found the folder)
    logs = [err] + [r.getMessage() for r in caplog.records]
    assert sum(m.count("fetching the official checkpoint") for m in logs) == 1
    assert sum(m.count("another process is fetching it") for m in logs) <= 1
    assert (env / "models" / FPN_NAME / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- failures

_EXPECT = {
    "html": ("a web page", "'Google Drive - Quota exceeded'"),
    "truncated": ("truncated",),
    "cut": ("the download broke off", "Download is incomplete"),
    "stall": ("the server stopped sending data", "SEMASK_DOWNLOAD_TIMEOUT"),
    "other_arch": ("is not a SeMask-FPN (mmseg) checkpoint", "detectron2"),
    "sha": ("sha256 mismatch", "0" * 64),
    "missing": ("404",),
}


@pytest.mark.parametrize("kind", list(_EXPECT))
def test_failures_explain_and_leave_nothing(env, tags, server, kind, monkeypatch):
    monkeypatch.setenv("SEMASK_DOWNLOAD_TIMEOUT", "0.5")
    name = f"{FPN_ARCH}._test_bad_{kind}"
    with pytest.raises(official.OfficialWeightsError) as info:
        semask.create_model(name, pretrained=True)
    msg = str(info.value)
    for text in _EXPECT[kind]:
        assert text in msg, (text, msg)
    url = f"{server.url}/mirror/{BAD[kind]}.pth"
    assert f"Hub repo {HUB_REPO}" in msg and url in msg  # what was tried ...
    assert f"cache {env / 'models' / name}: no converted copy" in msg
    assert "semask convert FILE DIR --model " + name in msg and f"{BAD[kind]}.pth" in msg  # ... and the way out
    assert "SEMASK_WEIGHTS_MIRROR" in msg and _DRIVE.format(BAD[kind]) in msg
    assert _cache_entries(env) == ["models"]  # no folder, no partial download or conversion


def test_drive_pages_and_no_network_without_mirror(env, tags, monkeypatch):
    """Without a mirror the file comes from Google Drive through gdown; what Drive does wrong is named."""
    import gdown
    from gdown.download import get_url_from_gdrive_confirmation

    monkeypatch.delenv("SEMASK_WEIGHTS_MIRROR")
    name = f"{FPN_ARCH}._test_bad_html"
    calls, real_download = [], gdown.download

    def quota(id=None, output=None, **kw):  # gdown's own reading of Drive's quota page
        calls.append(id)
        get_url_from_gdrive_confirmation(QUOTA_PAGE)

    monkeypatch.setattr(gdown, "download", quota)
    with pytest.raises(official.OfficialWeightsError) as info:
        semask.create_model(name, pretrained=True)
    msg = str(info.value)
    assert calls == [BAD["html"]] and f"Google Drive file id {BAD['html']}" in msg
    assert "Google Drive did not hand out the file" in msg and "Too many users" in msg
    assert "open https://drive.google.com/file/d/" in msg and "semask convert FILE DIR" in msg

    def sign_in_page(id=None, output=None, **kw):  # a page saved as if it were the file
        Path(output).write_text("<html><head><title>Google Drive: Sign-in</title></head></html>")
        return output

    monkeypatch.setattr(gdown, "download", sign_in_page)
    with pytest.raises(official.OfficialWeightsError, match=r"a web page .*'Google Drive: Sign-in'"):
        semask.create_model(name, pretrained=True)
    assert _cache_entries(env) == ["models"]

    # the real gdown, and no network: connections to anything but 127.0.0.1 go to a closed loopback port
    monkeypatch.setattr(gdown, "download", real_download)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(official.OfficialWeightsError) as info:
        semask.create_model(name, pretrained=True)
    msg = str(info.value)
    assert f"official release {_DRIVE.format(BAD['html'])} (Google Drive file id {BAD['html']}): cannot connect" in msg
    assert f"Hub repo {HUB_REPO}" in msg and "cache " in msg and _cache_entries(env) == ["models"]


@pytest.mark.slow
def test_no_network_at_all(env, tags, monkeypatch):
    """The Hub at a closed loopback port too (huggingface_hub retries for about 20 s first)."""
    from huggingface_hub import constants

    monkeypatch.delenv("SEMASK_WEIGHTS_MIRROR")
    hub = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", hub)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub + "/{repo_id}/resolve/{revision}/{filename}")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with pytest.raises(official.OfficialWeightsError) as info:
        semask.create_model(FPN_NAME, pretrained=True)
    msg = str(info.value)
    assert f"Hub repo {HUB_REPO}: cannot download config.json" in msg and "the Hub is unreachable" in msg
    assert f"(Google Drive file id {FPN_ID}): cannot connect" in msg and "no converted copy" in msg
    assert _cache_entries(env) == ["models"]


def test_offline_without_mirror_contacts_nothing(env, tags, server, monkeypatch):
    import gdown

    monkeypatch.delenv("SEMASK_WEIGHTS_MIRROR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(gdown, "download", lambda *a, **k: pytest.fail("Google Drive must not be contacted"))
    before = dict(server.counts)
    with pytest.raises(FileNotFoundError) as info:  # OfficialWeightsError is a FileNotFoundError
        semask.create_model(FPN_NAME, pretrained=True)
    msg = str(info.value)
    assert "not contacted, HF_HUB_OFFLINE is set" in msg and "not in the Hugging Face cache" in msg
    assert server.counts == before and not (env / "models").exists()


# ---------------------------------------------------------------------- real checkpoint contents


def test_real_checkpoint_extras_load_and_convert(tmp_path):
    """mmseg files carry meta (config text, CLASSES, PALETTE, versions, numpy scores) and the
    optimizer; detectron2 files model/optimizer/scheduler/iteration, sometimes numpy arrays."""
    import numpy as np

    mm = torch.load(FPN_FILE, map_location="cpu", weights_only=True)
    params = [torch.nn.Parameter(v.clone()) for v in list(mm["state_dict"].values())[:4] if v.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=6e-5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    meta = dict(mmseg_version="0.11.0+4b1e0ab", mmcv_version="1.3.0", config="norm_cfg = dict(type='SyncBN')\n",
                CLASSES=tuple(f"c{i}" for i in range(21)), PALETTE=[[i, 2 * i, 3 * i] for i in range(21)],
                env_info="sys.platform: linux", seed=0, exp_name="semfpn.py", time="Wed Dec 15 10:00:00 2021",
                iter=80000, epoch=1, hook_msgs=dict(last_ckpt="iter_80000.pth", best_score=np.float64(0.42)))
    torch.save({"meta": meta, "state_dict": mm["state_dict"], "optimizer": opt.state_dict()}, tmp_path / "mm.pth")
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=160000, power=0.9)
    d2 = torch.load(D2_FILE, map_location="cpu", weights_only=True)["model"]
    as_numpy = {k: v.numpy() for k, v in d2.items()}
    torch.save({"model": as_numpy, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "iteration": 159999, "__author__": "SeMask"}, tmp_path / "d2.pth")

    sd, m = load_official_checkpoint(tmp_path / "mm.pth")
    assert m["CLASSES"][3] == "c3" and len(sd) == len(mm["state_dict"])
    sd, _ = load_official_checkpoint(tmp_path / "d2.pth")
    assert sd.keys() == d2.keys() and all(torch.equal(sd[k], d2[k]) and sd[k].dtype == d2[k].dtype for k in d2)
    # both convert, tensor for tensor, into what the plain official files hold
    out = convert_official_checkpoint(tmp_path / "mm.pth", tmp_path / "out", FPN_ARCH, sem_global=(False, False, True),
                                      sem_window_size=4)
    assert official.compare_with_source(out, FPN_FILE) == 114
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["class_names"][20] == "c20"
    arch, kwargs = fixture_model_kwargs(_meta("d2/mask2former"))
    out = convert_official_checkpoint(tmp_path / "d2.pth", tmp_path / "d2out", arch,
                                      sem_global=tuple(kwargs["sem_global"]), sem_window_size=kwargs["sem_window_size"])
    assert official.compare_with_source(out, D2_FILE) == len(load_file(str(out / "model.safetensors"))) > 250
    # the check itself notices a changed tensor
    state = load_file(str(out / "model.safetensors"))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{re.escape(key)}: differs from the official"):
        official.compare_with_source(out, D2_FILE)


def test_numpy_1_pickles_and_the_legacy_format(tmp_path):
    """The official files were written under numpy 1.x (``numpy.core.multiarray``) and some older
    torch files are not zip archives: both load with weights_only=True."""
    import zipfile

    import numpy as np

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int64)}
    torch.save({"model": arrays, "iteration": 3}, tmp_path / "np2.pth")
    with zipfile.ZipFile(tmp_path / "np2.pth") as zin, zipfile.ZipFile(tmp_path / "np1.pth", "w") as zout:
        for n in zin.namelist():
            data = zin.read(n)
            if n.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(n, data)
    torch.save({"model": arrays}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("np1.pth", "legacy.pth"):
        sd, _ = load_official_checkpoint(tmp_path / name)
        assert torch.equal(sd["a"], torch.arange(6.0).reshape(2, 3)) and sd["b"].dtype == torch.int64, name


def test_other_pickled_objects_still_fail_clearly(tmp_path):
    import argparse

    sd = {"backbone.patch_embed.proj.weight": torch.zeros(1)}
    torch.save({"meta": {"args": argparse.Namespace(lr=1)}, "state_dict": sd}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match=r"pickled Python objects that are not tensors \(argparse.Namespace\)"):
        load_official_checkpoint(tmp_path / "obj.pth")


# ------------------------------------------------------------------------------------ publishing


def test_publish_dry_run_writes_verified_folders_and_cards(env, tags, server, tmp_path, capsys):
    out = tmp_path / "publish"
    assert cli(["publish", "--org", "semask-test", "--tags", *tags, "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "published.json").read_text())
    assert sorted(manifest) == sorted(tags)
    for name, entry in manifest.items():
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        n = len(load_file(str(folder / "model.safetensors")))
        assert entry["tensors_verified"] == n and entry["revision"] is None and f"{name}: {n} tensors verified" in printed
        assert entry["repo_id"] == f"semask-test/{name}"
        cfg = semask.get_pretrained_cfg(name)
        src = FPN_FILE if "fpn" in name else D2_FILE
        assert entry["sha256"] == _sha(src)
        card = (folder / "README.md").read_text()
        for text in (f"license: {cfg.license}", f"- classes: {cfg.num_classes}", cfg.class_names[1], "## Citation",
                     "jain2023semask", cfg.source_url, _sha(src), f"semask-test/{name}",
                     f"| {cfg.metrics['miou']} |"):
            assert text in card, (name, text)
        config = json.loads((folder / "config.json").read_text())
        assert config["pretrained_cfg"]["hf_hub_id"] == f"semask-test/{name}"
        assert config["pretrained_cfg"]["source_sha256"] == _sha(src)
    assert "ade20k" in (out / tags[1] / "README.md").read_text()
    assert _cache_entries(env) == []  # publishing does not fill the user cache


def test_publish_pushes_one_commit_per_repo_and_reports_failures(env, tags, server, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: commits.append(("create", repo_id)))

    class Info:
        oid = "c0ffee" * 6 + "abcd"

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kw):
        commits.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return Info()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "publish"
    rc = cli(["publish", "--org", "o", "--tags", tags[0], f"{FPN_ARCH}._test_bad_html", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{FPN_ARCH}._test_bad_html: error:" in err and "web page" in err
    assert commits == [("create", f"o/{tags[0]}"),
                       ("upload", f"o/{tags[0]}", ["README.md", "config.json", "model.safetensors"])]
    assert json.loads((out / "published.json").read_text())[tags[0]]["revision"] == Info.oid
    assert sorted(p.name for p in out.iterdir()) == ["published.json", tags[0]]  # nothing of the failed tag
