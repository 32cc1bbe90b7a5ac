"""The ``semask`` command. Each sub-command lives in ``semask/commands/<name>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "demo": "train a small SeMask model on built-in scenes, evaluate, save, reload and draw predictions",
    "convert": "convert an official SeMask checkpoint (.pth) into a semask model folder",
    "predict": "segment images and draw label maps, overlays and semantic prior maps",
    "eval": "evaluate a model on a dataset folder (per-class IoU, mIoU)",
    "train": "finetune a model on a dataset folder",
    "export": "export a model to ONNX",
    "list": "list registered models (and pretrained tags)",
    "publish": "fetch, convert, verify and push the official releases to Hugging Face Hub repos (maintainers)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semask", description="SeMask segmentation models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_command=name)
        _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"semask.commands.{name}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    return int(_module(args._command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
