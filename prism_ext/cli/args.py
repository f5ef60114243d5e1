"""What every command's arguments share: the one-line error forms and the
checked argparse types (each numeric option is checked by
:mod:`prism_ext.checks` before anything uses it)."""

from __future__ import annotations

import argparse
import functools
import sys

from ..checks import MAX_COUNT, check_count, check_number

USER_ERRORS = (ValueError, TypeError, ImportError, OSError)  # OSError covers FileNotFoundError
MAX_SECONDS = 86400.0  # --timeout and the like: a day (prism_ext.runtime refuses longer exchange timeouts)


def user_errors(command: str):
    """Report a bad argument or input as one line and exit status 2."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(args):
            try:
                return fn(args)
            except USER_ERRORS as exc:
                print(f"prism {command}: {exc}", file=sys.stderr)
                return 2
        return run
    return wrap


def one_line_errors(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """Usage errors as one line (argparse would print the usage first)."""
    def error(message: str):
        print(f"prism {command}: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def max_threads() -> int:
    # The C++ pool's bound, which torch's thread count shares here.
    from ..kernels import _C

    return _C.max_threads()


class Bounded:
    """The argparse type of every numeric option of every command: one number
    (or, ``many``, comma-separated numbers), each checked by
    :mod:`prism_ext.checks` (ints: ``check_count``; reals: ``check_number``,
    finite) against [minimum, maximum] before anything uses it. ``maximum``
    may be a function (read at parse time). ``positive``: reals must be > 0."""

    def __init__(self, minimum, maximum=MAX_COUNT, *, real: bool = False, many: bool = False, positive: bool = False):
        self.minimum, self._maximum, self.real, self.many, self.positive = minimum, maximum, real, many, positive

    @property
    def maximum(self):
        return self._maximum() if callable(self._maximum) else self._maximum

    def __call__(self, text: str):
        kind = "number" if self.real else "int"
        values = []
        for part in text.split(",") if self.many else [text]:
            try:
                value = float(part) if self.real else int(part)
            except ValueError:  # also int() of more than 4300 digits
                what = f"comma-separated {kind}s" if self.many else ("a number" if self.real else "an int")
                raise argparse.ArgumentTypeError(f"expected {what}, got {text[:40]!r}") from None
            try:
                if self.real:
                    value = check_number(value, None, self.minimum, self.maximum)
                    if self.positive and not value > 0:
                        raise ValueError(f"must be > 0, got {value!r}")
                else:
                    value = check_count(value, None, self.minimum, self.maximum)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{exc}" if not self.many else f"{exc} (in {text[:40]!r})") from None
            values.append(value)
        return values if self.many else values[0]


positive = Bounded(1)
nonnegative = Bounded(0)
threads = Bounded(1, max_threads)  # before torch sees it: torch takes 100000, then the process dies at exit
seconds = Bounded(1, MAX_SECONDS, real=True)  # --timeout of the cluster commands (as prism_ext.runtime checks it)
weights = Bounded(0, sys.float_info.max, real=True, many=True, positive=True)  # relative device speeds
counts = Bounded(1, many=True)  # comma-separated counts: a grid of devices or CRs, a per-layer CR


def cr(text: str):
    """--cr: one int, or one per layer separated by commas."""
    values = counts(text)
    return values[0] if len(values) == 1 else values


def words(text: str) -> list[str]:
    """A comma-separated list of names (empty items dropped)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list ('none' or '' for an empty one)."""
    return () if text.strip().lower() in ("", "none") else tuple(v.strip() for v in text.split(",") if v.strip())

