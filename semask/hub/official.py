"""Official releases behind ``pretrained=True``: fetched once, converted, cached, then loaded offline.

When a tag's Hub repo cannot be read (not published yet, Hub unreachable, ``HF_HUB_OFFLINE=1`` with
an empty Hub cache), ``pretrained=True`` takes the tag's official checkpoint (``cfg.source_url``, a
Google Drive file) instead:

1. the file comes from ``$SEMASK_WEIGHTS_MIRROR/<drive file id>.pth`` when that variable is set (an
   ``http(s)://`` or ``file://`` URL prefix, or a local folder; used also under ``HF_HUB_OFFLINE=1``),
   else from Google Drive through ``gdown`` (progress bar, a ``.part`` file renamed only when
   complete); with ``HF_HUB_OFFLINE=1`` and no mirror nothing is contacted;
2. its sha256 is checked against ``cfg.source_sha256`` when the tag records one;
3. :func:`semask.hub.convert.convert_official_checkpoint` converts it (``weights_only=True``, the
   rules of ``semask convert``) and re-reads the result;
4. the folder (``config.json`` + ``model.safetensors`` + ``README.md`` + ``source.json``, the note
   of where the file came from and its sha256) is renamed into
   ``$SEMASK_CACHE/models/<architecture>.<tag>`` (default ``$XDG_CACHE_HOME/semask`` or
   ``~/.cache/semask``) only when everything above succeeded.

A file lock per tag makes concurrent processes (e.g. the ranks of one ``torchrun``) download once:
the others wait and then load the folder. Later calls load the cached folder without any network.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file

from ..version import __version__
from ..core.adapt import RECOMPUTED_BUFFERS
from .convert import convert_official_checkpoint, get_conversion_rules, load_official_checkpoint
from ..core.folder import file_sha256, replace_dir
from ..core.hf import is_offline

__all__ = [
    "ENV_CACHE", "ENV_MIRROR", "SOURCE_NAME", "OfficialWeightsError", "cache_root", "drive_file_id",
    "has_official_release", "official_cache_dir", "cached_official", "fetch_official", "download_official",
    "describe_official", "convert_release", "compare_with_source",
]

_logger = logging.getLogger("semask.hub")

ENV_CACHE = "SEMASK_CACHE"
ENV_MIRROR = "SEMASK_WEIGHTS_MIRROR"
ENV_TIMEOUT = "SEMASK_DOWNLOAD_TIMEOUT"  # seconds without a byte before a download is abandoned
ENV_RETRIES = "SEMASK_DOWNLOAD_RETRIES"  # extra attempts after a dropped connection
SOURCE_NAME = "source.json"
_REQUIRED = ("config.json", "model.safetensors", SOURCE_NAME)
_DRIVE_ID = re.compile(r"(?:/file/d/|/d/|[?&]id=)([\w-]{10,})")
_NON_COMMERCIAL = ("cc-by-nc",)


class OfficialWeightsError(FileNotFoundError):
    """The official release of a tag could not be fetched, checked or converted; the message lists
    what was tried and how to install the file by hand. Nothing was written to the cache."""


# --------------------------------------------------------------------------------------------------
# where things are


def cache_root() -> Path:
    """``$SEMASK_CACHE``, else ``$XDG_CACHE_HOME/semask``, else ``~/.cache/semask``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "semask"


def drive_file_id(url: Optional[str]) -> Optional[str]:
    """The Google Drive file id of a ``drive.google.com`` link (``/file/d/<id>/`` or ``?id=<id>``)."""
    if not url or "drive.google.com" not in url:
        return None
    m = _DRIVE_ID.search(url)
    return m.group(1) if m else None


def has_official_release(cfg: Any) -> bool:
    """True when ``cfg`` names an official file (a Drive link) that a registered converter reads."""
    if cfg is None or not drive_file_id(getattr(cfg, "source_url", None)) or not getattr(cfg, "tag", ""):
        return False
    try:
        get_conversion_rules(cfg.architecture)
    except ValueError:
        return False
    return True


def official_cache_dir(cfg: Any) -> Path:
    """Where the converted official release of ``cfg`` lives (whether or not it is there)."""
    return cache_root() / "models" / cfg.full_name


