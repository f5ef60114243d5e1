"""The argument checks every layer shares: integers and finite numbers in a
range, one line naming the argument. A leaf: it imports nothing of the package."""

from __future__ import annotations

import math
import operator
import sys

__all__ = ["MAX_COUNT", "check_count", "check_number"]

# Counts (positions, devices, CR) are checked against this before any
# arithmetic: positions travel as int32, and nothing larger is meaningful.
MAX_COUNT = 2**31 - 1


def _named(name: str | None, message: str) -> str:
    return f"{name}: {message}" if name else message


def check_count(value, name: str | None, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """The one integer check: an int in [minimum, maximum] as a plain int,
    checked before any arithmetic. Anything ``operator.index`` takes counts
    (numpy and torch integers), never a bool (nor a bool tensor). ``name``
    starts the message (None: the message alone, for argparse)."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(_named(name, f"expected an int, got {type(value).__name__}"))
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(_named(name, f"expected an int, got {type(value).__name__}")) from None
    if value < minimum:
        raise ValueError(_named(name, f"must be >= {minimum}, got {value}"))
    if value > maximum:
        raise ValueError(_named(name, f"must be <= {maximum}, got {value}"))
    return value


def check_number(value, name: str | None, minimum: float, maximum: float) -> float:
    """A finite real number in [minimum, maximum] as a float (NaN, inf and
    bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_named(name, f"expected a number, got {type(value).__name__}"))
    if not (math.isfinite(value) and minimum <= value <= maximum):
        bounds = f">= {minimum:g}" if maximum >= sys.float_info.max else f"in [{minimum:g}, {maximum:g}]"
        raise ValueError(_named(name, f"must be a finite number {bounds}, got {value!r}"))
    return float(value)
