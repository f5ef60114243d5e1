"""``prism zoo``: the bundled models: list them, or train one again."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import one_line_errors, threads, user_errors


@user_errors("zoo")
def _zoo(args: argparse.Namespace) -> int:
    from .. import zoo

    if args.zoo_command == "list":
        for name, what in zoo.NAMES.items():
            try:
                where = str(zoo.model_dir(name))
            except FileNotFoundError:
                where = "(missing: run `prism zoo train " + name + "`)"
            print(f"{name:<16} {what}\n{'':<16} {where}")
        return 0
    from ..training.bundled import train

    out = Path(args.out) if args.out else Path.cwd() / args.name  # never into the installed package
    metrics = train(args.name, out, threads=args.threads, quiet=args.quiet, exact_only=args.exact_only)
    print(json.dumps(metrics, indent=1, ensure_ascii=False))
    return 0


def register(sub) -> None:
    from ..zoo import NAMES

    zoo = one_line_errors(sub.add_parser("zoo", help="the bundled models: list them, or train one again"), "zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    one_line_errors(zsub.add_parser("list", help="bundled models and where they are"), "zoo list")
    train = one_line_errors(zsub.add_parser("train", help="train a bundled model (needs the `train` extra: "
                                                           "scikit-learn)"), "zoo train")
    train.add_argument("name", choices=list(NAMES))
    train.add_argument("--out", help="output folder (default: ./NAME in the current directory)")
    train.add_argument("--threads", type=threads, help="torch threads (default: torch's choice)")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress lines or bar on stderr")
    train.add_argument("--exact-only", action="store_true",
                       help="stop after exact training, before the PRISM-aware phase (the exact-only peer; "
                            "use with --out)")
    zoo.set_defaults(func=_zoo)
