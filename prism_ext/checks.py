"""Argument checks shared by the API and the CLI that belong to no one layer
(kept apart so the runtime files change as little as possible)."""

from __future__ import annotations

import warnings

from .method.partition import AccuracyWarning, Partition, coarse_warning

__all__ = ["warn_if_coarse"]


def warn_if_coarse(part: Partition, mode: str, crs) -> None:
    """An AccuracyWarning when a PRISM run leaves some device fewer than about
    two segments (see prism_ext.method.partition.coarse_warning)."""
    if mode != "prism":
        return
    msg = coarse_warning(part, crs)
    if msg:
        warnings.warn(msg, AccuracyWarning, stacklevel=3)