def _read_note(folder: Path) -> Dict[str, Any]:
    try:
        note = json.loads((folder / SOURCE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def cached_official(cfg: Any) -> Optional[Path]:
    """The cached folder of ``cfg``'s official release if it is complete and of the same file
    (Drive id, and sha256 when the tag records one); None otherwise. Reads nothing from the network."""
    if not has_official_release(cfg):
        return None
    folder = official_cache_dir(cfg)
    if not all((folder / name).is_file() for name in _REQUIRED):
        return None
    note = _read_note(folder)
    if note.get("drive_file_id") != drive_file_id(cfg.source_url):
        return None
    if getattr(cfg, "source_sha256", None) and note.get("sha256") != cfg.source_sha256:
        return None
    return folder


def describe_official(folder: os.PathLike) -> str:
    """One line for the log: which release the folder holds, where it was fetched from, its licence."""
    note = _read_note(Path(folder))
    fetched = note.get("fetched_from")
    text = f"the official release {note.get('official_url', '?')}"
    if fetched and fetched != note.get("official_url"):
        text += f" (via mirror {fetched})"
    text += f", converted and cached at {folder}"
    lic = str(note.get("license") or "")
    if lic.startswith(_NON_COMMERCIAL):
        text += (f"; licence {lic}: these weights descend from CC BY-NC 4.0 training code "
                 "(MaskFormer / Mask2Former), so use them for non-commercial research only")
    return text


# --------------------------------------------------------------------------------------------------
# getting the file


def _mirror_source(mirror: str, file_id: str) -> Tuple[str, Optional[Path]]:
    """(URL or path shown to the user, local path or None for an http(s) URL)."""
    name = f"{file_id}.pth"
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name), None
    if mirror.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(mirror).path)) / name
    else:
        path = Path(mirror).expanduser() / name
    return str(path), path


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError as e:
        raise ValueError(f"{name} must be a number, got {os.environ[name]!r}") from e


def _progress() -> bool:
    """huggingface_hub's switch (``HF_HUB_DISABLE_PROGRESS_BARS``), re-read now as for HF_HUB_OFFLINE."""
    from huggingface_hub.utils import are_progress_bars_disabled

    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower()
    return not (env in ("1", "true", "yes", "on") or are_progress_bars_disabled())


def _gdown(out: Path, *, url: Optional[str] = None, file_id: Optional[str] = None) -> None:
    """Download with gdown: a Drive id (it follows the virus-scan interstitial; quota and sign-in
    pages raise) or a plain URL; written to a ``.part`` file that is renamed to ``out`` when complete."""
    import gdown

    timeout = _env_number(ENV_TIMEOUT, 60.0)
    kwargs: Dict[str, Any] = dict(output=str(out), quiet=not _progress(), timeout=(min(timeout, 30.0), timeout),
                                  retries=int(_env_number(ENV_RETRIES, 2)))
    if file_id is not None:
        gdown.download(id=file_id, **kwargs)
    else:
        gdown.download(url=url, use_cookies=False, **kwargs)


def _title(head: bytes) -> str:
    m = re.search(rb"<title[^>]*>(.*?)</title>", head, re.S | re.I)
    return " ".join(m.group(1).decode("utf-8", "replace").split())[:120] if m else ""


