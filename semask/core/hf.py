"""Hugging Face Hub access: ``hf-hub:`` names, cache/offline settings and downloads with clear errors.

Everything goes through ``huggingface_hub.hf_hub_download`` (its cache layout, revision pinning and
progress bar). ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are re-read at every call (huggingface_hub
reads them once, at import), so setting them at run time works too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

from ..version import __version__

__all__ = ["HUB_PREFIX", "parse_hub_name", "is_offline", "resolve_cache_dir", "hub_download"]

HUB_PREFIX = "hf-hub:"
_TRUE = {"1", "true", "yes", "on"}


def parse_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """``hf-hub:org/repo[@rev]`` or ``org/repo[@rev]`` -> (repo_id, revision or None)."""
    body = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    repo_id, _, revision = body.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{name!r} is not a Hub model id: expected 'hf-hub:org/repo' or 'hf-hub:org/repo@revision'")
    return repo_id, revision or None


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was set at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """``cache_dir`` if given, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    from huggingface_hub import constants

    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_download(
    repo_id: str,
    filename: str,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    force_download: bool = False,
) -> Path:
    """Local path of ``filename`` from ``repo_id`` at ``revision`` (branch, tag or commit), downloading it
    into the Hub cache when needed. Hub errors become FileNotFoundError / ValueError saying what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline()
    cache = resolve_cache_dir(cache_dir)
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache, local_files_only=offline,
            force_download=force_download, library_name="semask", library_version=__version__,
        ))
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass
        if offline:
            msg = (f"{filename} of Hub repo {where} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE "
                   f"is set, so it cannot be downloaded. Unset HF_HUB_OFFLINE to download it, or fetch it "
                   f"elsewhere (`hf download {repo_id} {filename}`) into this cache (HF_HUB_CACHE / cache_dir), "
                   f"or pass pretrained=<local folder with config.json and model.safetensors>.")
        else:
            msg = (f"cannot download {filename} from Hub repo {where} (the Hub is unreachable and the cache {cache} "
                   f"has no copy). Check the network / HF_ENDPOINT, or set HF_HUB_OFFLINE=1 and point "
                   f"HF_HUB_CACHE / cache_dir at a cache that holds it.")
        raise FileNotFoundError(msg) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}; pass an existing branch, tag "
                                "or commit hash as revision=") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id} does not exist or is private/gated: check the id (see "
                                "semask.get_pretrained_cfg(name).hf_hub_id) or log in with `hf auth login`.") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {where} has no {filename}. semask loads safetensors only: publish "
                                "config.json + model.safetensors with `semask convert --push-to-hub` or "
                                "model.push_to_hub(repo_id).") from e
    except HFValidationError as e:
        raise ValueError(f"invalid Hub repo id or revision {where!r}: {e}") from e
