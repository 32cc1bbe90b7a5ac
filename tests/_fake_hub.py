"""A Hugging Face Hub cache laid out like huggingface_hub's real one, for offline tests.

``<cache>/models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/<revision>}``: what ``hf_hub_download(..., local_files_only=True)`` resolves.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Optional, Union

FileContent = Union[bytes, str, Path]


def add_to_fake_hub(cache: Path, repo_id: str, files: Dict[str, FileContent], revision: str = "main",
                    commit: Optional[str] = None) -> str:
    """Store ``files`` (name -> bytes / text / path of a file to copy) as a snapshot of ``repo_id``;
    ``refs/<revision>`` points at it. Returns the 40-hex commit hash."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}:{sorted(files)}".encode()).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, Path) else (
            content.encode() if isinstance(content, str) else content)
        sha = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / sha).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(repo_dir / "blobs" / sha, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return commit


def add_model_dir(cache: Path, repo_id: str, folder: Path, revision: str = "main", commit: Optional[str] = None) -> str:
    """Store every file of a saved model folder as a snapshot of ``repo_id``."""
    return add_to_fake_hub(cache, repo_id, {p.name: p for p in Path(folder).iterdir() if p.is_file()},
                           revision, commit)
