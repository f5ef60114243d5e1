"""The ``prism`` command: one module per command, each with a ``register``
that adds its subparser; the argument types and error forms they share are
in :mod:`.args`."""

from __future__ import annotations

import argparse
import sys

from . import account, bench, data, demo, evaluate, finetune, info, quantize, run, serve, worker, zoo

__all__ = ["build_parser", "main"]

# the order of `prism --help`
COMMANDS = (info, bench, account, run, worker, demo, zoo, serve, evaluate, finetune, data, quantize)


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="prism", description="PRISM distributed Transformer inference")
    parser.add_argument("--version", action="version", version=f"prism-ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line_accuracy_warnings() -> None:
    """AccuracyWarning as one line on stderr, once per message (the peer runs
    of `prism run` would repeat it), instead of Python's two-line format."""
    import warnings

    from ..method.partition import AccuracyWarning

    default, seen = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, AccuracyWarning):
            return default(message, category, filename, lineno, file, line)
        if str(message) not in seen:
            seen.add(str(message))
            print(f"prism: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Run the ``prism`` command line ``argv`` (default ``sys.argv[1:]``); return its exit status."""
    args = build_parser().parse_args(argv)
    _one_line_accuracy_warnings()
    return args.func(args)

