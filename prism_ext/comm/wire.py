"""Byte format of an exchange: named tensors plus a small JSON header -> bytes and back.

Frame layout (all integers little-endian)::

    b"PRSM" | version: uint8 | header length: uint32 | JSON header | tensor bytes

The header is ``{"meta": {...}, "tensors": [{"name", "dtype", "shape",
"parts"}, ...]}``; the tensor bytes follow in header order, each tensor as
one or more parts. Floating tensors travel in the wire dtype (fp32, fp16,
bf16, or int8 plus one fp32 scale per row, i.e. per last-dimension vector)
and are decoded to float32; integer and bool tensors travel as int32.

Frames come from other machines, so :func:`decode` treats them as untrusted:
no pickle, and every length, dtype and shape is checked against the bytes
received before anything proportional to a claimed size is allocated. Any
problem is a :class:`WireError` naming the sending rank.
"""

from __future__ import annotations

import json
import math
import operator
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["WIRE_DTYPES", "Gathered", "GatheredTo", "Pending", "Reduced", "WireError", "ring_all_reduce_bytes",
           "encode", "decode", "decode_message", "check_wire_dtype"]

WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
MAGIC = b"PRSM"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
MAX_HEADER_BYTES = 1 << 20
MAX_META_BYTES = 64 << 10
MAX_TENSORS = 64
MAX_NAME_CHARS = 64
MAX_DIMS = 8
# JSON arrays/objects ("[" or "{", counted in the raw text) allowed in meta, and
# in a whole header (meta plus 1 + 3 per tensor). Parsing "[{},{},...]" costs
# ~20x its bytes in Python objects; this keeps a 1 MiB header's parse small.
MAX_META_CONTAINERS = 4096
MAX_HEADER_CONTAINERS = MAX_META_CONTAINERS + 2 + 3 * 64
# Bound on prod(max(d, 1)) over a shape: a zero-size tensor costs no bytes, so
# without this [0, 2**62, 2**62] would pass the byte checks and then overflow
# torch's int64 strides. 2**48 elements is far beyond any real activation.
MAX_SPAN = 1 << 48

_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int32": 4}
_DTYPES = (*WIRE_DTYPES, "int32")
_ENTRY_KEYS = frozenset(("name", "dtype", "shape", "parts"))
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool)
_I32 = np.iinfo(np.int32)


class WireError(ValueError):
    """A frame that cannot be decoded: truncated, garbled, oversized or non-finite.

    The message starts with ``rank R: `` when the sender is known, ``frame: `` otherwise.
    """


@dataclass
class Gathered:
    """What an all-gather hands back to one device."""

    items: list[dict[str, torch.Tensor]]  # one dict per rank, own rank included
    bytes_sent: int  # everything this rank serialised (header included)
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # of those, per tensor (scales included)
    seconds: float = 0.0  # encode + decode, not waiting for peers


class Pending:
    """An all-gather under way: ``wait()`` returns its :class:`Gathered`."""

    def __init__(self, finish):
        self._finish = finish

    def wait(self) -> Gathered:
        return self._finish()


@dataclass
class GatheredTo:
    """What a gather to one rank hands back: on that rank every rank's
    (meta, tensors) in rank order, elsewhere None."""

    items: list[tuple[dict, dict[str, torch.Tensor]]] | None
    bytes_sent: int  # what this rank serialised (0 on the destination)
    seconds: float = 0.0  # encode + decode, not waiting for peers
    received: list[int] | None = None  # on the destination: bytes that came from each rank


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


