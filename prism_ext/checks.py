"""Argument checks shared by the API and the CLI that belong to no one layer
(kept apart so the runtime files change as little as possible)."""

from __future__ import annotations

import math
import operator
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .partition import Partition

__all__ = ["MAX_COUNT", "check_count", "check_number", "check_sampling", "warn_if_coarse"]

# Counts (positions, devices, CR) are checked against this before any
# arithmetic: positions travel as int32, and nothing larger is meaningful.
MAX_COUNT = 2**31 - 1


def check_sampling(temperature, seed) -> None:
    """generate()'s ``temperature`` (finite, >= 0) and ``seed`` (None or an
    int torch.Generator takes: -2**63 <= seed < 2**64)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed: must be in [-2**63, 2**64), got {seed}")


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


def warn_if_coarse(part: Partition, mode: str, crs) -> None:
    """An AccuracyWarning when a PRISM run leaves some device fewer than about
    two segments (see prism_ext.partition.coarse_warning)."""
    # Imported here: partition imports this module.
    from .partition import AccuracyWarning, coarse_warning

    if mode != "prism":
        return
    msg = coarse_warning(part, crs)
    if msg:
        warnings.warn(msg, AccuracyWarning, stacklevel=3)
