"""Positions -> devices -> segments.

A sequence of N positions is cut into P contiguous ranges, one per device, in
proportion to per-device weights (a faster device gets more); every device
owns at least one position and device 0 owns position 0 ([CLS]). Each range
is cut into segments of CR rows (the last may be shorter); a segment is sent
as one mean row together with its count and the last position it covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..checks import MAX_COUNT, check_count

__all__ = [
    "Partition",
    "partition",
    "segment_ends",
    "segment_sizes",
    "rows_sent",
    "exact_slots",
    "cr_schedule",
    "AccuracyWarning",
    "coarse_warning",
    "MAX_COUNT",
]




class AccuracyWarning(UserWarning):
    """A run whose settings are known to cost accuracy (see coarse_warning)."""


def coarse_warning(part: "Partition", crs: Sequence[int]) -> str | None:
    """A hint when some device's range holds fewer than about two segments at
    some layer's CR: its whole range then reaches the others as one mean row,
    and accuracy drops sharply (e.g. 4 devices, CR 4, 12 tokens: embedding
    cosine ~0.75 to exact). None when the run is not in that regime."""
    worst = max(crs)
    if worst <= 1:
        return None
    small = min(part.sizes())
    if small >= 2 * worst:
        return None
    suggest = max(1, small // 2)
    return (f"cr: at cr {worst} a device holding {small} of the {part.length} positions sends them as "
            f"{-(-small // worst)} segment(s); below about 2 segments per device accuracy drops sharply "
            f"(try cr {suggest} or fewer than {part.devices} devices)")


@dataclass(frozen=True)
class Partition:
    """Contiguous ranges ``[start, stop)`` of positions, one per device."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def devices(self) -> int:
        return len(self.ranges)

    @property
    def length(self) -> int:
        return self.ranges[-1][1]

    def sizes(self) -> list[int]:
        return [stop - start for start, stop in self.ranges]

    def segments(self, rank: int, cr: int, exact: int = 0) -> int:
        """Rows device ``rank`` sends at compression rate ``cr`` with
        ``exact`` of its rows travelling exactly (see :func:`rows_sent`)."""
        start, stop = self.ranges[rank]
        return rows_sent(stop - start, cr, exact)