def _sniff(path: Path) -> Optional[str]:
    """None when ``path`` starts like a PyTorch checkpoint (zip or pickle), else what it is."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    text = head.lstrip().lower()
    if text.startswith(b"<"):  # HTML / XML
        title = _title(head)
        return (f"a web page ({size} bytes{', title ' + repr(title) if title else ''}), not the checkpoint: "
                "Google Drive serves such pages for quota limits ('too many users have viewed or downloaded "
                "this file'), virus-scan warnings and sign-in requests")
    if not head:
        return "an empty file"
    return f"a {size}-byte file starting with {head[:16]!r}, which is not a PyTorch checkpoint"


def _reason(e: BaseException) -> str:
    """A short, one-paragraph account of a download failure."""
    text = " ".join(str(e).split())
    name = type(e).__name__
    if name == "FileURLRetrievalError":  # gdown: Drive answered with a page instead of the file
        return f"Google Drive did not hand out the file (gdown: {text[:400]})"
    if "read timed out" in text.lower():
        return f"the server stopped sending data ({text[:200]}; {ENV_TIMEOUT} sets the limit in seconds)"
    if name in ("ConnectionError", "ProxyError", "ConnectTimeout", "SSLError"):
        return f"cannot connect ({name}: {text[:300]}); is there a network?"
    if name in ("ReadTimeout", "Timeout"):
        return f"the server stopped sending data ({name}; {ENV_TIMEOUT} sets the limit in seconds)"
    if name == "HTTPError":
        return f"the server answered {text[:200]}"
    if name == "DownloadError":  # gdown: e.g. fewer bytes than announced (its resume hint does not apply here)
        return f"the download broke off ({text.split(' The received bytes')[0][:300]})"
    return f"{name}: {text[:400]}"


def download_official(cfg: Any, dest_dir: os.PathLike) -> Tuple[Path, str]:
    """The official file of ``cfg``: ``(local path, where it came from)``. From the mirror when
    ``$SEMASK_WEIGHTS_MIRROR`` is set (a local mirror file is used in place), else from Google
    Drive into ``dest_dir`` (only a complete file is ever there). Raises an OSError naming the
    source tried and why it failed."""
    file_id = drive_file_id(cfg.source_url)
    if not file_id:
        raise ValueError(f"{cfg.full_name} has no Google Drive source_url")
    mirror = os.environ.get(ENV_MIRROR)
    out = Path(dest_dir) / f"{file_id}.pth"
    if mirror:
        where, local = _mirror_source(mirror, file_id)
        if local is not None:
            if not local.is_file():
                raise _Attempt(f"mirror {where}", "no such file")
            return local, where
        try:
            _gdown(out, url=where)
        except Exception as e:  # gdown / requests errors of every kind: reported with the URL
            raise _Attempt(f"mirror {where}", _reason(e)) from e
        return out, where
    if is_offline():
        raise _Attempt(f"official release {cfg.source_url}", "not contacted: HF_HUB_OFFLINE is set (set "
                       f"{ENV_MIRROR} to use your own copy offline)")
    try:
        _gdown(out, file_id=file_id)
    except Exception as e:
        raise _Attempt(f"official release {cfg.source_url} (Google Drive file id {file_id})", _reason(e)) from e
    return out, cfg.source_url


class _Attempt(OSError):
    """One source that did not deliver: ``what`` was tried, ``why`` it failed."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")
        self.what, self.why = what, why


# --------------------------------------------------------------------------------------------------
# fetch + convert + install


@contextmanager
def _tag_lock(cfg: Any) -> Iterator[None]:
    """The per-tag lock (``fcntl``-based: released by the OS if its holder dies)."""
    path = cache_root() / ".locks" / f"{cfg.full_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        _logger.warning("%s: another process is fetching it (lock %s); waiting", cfg.full_name, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _manual_route(cfg: Any) -> str:
    file_id = drive_file_id(cfg.source_url)
    return (f"To install it by hand: open {cfg.source_url} in a browser and download the file, then either run "
            f"`semask convert FILE DIR --model {cfg.full_name}` and pass pretrained=DIR, or save it as "
            f"{file_id}.pth in a folder and set {ENV_MIRROR}=<that folder> (then pretrained=True finds it, "
            "offline too).")


def _failure(cfg: Any, tried: List[str], final: Path) -> OfficialWeightsError:
    lines = [f"could not get the pretrained weights of {cfg.full_name}. Tried:"]
    lines += [f"  {i}. {t}" for i, t in enumerate(tried + [f"cache {final}: no converted copy"], 1)]
    lines.append("Nothing was written to the cache. " + _manual_route(cfg))
    return OfficialWeightsError("\n".join(lines))


