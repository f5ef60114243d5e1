"""Byte format of an exchange: a dict of named tensors -> bytes and back.

Layout: a little-endian uint32 header length, a JSON header (name, wire dtype,
shape, byte counts per tensor), then the raw tensor bytes in header order.
Floating tensors travel in the wire dtype (fp32, fp16, bf16, or int8 with one
fp32 scale per row, i.e. per last-dimension vector) and are decoded to
float32; integer tensors travel as int32.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["WIRE_DTYPES", "Gathered", "GatheredTo", "Reduced", "WireError", "ring_all_reduce_bytes", "encode",
           "decode", "decode_message", "check_wire_dtype"]

WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
_HEADER = struct.Struct("<I")


@dataclass
class Gathered:
    """What an all-gather hands back to one device."""

    items: list[dict[str, torch.Tensor]]  # one dict per rank, own rank included
    bytes_sent: int  # everything this rank serialised (header included)
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # of those, per tensor (scales included)
    seconds: float = 0.0  # encode + decode, not waiting for peers


@dataclass
class GatheredTo:
    """What a gather to one rank hands back: on that rank every rank's
    (meta, tensors) in rank order, elsewhere None."""

    items: list[tuple[dict, dict[str, torch.Tensor]]] | None
    bytes_sent: int  # what this rank serialised (0 on the destination)
    seconds: float = 0.0  # encode + decode, not waiting for peers
    received: list[int] | None = None  # on the destination: bytes that came from each rank


class WireError(ValueError):
    """A frame from another device that does not parse (temporary, hardened in the wire branch)."""


@dataclass
class Reduced:
    """What an all-reduce (sum) hands back to one device."""

    tensor: torch.Tensor  # the sum over ranks, bit-identical on every rank
    bytes_sent: int  # what a ring all-reduce puts on the wire per rank (see ring_all_reduce_bytes)
    seconds: float = 0.0  # encode + decode + sum, not waiting for peers


def ring_all_reduce_bytes(tensor_bytes: int, size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``tensor_bytes`` over
    ``size`` ranks: a reduce-scatter then an all-gather, each ``size - 1``
    steps of one ``1/size`` chunk, so 2 (P - 1) / P of the tensor (rounded
    down). The multi-process runtime uses gloo's all_reduce, a ring, so this,
    not the in-process exchange, is what would cross the network."""
    return 2 * (size - 1) * tensor_bytes // size


def check_wire_dtype(wire_dtype) -> str:
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype: expected one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
    return wire_dtype


def _encode_float(t: torch.Tensor, wire_dtype: str) -> list[bytes]:
    t = t.detach().to(torch.float32).contiguous()
    if wire_dtype == "fp32":
        return [t.numpy().tobytes()]
    if wire_dtype == "fp16":
        return [t.to(torch.float16).numpy().tobytes()]
    if wire_dtype == "bf16":
        return [t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()]
    # int8: symmetric, one scale per row so one large row does not flatten the rest.
    scale = t.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.round(t / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-127, 127).to(torch.int8)
    return [q.numpy().tobytes(), scale.numpy().tobytes()]


def _decode_float(parts: list[bytes], shape: list[int], wire_dtype: str) -> torch.Tensor:
    if wire_dtype == "fp32":
        arr = np.frombuffer(parts[0], dtype=np.float32)
        return torch.from_numpy(arr.copy()).reshape(shape)
    if wire_dtype == "fp16":
        return torch.from_numpy(np.frombuffer(parts[0], dtype=np.float16).copy()).reshape(shape).float()
    if wire_dtype == "bf16":
        raw = torch.from_numpy(np.frombuffer(parts[0], dtype=np.int16).copy())
        return raw.view(torch.bfloat16).reshape(shape).float()
    q = torch.from_numpy(np.frombuffer(parts[0], dtype=np.int8).copy()).reshape(shape).float()
    scale = torch.from_numpy(np.frombuffer(parts[1], dtype=np.float32).copy()).reshape(*shape[:-1], 1)
    return q * scale


def encode(tensors: dict[str, torch.Tensor], wire_dtype: str, meta=None) -> tuple[bytes, dict[str, int]]:
    """Serialise ``tensors``; returns the bytes and the bytes of each tensor."""
    check_wire_dtype(wire_dtype)
    header, blobs, sizes = [], [], {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point:
            dtype = wire_dtype
            parts = _encode_float(t, wire_dtype)
        elif t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool):
            dtype = "int32"
            parts = [t.detach().to(torch.int32).contiguous().numpy().tobytes()]
        else:
            raise TypeError(f"tensors[{name!r}]: cannot send dtype {t.dtype}")
        header.append({"name": name, "dtype": dtype, "shape": list(t.shape), "parts": [len(p) for p in parts]})
        blobs.extend(parts)
        sizes[name] = sum(len(p) for p in parts)
    head = json.dumps({"meta": meta or {}, "tensors": header}, separators=(",", ":")).encode()
    return _HEADER.pack(len(head)) + head + b"".join(blobs), sizes


def decode(data: bytes, sender=None) -> dict[str, torch.Tensor]:
    return decode_message(data, sender)[1]


def decode_message(data: bytes, sender=None):
    """Inverse of :func:`encode` (floating tensors come back as float32)."""
    data = bytes(data)
    (n,) = _HEADER.unpack_from(data, 0)
    full = json.loads(data[_HEADER.size : _HEADER.size + n])
    header = full["tensors"]
    offset = _HEADER.size + n
    out = {}
    for entry in header:
        parts = []
        for size in entry["parts"]:
            parts.append(data[offset : offset + size])
            offset += size
        if entry["dtype"] == "int32":
            out[entry["name"]] = torch.from_numpy(np.frombuffer(parts[0], dtype=np.int32).copy()).reshape(entry["shape"])
        else:
            out[entry["name"]] = _decode_float(parts, entry["shape"], entry["dtype"])
    if offset != len(data):
        raise ValueError(f"data: {len(data) - offset} trailing bytes after the last tensor")
    return full["meta"], out
