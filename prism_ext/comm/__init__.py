"""Transports: how devices exchange tensors. The engine is handed one.

A transport for device ``rank`` of ``size`` offers ``all_gather(tensors,
wire_dtype) -> Gathered`` (and ``all_gather_start(...)`` whose ``wait()``
gives it, so compute overlaps the transfer), ``gather(tensors, meta, dst)
-> GatheredTo`` (results to rank 0), ``all_reduce(tensor) -> Reduced``
(fp32 sum, tensor parallelism) and point-to-point ``send(tensors, meta,
dst) -> bytes`` / ``recv(src) -> (meta, tensors, bytes)`` (a token stream),
the :class:`.transport.Transport` Protocol: :class:`.local.LocalTransport` for
in-process devices, :class:`.dist.DistTransport` for processes over TCP.
:mod:`.wire` is the byte format every transport uses, so the bytes counted
are the bytes that would cross a network.
"""

from .local import LocalGroup, LocalTransport
from .transport import Transport
from .wire import WIRE_DTYPES, Gathered, GatheredTo, Reduced, WireError, decode, decode_message, encode

__all__ = [
    "Transport", "LocalGroup", "LocalTransport", "Gathered", "GatheredTo", "Reduced", "WIRE_DTYPES", "WireError", "encode", "decode",
    "decode_message",
]