def partition(n: int, devices: int, weights: Sequence[float] | None = None) -> Partition:
    """Split ``n`` positions over ``devices`` in proportion to ``weights``.

    Each device first gets one position; the remaining ``n - devices`` are
    shared by largest remainder, ties going to the lower rank.
    """
    n = check_count(n, "n")
    devices = check_count(devices, "devices")
    if devices > n:
        raise ValueError(f"devices: {devices} devices need at least {devices} positions, the input has {n}")
    if weights is None:
        weights = [1.0] * devices
    weights = list(weights)
    if len(weights) != devices:
        raise ValueError(f"device_weights: expected {devices} weights (one per device), got {len(weights)}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"device_weights: every weight must be a finite number > 0, got {w!r}")
    # Relative to the largest, so huge weights (1e308 each) cannot overflow the sum.
    top = float(max(weights))
    weights = [float(w) / top for w in weights]
    total = float(sum(weights))
    spare = n - devices
    shares = [spare * w / total for w in weights]
    sizes = [1 + int(math.floor(s)) for s in shares]
    left = n - sum(sizes)
    by_remainder = sorted(range(devices), key=lambda p: (-(shares[p] - math.floor(shares[p])), p))
    for p in by_remainder[:left]:
        sizes[p] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return Partition(tuple(ranges))


def segment_ends(start: int, stop: int, cr: int) -> list[int]:
    """Last position covered by each CR-row segment of ``[start, stop)``."""
    return [min(s + cr, stop) - 1 for s in range(start, stop, cr)]


def segment_sizes(start: int, stop: int, cr: int) -> list[int]:
    """Rows in each CR-row segment of ``[start, stop)`` (padding included)."""
    return [min(s + cr, stop) - s for s in range(start, stop, cr)]


def rows_sent(n: int, cr: int, exact: int = 0) -> int:
    """Rows a device owning ``n`` positions sends at ``cr`` when ``exact`` of
    them travel as their own rows: the same ceil(n / cr) rows as without
    exact rows (the exact rows take the place of segments), but never fewer
    than the exact rows plus one segment for the rest."""
    budget = -(-n // cr)
    exact = min(exact, n)
    if exact == 0:
        return budget
    rest = n - exact
    return exact + (min(rest, max(1, budget - exact)) if rest else 0)


def exact_slots(exact: torch.Tensor, valid: torch.Tensor, cr: int,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Which row a device sends carries each of its own rows, when the rows
    where ``exact`` [B, n] is True travel as their own rows (count 1).

    Per sequence b: its k_b valid exact rows take slots 0..k_b-1 in position
    order; its r_b other valid rows are cut, in position order, into s_b
    contiguous groups of nearly equal size (slots k_b..k_b+s_b-1), where
    s_b = min(r_b, max(1, ceil(n / cr) - k_b)): the row budget of plain
    segments (:func:`rows_sent`). With ``rows`` [B, n, d] the groups are
    adaptive instead: cut before the s_b - 1 rows farthest (L2) from the
    previous row of the group's kind, so that a mean never spans a jump.
    Padding rows get slot -1. Returns
    (slot [B, n] int64, m = rows sent, the largest k_b + s_b, at least 1;
    a sequence with fewer rows leaves the rest empty: count 0)."""
    B, n = valid.shape
    exact = exact & valid
    rest = valid & ~exact
    k = exact.sum(1)
    r = rest.sum(1)
    budget = -(-n // cr)
    s = torch.where(r > 0, torch.minimum(r, (budget - k).clamp(min=1)), torch.zeros_like(r))
    exact_rank = exact.long().cumsum(1) - 1
    rest_rank = rest.long().cumsum(1) - 1
    if rows is None:
        group = torch.div(rest_rank * s[:, None], r.clamp(min=1)[:, None], rounding_mode="floor")
    else:
        idx = torch.arange(n).expand(B, n)
        last = torch.where(rest, idx, -1).cummax(1).values  # the last other row at or before t
        before = torch.cat([torch.full((B, 1), -1), last[:, :-1]], dim=1)
        prev = rows.gather(1, before.clamp(min=0)[..., None].expand(-1, -1, rows.shape[-1]))
        gap = (rows - prev).norm(dim=-1).masked_fill(~rest | (before < 0), -math.inf)
        order = gap.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, idx.contiguous())
        cut = (rank < (s - 1)[:, None]) & (gap > -math.inf)
        group = cut.long().cumsum(1)
    slot = torch.where(exact, exact_rank, torch.where(rest, k[:, None] + group, torch.full_like(group, -1)))
    return slot, max(1, int((k + s).max()))


def slot_ends(slot: torch.Tensor, m: int, pos: torch.Tensor) -> torch.Tensor:
    """The last position each of the ``m`` sent rows covers, per sequence
    ([B, m] int64), from ``slot`` [B, n] (:func:`exact_slots`; -1 at padding)
    and the device's positions ``pos`` [n]. A row that covers nothing ends at
    the device's last position."""
    B, n = slot.shape
    target = torch.where(slot < 0, m, slot)  # padding lands in a spare slot, dropped below
    ends = torch.full((B, m + 1), int(pos[-1]), dtype=torch.int64)
    return ends.scatter_reduce_(1, target, pos.to(torch.int64).expand(B, n), reduce="amax",
                                include_self=False)[:, :m]


def cr_schedule(cr, layers: int) -> list[int]:
    """One compression rate per layer from an int or a per-layer sequence."""
    if isinstance(cr, (list, tuple)):
        if len(cr) != layers:
            raise ValueError(f"cr: a per-layer schedule needs {layers} values (one per layer), got {len(cr)}")
        return [check_count(c, "cr") for c in cr]
    return [check_count(cr, "cr")] * layers