def _sweep(models: Path, name: str) -> None:
    """Remove staging folders a killed process left for this tag (we hold its lock)."""
    for p in models.glob(f".{name}.*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def convert_release(cfg: Any, src: Path, dst: Path) -> Dict[str, Any]:
    """Check (a checkpoint, not a web page; the recorded sha256) and convert the official file ``src``
    of ``cfg`` into the new folder ``dst``; returns the facts for its source note. Raises ValueError
    (ConversionError for a checkpoint of another architecture) saying what is wrong."""
    what = _sniff(src)
    if what is not None:
        raise ValueError(f"got {what}")
    sha = file_sha256(src)
    expected = getattr(cfg, "source_sha256", None)
    if expected and sha != expected:
        raise ValueError(f"sha256 mismatch: the file has {sha}, the tag records {expected} (a different or damaged "
                         "file)")
    t0 = time.perf_counter()
    convert_official_checkpoint(src, dst, cfg.full_name, verify=True, log=_logger.info)
    note = dict(tag=cfg.full_name, official_url=cfg.source_url, drive_file_id=drive_file_id(cfg.source_url),
                sha256=sha, bytes=src.stat().st_size, license=cfg.license, convert_seconds=round(
                    time.perf_counter() - t0, 3))
    return note


def fetch_official(cfg: Any, hub_error: Optional[BaseException] = None) -> Path:
    """The cached folder of ``cfg``'s official release, fetching and converting it first if needed
    (see the module doc). ``hub_error``: why the Hub route failed (listed in error messages).

    Raises :class:`OfficialWeightsError` (a FileNotFoundError) listing every source tried, with the
    manual route; the cache is then left as it was.
    """
    final = official_cache_dir(cfg)
    hit = cached_official(cfg)
    if hit is not None:
        return hit
    if not cfg.hf_hub_id:
        tried = ["Hub: no repo is published for this tag yet (its hf_hub_id is not set)"]
    else:
        tried = [f"Hub repo {cfg.hf_hub_id}: {' '.join(str(hub_error).split())}"] if hub_error else []
    if is_offline() and not os.environ.get(ENV_MIRROR):
        tried.append(f"official release {cfg.source_url}: not contacted, HF_HUB_OFFLINE is set (a mirror in "
                     f"{ENV_MIRROR} is used offline too)")
        raise _failure(cfg, tried, final)
    models = final.parent
    models.mkdir(parents=True, exist_ok=True)
    with _tag_lock(cfg):
        hit = cached_official(cfg)  # another process may have finished while we waited
        if hit is not None:
            return hit
        _sweep(models, cfg.full_name)
        staging = Path(tempfile.mkdtemp(prefix=f".{cfg.full_name}.", suffix=".partial", dir=models))
        try:
            where = "?"
            try:
                t0 = time.perf_counter()
                mirror = os.environ.get(ENV_MIRROR)
                _logger.warning("%s: fetching the official checkpoint %s (once; it is converted and cached in %s)",
                                cfg.full_name, _mirror_source(mirror, drive_file_id(cfg.source_url))[0] if mirror
                                else cfg.source_url, final)
                src, where = download_official(cfg, staging)
                seconds = time.perf_counter() - t0
                note = convert_release(cfg, src, staging / "model")
            except _Attempt as e:
                raise _failure(cfg, tried + [str(e)], final) from e.__cause__
            except (ValueError, OSError) as e:  # ConversionError is a ValueError: not the tag's checkpoint
                label = "mirror" if os.environ.get(ENV_MIRROR) else "official release"
                msg = str(e).strip().replace("\n", "\n     ")
                raise _failure(cfg, tried + [f"{label} {where}: {msg}"], final) from e
            note.update(fetched_from=where, download_seconds=round(seconds, 3), semask_version=__version__,
                        fetched_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (staging / "model" / SOURCE_NAME).write_text(json.dumps(note, indent=2) + "\n")
            replace_dir(staging / "model", final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _logger.info("%s: official checkpoint %s (sha256 %s) fetched in %.1f s, converted in %.1f s into %s",
                 cfg.full_name, where, note["sha256"], note["download_seconds"], note["convert_seconds"], final)
    return final


def compare_with_source(folder: os.PathLike, src: os.PathLike) -> int:
    """Check a converted folder against the official file it came from: every tensor of
    ``model.safetensors`` equals the official tensor it was mapped from (the family's renames), and
    every official tensor is accounted for (used, dropped by a rule, a tied duplicate or a buffer the
    model recomputes). Returns the number of tensors compared; raises ValueError listing differences."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    rules = get_conversion_rules(config["architecture"])
    written = load_file(str(folder / "model.safetensors"))
    sd, _ = load_official_checkpoint(src)
    origin: Dict[str, str] = {}  # our key -> official key
    for key in sd:
        if any(re.fullmatch(rx, key) for rx in rules.drop):
            continue
        new = key
        for old, repl in rules.rename:
            if key.startswith(old):
                new = repl + key[len(old):]
                break
        origin.setdefault(new, key)
    bad = []
    for key, value in written.items():
        off = origin.get(key)
        if off is None:
            bad.append(f"{key}: no official tensor maps to it")
        elif sd[off].shape != value.shape or not torch.equal(sd[off].to(value.dtype), value):
            bad.append(f"{key}: differs from the official {off}")
    tied = [rx for rx, _ in rules.tied]
    unused = [off for ours, off in origin.items() if ours not in written and not ours.endswith(RECOMPUTED_BUFFERS)
              and not any(re.fullmatch(rx, off) for rx in tied)]
    bad += [f"{off}: official tensor not in the folder" for off in unused]
    if bad:
        raise ValueError(f"{folder} does not match {src} ({len(bad)} problems): " + "; ".join(bad[:10]))
    return len(written)
