"""Argument checks shared by the API and the CLI that belong to no one layer
(kept apart so the runtime files change as little as possible)."""

from __future__ import annotations

import math
import warnings

from .partition import MAX_COUNT, AccuracyWarning, Partition, coarse_warning

__all__ = ["check_sampling", "warn_if_coarse"]


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


def check_count(value, name: str, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """An int in [minimum, maximum] (bool refused), checked before any arithmetic."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}: must be in [{minimum}, {maximum}], got {value}")
    return value


def warn_if_coarse(part: Partition, mode: str, crs) -> None:
    """An AccuracyWarning when a PRISM run leaves some device fewer than about
    two segments (see prism_ext.partition.coarse_warning)."""
    if mode != "prism":
        return
    msg = coarse_warning(part, crs)
    if msg:
        warnings.warn(msg, AccuracyWarning, stacklevel=3)
