"""The in-process executor: P simulated devices, threads of this process
taking turns (:mod:`prism_ext.comm.local`), each running what it would run
on a board from the bytes it would have received."""

from __future__ import annotations

from ..comm.local import LocalGroup
from ..method.engine import Collected
from ..models import Network
from ..options import RunOptions
from .request import Request, count_inputs, decode_request, encode_request, local_inputs, run

__all__ = ["InProcess", "simulate"]


class InProcess:
    """The default executor of :class:`prism_ext.PrismModel`: any number of
    simulated devices (1 unless a call says otherwise)."""

    def resolve(self, devices: int | None, options: RunOptions) -> tuple[int, RunOptions]:
        return (1 if devices is None else devices), options

    def execute(self, net: Network, inputs: dict, request: Request, on_token=None) -> Collected:
        return simulate(net, inputs, request, on_token)

    def close(self) -> None:
        """Nothing to stop: the devices live for one call."""

    def __repr__(self):
        return "InProcess()"


def simulate(net: Network, inputs: dict, request: Request, on_token=None) -> Collected:
    """Run ``request`` on in-process devices (threads taking turns, see
    :mod:`prism_ext.comm.local`), each from the bytes it would have received.
    ``on_token``: a streamed generation's callback, as on a live cluster."""
    devices = len(request.ranges)
    blobs = [encode_request(request, local_inputs(net, inputs, request, r)) for r in range(devices)]

    def device(rank: int):
        def program(transport):
            req, local = decode_request(blobs[rank], net, rank, devices)
            return run(net, req, local, rank, transport, on_token if rank == 0 else None)
        return program

    return count_inputs(LocalGroup(devices).run([device(r) for r in range(devices)])[0], blobs)
