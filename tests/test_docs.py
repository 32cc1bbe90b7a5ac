"""Every Python example in README.md and docs/*.md runs, and the docs build with ``mkdocs --strict``."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DOC_FILES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])


_HUB_TAG = re.compile(r"""create_model\(\s*["']([\w]+\.[\w]+)["'][^)]*pretrained=True""")


def python_blocks(path: Path):
    return _BLOCK.findall(path.read_text())


def _fake_hub_for(code: str, cache: Path) -> None:
    """Publish randomly initialised weights of every ``name.tag`` loaded with pretrained=True into a
    local Hub cache (the real Hub is not reachable in tests): the examples then run as written."""
    import torch

    import semask
    from _fake_hub import add_model_dir

    for name in sorted(set(_HUB_TAG.findall(code))):
        cfg = semask.get_pretrained_cfg(name)
        folder = cache.parent / "models" / name
        if not folder.exists():
            torch.manual_seed(0)
            semask.create_model(name).save_pretrained(folder)
        add_model_dir(cache, cfg.hf_hub_id, folder)


@pytest.mark.parametrize("path", [p for p in DOC_FILES if python_blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_for("\n".join(python_blocks(path)), tmp_path / "hub")
    namespace: dict = {"__name__": "__doc_example__"}
    for i, code in enumerate(python_blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as e:  # re-raise with the failing block for a readable report
            raise AssertionError(f"{path.name} block {i} failed: {e!r}\n---\n{code}") from e


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_code_fences_are_closed(path):
    fences = [l for l in path.read_text().splitlines() if l.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{path.name} has an unclosed code block"


def test_readme_opens_with_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S).group(1)
    lines = [l for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(lines) == 2
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    test_cmd = lines[1].split("&&")[-1].strip()
    assert test_cmd in ci, f"README's test command {test_cmd!r} must be what .ci/run runs"


@pytest.mark.skipif(shutil.which("mkdocs") is None and os.environ.get("CI") != "true", reason="mkdocs not installed")
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "model_zoo" / "index.html").exists()
    zoo = (tmp_path / "site" / "model_zoo" / "index.html").read_text()
    assert "semask_swin_tiny_fpn.ade20k" in zoo and "34.656" in zoo
