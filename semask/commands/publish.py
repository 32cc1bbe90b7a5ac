"""``semask publish --org ORG [--tags PATTERN ...] [--out DIR] [--dry-run]``: the official releases of
the zoo -> one Hugging Face Hub model repo per tag (``ORG/<architecture>.<tag>``).

Per tag: fetch the official file (``$SEMASK_WEIGHTS_MIRROR`` or Google Drive), check its sha256 when
the tag records one, convert it (``weights_only=True``), verify the folder (every tensor equals the
official tensor it came from, the folder reloads, one forward pass gives finite (1, K, H, W)
logits), write the model card, then push ``config.json`` + ``model.safetensors`` + ``README.md`` in
one commit. ``--dry-run`` stops before the push. ``OUT/published.json`` lists per tag the repo, the
commit and the source sha256: the values for the tag's ``hf_hub_id`` / ``hf_hub_revision`` /
``source_sha256`` in the registry.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--org", required=True, help="Hub user or organisation that receives the repos (e.g. semask)")
    p.add_argument("--tags", nargs="+", default=None, metavar="PATTERN",
                   help="name.tag wildcards (default: every tag with an official release)")
    p.add_argument("--out", default="semask-publish", help="folder for the converted model folders")
    p.add_argument("--dry-run", action="store_true", help="convert, verify and write the folders; push nothing")
    p.add_argument("--private", action="store_true", help="create the repos as private")
    p.add_argument("--token", default=None, help="Hub token (default: the `hf auth login` one)")


def official_tags(patterns: Optional[List[str]] = None) -> List[str]:
    """Registered ``name.tag`` with an official release, filtered by wildcards."""
    import semask
    from ..hub.official import has_official_release

    names = [n for n in semask.list_pretrained() if has_official_release(semask.get_pretrained_cfg(n))]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return names


def _forward_check(folder: Path, num_classes: int) -> int:
    """Reload the folder as a user would and run one small forward pass; returns the parameter count."""
    import torch

    import semask

    config = json.loads((folder / "config.json").read_text())
    model = semask.create_model(config["architecture"], pretrained=str(folder)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, getattr(model, "in_chans", 3), 64, 64, generator=torch.Generator().manual_seed(0)))
    if tuple(out.shape) != (1, num_classes, 64, 64) or not bool(torch.isfinite(out).all()):
        raise ValueError(f"the reloaded model gave {tuple(out.shape)} logits"
                         f"{'' if torch.isfinite(out).all() else ' with non-finite values'}, expected (1, {num_classes}, 64, 64)")
    return sum(p.numel() for p in model.parameters())


def build_repo_folder(name: str, org: str, out: Path) -> Dict[str, Any]:
    """Fetch, convert and verify ``name``'s official release into ``out/name``; returns its manifest entry."""
    import semask
    from ..hub.model_card import render_model_card
    from ..hub.official import compare_with_source, convert_release, download_official

    cfg = semask.get_pretrained_cfg(name)
    repo_id = f"{org}/{name}"
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out) as tmp:
        src, where = download_official(cfg, tmp)
        fetched = time.perf_counter() - t0
        note = convert_release(cfg, Path(src), folder)
        n = compare_with_source(folder, src)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["hf_hub_id"] = repo_id  # what create_model(name, pretrained=True) will ask for
    config["pretrained_cfg"]["source_sha256"] = note["sha256"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    params = _forward_check(folder, int(config["num_classes"]))
    (folder / "README.md").write_text(render_model_card(config, repo_id=repo_id, num_params=params))
    return dict(tag=name, repo_id=repo_id, folder=str(folder), source_url=cfg.source_url, fetched_from=where,
                sha256=note["sha256"], tensors_verified=n, license=cfg.license, revision=None,
                seconds=round(time.perf_counter() - t0, 2), download_seconds=round(fetched, 2))


def push_folder(entry: Dict[str, Any], *, private: bool = False, token: Optional[str] = None) -> str:
    """Create the repo if needed and upload the folder in one commit; returns the commit hash."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(entry["repo_id"], private=private, exist_ok=True)
    info = api.upload_folder(repo_id=entry["repo_id"], folder_path=entry["folder"],
                             commit_message=f"Upload {entry['tag']} converted from the official release "
                                            f"(sha256 {entry['sha256'][:12]})")
    return getattr(info, "oid", None) or str(info)


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    names = official_tags(args.tags)
    if not names:
        print(f"semask publish: error: no tag with an official release matches {args.tags}; see "
              "`semask list --pretrained`", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, Any] = {}
    failed = []
    if "/" in args.org or not args.org.strip():
        print(f"semask publish: error: --org takes a Hub user or organisation name, got {args.org!r}", file=sys.stderr)
        return 1
    for name in names:
        try:
            try:
                entry = build_repo_folder(name, args.org, out)
            except BaseException:
                shutil.rmtree(out / name, ignore_errors=True)  # OUT holds verified folders only
                raise
            if not args.dry_run:
                entry["revision"] = push_folder(entry, private=args.private, token=args.token)
        except (ValueError, OSError, HfHubHTTPError) as e:  # one tag's failure must not stop the others
            failed.append(name)
            print(f"semask publish: {name}: error: {e}", file=sys.stderr)
            continue
        manifest[name] = entry
        pushed = f", pushed as commit {entry['revision']}" if entry["revision"] else " (dry run: not pushed)"
        print(f"{name}: {entry['tensors_verified']} tensors verified, forward ok -> {entry['folder']} "
              f"for {entry['repo_id']}{pushed}")
    (out / "published.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out / 'published.json'} ({len(manifest)} of {len(names)} tags)")
    if failed:
        print(f"semask publish: {len(failed)} tag(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
