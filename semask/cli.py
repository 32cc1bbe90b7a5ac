"""The ``semask`` command. Each sub-command lives in ``semask/commands/<name>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used.

Errors print one line, ``semask <cmd>: error: <message>``, and exit with status 2 (like argparse's
usage errors); ``--debug`` shows the traceback instead.
"""
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

# exceptions whose message is the whole story; others also name their type
_PLAIN_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                 PermissionError, KeyError, ImportError)


class CommandError(SystemExit):
    """Exit status 2 after the one-line message was printed; ``str()`` is the message (for callers of
    :func:`main` and tests)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semask", description="SeMask segmentation models")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_command=name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"semask.commands.{name}")


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.split()) or type(e).__name__
    if text.startswith("error: "):
        text = text[len("error: "):]
    if not isinstance(e, _PLAIN_ERRORS):
        text = f"{text} ({type(e).__name__}; rerun with --debug for the traceback)"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    if args.debug:
        return int(_module(args._command).run(args) or 0)
    prog = f"semask {args._command}"
    try:
        return int(_module(args._command).run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise CommandError("interrupted", 130) from None
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        message = " ".join(str(e.code).split())
        message = message[len("error: "):] if message.startswith("error: ") else message
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise CommandError(message) from None
    except Exception as e:
        message = _message(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise CommandError(message) from None


if __name__ == "__main__":
    sys.exit(main())