def _short(x: Any, limit: int = 80) -> str:
    """repr(x), cut: values quoted in errors come from untrusted headers."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _rows_last(shape) -> tuple[int, int]:
    """(rows, last) of a shape: int8 keeps one scale per last-dimension vector."""
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _part_sizes(dtype: str, shape) -> list[int]:
    """Bytes each part of a tensor must have (Python ints: no overflow)."""
    numel = math.prod(shape)
    if dtype == "int8":
        return [numel, 4 * _rows_last(shape)[0]]
    return [numel * _ITEMSIZE[dtype]]


# ---------------------------------------------------------------- encode


def _encode_float(name: str, t: torch.Tensor, wire_dtype: str) -> list[bytes]:
    t = t.detach().to(torch.float32).contiguous()
    # The receiver rejects NaN/inf, so catch them here where the cause is visible.
    # (numpy, not torch, for these checks: torch's reductions cost ~100 us on small tensors.)
    if not np.isfinite(t.numpy()).all():
        raise ValueError(f"tensors[{name!r}]: has NaN or inf values, which the wire does not carry")
    if wire_dtype == "fp32":
        return [t.numpy().astype("<f4", copy=False).tobytes()]
    if wire_dtype in ("fp16", "bf16"):
        bits = t.to(torch.float16 if wire_dtype == "fp16" else torch.bfloat16).view(torch.int16).numpy()
        inf = 0x7C00 if wire_dtype == "fp16" else 0x7F80
        if ((bits & 0x7FFF) == inf).any():  # finite input, so it overflowed the wire dtype
            alt = "bf16 or fp32" if wire_dtype == "fp16" else "fp32"
            raise ValueError(f"wire_dtype: {wire_dtype} cannot hold tensors[{name!r}] (largest |value| "
                             f"{t.abs().max().item():g} overflows to inf); use {alt}")
        return [bits.astype("<i2", copy=False).tobytes()]
    # int8: symmetric, one scale per row so one large row does not flatten the rest.
    # numpy: the same IEEE float32 arithmetic as torch, without its per-op overhead.
    rows, last = _rows_last(t.shape)
    x = t.numpy().reshape(rows, last)
    if x.size == 0:  # max cannot reduce an empty row
        scale = np.zeros((rows, 1), np.float32)
    else:
        scale = np.abs(x).max(axis=1, keepdims=True) / np.float32(127.0)
    if not np.isfinite(scale * np.float32(127.0)).all():  # the receiver computes q * scale
        raise ValueError(f"wire_dtype: int8 cannot hold tensors[{name!r}] (values near the float32 limit); use fp32")
    q = np.rint(x / np.where(scale > 0, scale, np.float32(1.0))).clip(-127, 127).astype(np.int8)
    return [q.tobytes(), scale.astype("<f4", copy=False).tobytes()]


def _encode_int(name: str, t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.dtype == torch.int64 and t.numel() and (int(t.min()) < _I32.min or int(t.max()) > _I32.max):
        raise ValueError(f"tensors[{name!r}]: int64 values outside the int32 range the wire carries")
    return t.to(torch.int32).contiguous().numpy().astype("<i4", copy=False).tobytes()


def _meta_json(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"meta: expected a dict or None, got {type(meta).__name__}")
    try:
        text = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"meta: not JSON-serialisable ({exc})") from None
    if len(text.encode()) > MAX_META_BYTES:
        raise ValueError(f"meta: serialises to {len(text.encode())} bytes, more than the {MAX_META_BYTES} allowed")
    if text.count("[") + text.count("{") > MAX_META_CONTAINERS:  # brackets in strings count too, as in decode
        raise ValueError(f"meta: more than {MAX_META_CONTAINERS} lists/dicts (or brackets in its strings)")
    return meta


def encode(tensors: dict[str, torch.Tensor], wire_dtype: str, meta: dict | None = None) -> tuple[bytes, dict[str, int]]:
    """Serialise ``tensors`` (and the JSON-serialisable dict ``meta``).

    Returns the frame and the bytes of each tensor's data (int8 scales included).
    """
    check_wire_dtype(wire_dtype)
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected a dict of name -> tensor, got {type(tensors).__name__}")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"tensors: at most {MAX_TENSORS} tensors per frame, got {len(tensors)}")
    meta = _meta_json(meta)
    entries, blobs, sizes = [], [], {}
    for name, t in tensors.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"tensors: names must be str of at most {MAX_NAME_CHARS} characters, got {_short(name)}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensors[{name!r}]: at most {MAX_DIMS} dimensions, got {t.dim()}")
        if math.prod(max(d, 1) for d in t.shape) > MAX_SPAN:
            raise ValueError(f"tensors[{name!r}]: shape {list(t.shape)} is too large for the wire")
        if t.dtype.is_floating_point:
            dtype, parts = wire_dtype, _encode_float(name, t, wire_dtype)
        elif t.dtype in _INT_DTYPES:
            dtype, parts = "int32", [_encode_int(name, t)]
        else:
            raise TypeError(f"tensors[{name!r}]: cannot send dtype {t.dtype}")
        entries.append({"name": name, "dtype": dtype, "shape": list(t.shape), "parts": [len(p) for p in parts]})
        blobs.extend(parts)
        sizes[name] = sum(len(p) for p in parts)
    head = json.dumps({"meta": meta, "tensors": entries}, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES:  # cannot happen within the limits above; kept as a guard
        raise ValueError(f"tensors: header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, VERSION, len(head)) + head + b"".join(blobs), sizes


# ---------------------------------------------------------------- decode


def _as_buffer(data) -> np.ndarray:
    """``data`` as a flat uint8 array, without copying where possible."""
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, memoryview):
        if not data.c_contiguous:
            data = data.tobytes()
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"data: expected a 1-D uint8 tensor, got {data.dtype} with {data.dim()} dims")
        return data.detach().cpu().contiguous().numpy()
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"data: expected a 1-D uint8 array, got {data.dtype} with {data.ndim} dims")
        return np.ascontiguousarray(data)
    raise TypeError(f"data: expected bytes, bytearray, memoryview or a 1-D uint8 array/tensor, got {type(data).__name__}")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in an object")
    return dict(pairs)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


class _Reader:
    """Checks one frame; ``fail`` raises a WireError naming the sender."""

    def __init__(self, sender):
        self.prefix = "frame: " if sender is None else f"rank {sender}: "

    def fail(self, msg: str):
        raise WireError(self.prefix + msg)

    def header(self, buf: np.ndarray) -> tuple[int, dict, list]:
        n = len(buf)
        if n < _PREFIX.size:
            self.fail(f"frame truncated: {n} bytes, shorter than the {_PREFIX.size}-byte prefix")
        magic, version, hlen = _PREFIX.unpack(buf[: _PREFIX.size].tobytes())
        if magic != MAGIC:
            self.fail(f"not a PRISM frame (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            self.fail(f"unsupported format version {version} (this build reads {VERSION})")
        if hlen > MAX_HEADER_BYTES:
            self.fail(f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if hlen > n - _PREFIX.size:
            self.fail(f"frame truncated: header says {hlen} header bytes, got {n - _PREFIX.size}")
        raw = buf[_PREFIX.size : _PREFIX.size + hlen].tobytes()
        containers = raw.count(b"[") + raw.count(b"{")
        if containers > MAX_HEADER_CONTAINERS:
            self.fail(f"header has {containers} JSON arrays/objects, more than the {MAX_HEADER_CONTAINERS} allowed")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"header is not UTF-8 ({exc.reason} at byte {exc.start})")
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
        except RecursionError:
            self.fail("header JSON is nested too deeply")
        except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN, ints of > 4300 digits
            self.fail(f"header is not valid JSON ({_short(str(exc), 120)})")
        if type(obj) is not dict or set(obj) != {"meta", "tensors"}:
            got = sorted(obj)[:8] if type(obj) is dict else type(obj).__name__
            self.fail(f"header: expected an object with keys meta, tensors; got {_short(got)}")
        meta, entries = obj["meta"], obj["tensors"]
        if type(meta) is not dict:
            self.fail(f"header meta: expected an object, got {type(meta).__name__}")
        if type(entries) is not list:
            self.fail(f"header tensors: expected a list, got {type(entries).__name__}")
        if len(entries) > MAX_TENSORS:
            self.fail(f"header tensors: {len(entries)} entries, more than the {MAX_TENSORS} allowed")
        specs = [self.entry(i, e) for i, e in enumerate(entries)]
        names = [spec[0] for spec in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            self.fail(f"header tensors: name {_short(dup)} appears more than once")
        return _PREFIX.size + hlen, meta, specs

    def entry(self, i: int, e) -> tuple[str, str, list[int], list[int]]:
        def bad(field: str, msg: str):  # the location is built only on failure
            where = f"header tensors[{i}]" + (f" ({_short(e['name'])})" if field != "name" and type(e) is dict else "")
            self.fail(f"{where}{' ' + field if field else ''}: {msg}")

        if type(e) is not dict or set(e) != _ENTRY_KEYS:
            got = sorted(e)[:8] if type(e) is dict else type(e).__name__
            self.fail(f"header tensors[{i}]: expected an object with keys dtype, name, parts, shape; got {_short(got)}")
        name, dtype, shape, parts = e["name"], e["dtype"], e["shape"], e["parts"]
        if type(name) is not str or len(name) > MAX_NAME_CHARS:
            bad("name", f"expected a str of at most {MAX_NAME_CHARS} characters, got {_short(name)}")
        if type(dtype) is not str or dtype not in _DTYPES:
            bad("dtype", f"expected one of {', '.join(_DTYPES)}, got {_short(dtype)}")
        # type(d) is int: JSON true/false arrive as bool, which isinstance would take for an int.
        if (type(shape) is not list or len(shape) > MAX_DIMS
                or any(type(d) is not int or d < 0 for d in shape)):
            bad("shape", f"expected a list of at most {MAX_DIMS} non-negative ints, got {_short(shape)}")
        if math.prod(max(d, 1) for d in shape) > MAX_SPAN:
            bad("shape", f"{_short(shape)} is too large (product of its dimensions over 2**48)")
        want = _part_sizes(dtype, shape)
        if type(parts) is not list or any(type(p) is not int or p < 0 for p in parts):
            bad("parts", f"expected a list of non-negative ints, got {_short(parts)}")
        if parts != want:
            bad("parts", f"{_short(parts)} do not match dtype {dtype} and shape {_short(shape)} (expected {want})")
        return name, dtype, shape, parts

    def tensor(self, buf: np.ndarray, off: int, name: str, dtype: str, shape: list[int], parts: list[int]):
        # Every view below is of a length already checked; astype makes the one
        # independent, native-order copy that becomes the output tensor.
        raw = buf[off : off + parts[0]]
        if dtype == "int32":
            return torch.from_numpy(raw.view("<i4").astype(np.int32)).reshape(shape)
        if dtype == "fp32":
            arr = raw.view("<f4").astype(np.float32)
        elif dtype == "fp16":
            arr = raw.view("<f2").astype(np.float32)
        elif dtype == "bf16":  # bf16 is the top half of a float32
            bits = raw.view("<u2").astype(np.uint32)
            bits <<= 16
            arr = bits.view(np.float32)
        else:
            rows, last = _rows_last(shape)
            scale = buf[off + parts[0] : off + parts[0] + parts[1]].view("<f4").astype(np.float32)
            if not (np.isfinite(scale).all() and (scale >= 0).all()):
                self.fail(f"tensor {_short(name)} (int8): scales must be finite and >= 0")
            arr = raw.view(np.int8).astype(np.float32)
            grid = arr.reshape(rows, last)  # a view: scales arr in place, no second copy
            with np.errstate(over="ignore"):  # overflow to inf is caught just below
                grid *= scale.reshape(rows, 1)
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            self.fail(f"tensor {_short(name)} ({dtype}): non-finite value {arr[bad]} at flat index {bad}")
        return torch.from_numpy(arr).reshape(shape)


def decode_message(data, sender: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Inverse of :func:`encode`: ``(meta, tensors)``, floating tensors as float32.

    ``data`` is bytes, bytearray, memoryview or a 1-D uint8 numpy array / torch
    tensor; ``sender`` is the rank it came from, named in errors. Raises
    :class:`WireError` for any frame that is not exactly what :func:`encode`
    could have produced (structure, lengths, finite values).
    """
    if sender is not None:
        sender = operator.index(sender)  # TypeError for a caller bug, not a frame problem
    buf = _as_buffer(data)
    r = _Reader(sender)
    try:
        off, meta, entries = r.header(buf)
        need = sum(sum(parts) for *_, parts in entries)
        got = len(buf) - off
        if need > got:
            r.fail(f"frame truncated: header says {need} bytes of tensor data, got {got}")
        if need < got:
            r.fail(f"{got - need} trailing bytes after the last tensor")
        out = {}
        for name, dtype, shape, parts in entries:
            out[name] = r.tensor(buf, off, name, dtype, shape, parts)
            off += sum(parts)
        return meta, out
    except WireError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError, KeyError, RecursionError) as exc:
        # Defence in depth: the checks above should leave nothing to reach here,
        # but a peer's bytes must never surface as anything but a WireError.
        r.fail(f"malformed frame ({type(exc).__name__}: {_short(str(exc), 120)})")


def decode(data, sender: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a frame (see :func:`decode_message`)."""
    return decode_message(data, sender)[1]
