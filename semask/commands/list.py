"""``semask list [PATTERN] [--pretrained]``."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="", help="wildcard filter, e.g. '*fpn*'")
    p.add_argument("--pretrained", action="store_true", help="list name.tag pairs with pretrained cfgs")


def run(args: argparse.Namespace) -> int:
    import semask

    for name in semask.list_models(args.pattern, pretrained=args.pretrained):
        print(name)
    return 0
