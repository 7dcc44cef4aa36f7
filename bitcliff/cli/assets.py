"""``bitcliff assets``: fetch and prepare the embedded model(s) and corpus, print their paths."""

from __future__ import annotations

import argparse
import json

from bitcliff.cli.common import HelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser("assets", help="fetch and prepare the embedded model(s) and corpus, print their paths",
                       formatter_class=HelpFormatter)
    p.add_argument("names", nargs="*", default=["default", "wiki"], help="assets: default, gemma3-270m, wiki")
    p.add_argument("--json", action="store_true", help="print a JSON object name -> path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitcliff.assets import prepare_all

    paths = prepare_all(tuple(args.names))
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        for name, path in paths.items():
            print(f"{name:14s} {path}")
    return 0
