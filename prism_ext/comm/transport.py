"""The transport interface the engine is handed (it never imports one):
what a device uses to reach the others. :class:`.local.LocalTransport`
(in-process devices) and :class:`.dist.DistTransport` (processes over
gloo) implement it; tests/test_wire.py checks both against this Protocol."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .wire import Gathered, GatheredTo, Pending, Reduced

__all__ = ["Transport"]


@runtime_checkable
class Transport(Protocol):
    """Device ``rank`` of ``size``. What another device sends is untrusted:
    every frame is decoded by :mod:`.wire` with bounds checks, and errors name
    the sending rank."""

    rank: int
    size: int

    def all_gather(self, tensors: dict, wire_dtype: str = "fp32") -> Gathered:
        """Send ``tensors`` to every device (activation rows at ``wire_dtype``),
        receive every device's, own included."""

    def all_gather_start(self, tensors: dict, wire_dtype: str = "fp32") -> Pending:
        """:meth:`all_gather` in two halves: ``wait()`` on the result gives it,
        so the caller computes while the bytes travel."""

    def gather(self, tensors: dict, meta: dict, dst: int = 0) -> GatheredTo:
        """Send ``tensors`` (fp32) and ``meta`` to ``dst``; there, every rank's
        (meta, tensors) in rank order."""

    def all_reduce(self, tensor: torch.Tensor) -> Reduced:
        """The fp32 sum of ``tensor`` over every device, on every device."""

    def send(self, tensors: dict, meta: dict, dst: int) -> int:
        """One frame (``tensors`` at fp32 and ``meta``) to ``dst`` alone; its bytes."""

    def recv(self, src: int) -> tuple[dict, dict, int]:
        """The next frame ``src`` sent with :meth:`send`: (meta, tensors, bytes)."""
