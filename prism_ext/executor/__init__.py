"""Where a planned request runs: one :class:`Executor` interface, the
in-process devices (:class:`InProcess`, the default) and a live cluster
(:class:`prism_ext.runtime.Cluster`) behind it. :class:`prism_ext.PrismModel`
plans each call (:func:`.request.plan`) and hands it to its executor, so the
same model face runs on either."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..method.engine import Collected
from ..models import Network
from ..options import RunOptions
from .local import InProcess
from .request import Request

__all__ = ["Executor", "InProcess"]


@runtime_checkable
class Executor(Protocol):
    def resolve(self, devices: int | None, options: RunOptions) -> tuple[int, RunOptions]:
        """The devices a call runs on and its options, from what the caller
        gave (``devices`` None: this executor's default)."""

    def execute(self, net: Network, inputs: dict, request: Request, on_token=None) -> Collected:
        """Run a planned request on every device; rank 0's collected results.
        ``on_token``: a streamed generation's callback on rank 0."""

    def close(self) -> None:
        """Stop whatever the executor started (processes, threads)."""
