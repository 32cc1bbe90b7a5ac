"""``semask convert SRC.pth DST_DIR --model NAME``: official checkpoint -> semask model folder."""
from __future__ import annotations

import argparse
import sys
from typing import Tuple


def _pattern(text: str) -> Tuple[bool, ...]:
    """``W,W,G,G`` -> (False, False, True, True)."""
    flags = [t.strip().upper() for t in text.split(",") if t.strip()]
    if not flags or any(f not in ("W", "G") for f in flags):
        raise argparse.ArgumentTypeError(f"expected a comma-separated W/G list such as W,W,G,G, got {text!r}")
    return tuple(f == "G" for f in flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official checkpoint (.pth); read with torch.load(weights_only=True)")
    p.add_argument("dst", help="output model folder (config.json + model.safetensors)")
    p.add_argument("--model", required=True,
                   help="name.tag of the release (e.g. semask_swin_tiny_fpn.ade20k), or an untagged name to "
                        "adopt the checkpoint's shapes (see `semask list --pretrained`)")
    p.add_argument("--sem-global", type=_pattern, default=None, metavar="W,G,...",
                   help="per-stage windowed (W) / global (G) semantic attention; not stored in the weights "
                        "(default: the tag's pattern)")
    p.add_argument("--sem-window-size", type=int, default=None, help="window of the windowed semantic layers "
                                                                     "(default: the Swin window)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the folder to this Hugging Face Hub model repo (needs a login)")


def run(args: argparse.Namespace) -> int:
    from ..hub.convert import convert_official_checkpoint

    overrides = {}
    if args.sem_global is not None:
        overrides["sem_global"] = args.sem_global
    if args.sem_window_size is not None:
        overrides["sem_window_size"] = args.sem_window_size
    try:
        convert_official_checkpoint(args.src, args.dst, args.model, push_to_hub=args.push_to_hub,
                                    overwrite=args.overwrite, log=print, **overrides)
    except (ValueError, TypeError, OSError) as e:  # ConversionError is a ValueError; OSError: files
        print(f"semask convert: error: {e}", file=sys.stderr)
        return 1
    print(f"load it with: semask.create_model({args.model.split('.')[0]!r}, pretrained={args.dst!r})")
    return 0
