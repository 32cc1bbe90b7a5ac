"""First and later ``create_model(tag, pretrained=True)`` through the official-release route: the
file served over HTTP on 127.0.0.1 as a ``SEMASK_WEIGHTS_MIRROR``, downloaded, converted and cached
on the first call; read from the semask cache on the next ones. Prints seconds per phase and the
cache size.

    python benchmarks/official_fetch.py [--full] [--threads 0]

By default it uses the micro parity fixtures (``../shared/parity``, tags registered as in
``tests/test_official_weights.py``). ``--full`` adds the full-size Swin-T FPN ADE20K tag with random
weights saved in the official mmseg layout (the size of the real file, not its values).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import semask
from _timing import bench_parser, setup_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_official_weights import D2_FILE, D2_ID, FPN_FILE, FPN_ID, _Server, register_test_tags  # noqa: E402


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _run(name: str, src_bytes: int, root: Path) -> None:
    os.environ["SEMASK_CACHE"] = str(root / name)
    t0 = time.perf_counter()
    semask.create_model(name, pretrained=True)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    semask.create_model(name, pretrained=True)
    again = time.perf_counter() - t0
    folder = Path(os.environ["SEMASK_CACHE"]) / "models" / name
    note = json.loads((folder / "source.json").read_text())
    print(f"  {name}: official file {src_bytes / 1e6:.1f} MB; first call {first:.2f} s (download "
          f"{note['download_seconds']:.2f} s, conversion {note['convert_seconds']:.2f} s); later call {again:.2f} s; "
          f"cache folder {_size(folder) / 1e6:.1f} MB")


def main() -> None:
    parser = bench_parser(__doc__, reps=1)
    parser.add_argument("--full", action="store_true", help="also a full-size Swin-T FPN file (about 240 MB)")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    fpn_name, d2_name = register_test_tags()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        routes = {f"/mirror/{FPN_ID}.pth": ("file", FPN_FILE.read_bytes()),
                  f"/mirror/{D2_ID}.pth": ("file", D2_FILE.read_bytes())}
        jobs = [(fpn_name, FPN_FILE.stat().st_size), (d2_name, D2_FILE.stat().st_size)]
        if args.full:
            name = "semask_swin_tiny_fpn.ade20k"
            cfg = semask.get_pretrained_cfg(name)
            model = semask.create_model(name)
            sd = dict(model.state_dict())
            sd.update({f"backbone.{k}": v for k, v in model.backbone.named_buffers() if k.endswith("relative_position_index")})
            path = root / "full.pth"
            torch.save({"meta": {"CLASSES": cfg.class_names, "iter": 160000}, "state_dict": sd}, path)
            file_id = semask.hub.official.drive_file_id(cfg.source_url)
            routes[f"/mirror/{file_id}.pth"] = ("file", path.read_bytes())
            jobs.append((name, path.stat().st_size))
        srv = _Server(routes)
        os.environ.update(SEMASK_WEIGHTS_MIRROR=f"{srv.url}/mirror", HF_HUB_OFFLINE="1",
                          HF_HUB_CACHE=str(root / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1")
        print(f"official-release route over HTTP on 127.0.0.1, {threads} threads, torch {torch.__version__}")
        try:
            for name, size in jobs:
                _run(name, size, root)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
