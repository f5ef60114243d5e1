"""The wire format: round trips, and untrusted frames fail as WireError naming the sender."""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from prism_ext.comm import LocalGroup, WireError, decode, decode_message, encode
from prism_ext.comm import wire

FUZZ = settings(max_examples=250, deadline=None)
ROUND = settings(max_examples=200, deadline=None)


# ---------------------------------------------------------------- helpers

FLOAT_DTYPES = (np.float32, np.float64)
INT_DTYPES = (np.int32, np.int64, np.int16, np.int8, np.uint8, np.bool_)


@st.composite
def tensor_dicts(draw, max_tensors=4, fp16_safe=True):
    """Dicts of up to ``max_tensors`` named tensors with small shapes (zero-size dims included)."""
    names = draw(st.lists(st.text(max_size=wire.MAX_NAME_CHARS), max_size=max_tensors, unique=True))
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        dtype = draw(st.sampled_from(FLOAT_DTYPES + INT_DTYPES))
        if dtype in FLOAT_DTYPES:
            bound = 65000.0 if fp16_safe else 2.0**100
            elems = st.floats(-bound, bound, width=32, allow_subnormal=False)
        elif dtype == np.bool_:
            elems = st.booleans()
        else:
            info = np.iinfo(dtype)
            elems = st.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1))
        out[name] = torch.from_numpy(draw(arrays(dtype, shape, elements=elems)))
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


def frame(header, payload: bytes = b"", *, magic=b"PRSM", version=1, hlen=None) -> bytes:
    """A frame around ``header`` (an object to JSON-encode, or raw bytes)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sBI", magic, version, len(head) if hlen is None else hlen) + head + payload


def entry(name="x", dtype="fp32", shape=(2,), parts=None):
    if parts is None:
        parts = wire._part_sizes(dtype, list(shape))
    return {"name": name, "dtype": dtype, "shape": list(shape) if isinstance(shape, (list, tuple)) else shape,
            "parts": parts}


def check_close(x: torch.Tensor, y: torch.Tensor, wire_dtype: str):
    """``y`` is ``x`` after a trip in ``wire_dtype``, within that dtype's rounding."""
    assert y.shape == x.shape
    if not x.dtype.is_floating_point:
        assert y.dtype == torch.int32
        assert torch.equal(y, x.to(torch.int32))
        return
    assert y.dtype == torch.float32
    x = x.to(torch.float32)
    if wire_dtype == "fp32":
        assert torch.equal(y, x)
        return
    x64, err = x.double(), (y.double() - x.double()).abs()
    if wire_dtype == "fp16":  # half an ulp: relative 2**-11, 2**-25 among subnormals
        tol = x64.abs() * 2.0**-11 + 2.0**-25
    elif wire_dtype == "bf16":
        tol = x64.abs() * 2.0**-8 + 2.0**-134
    else:  # int8: half a quantisation step of the row, plus float32 rounding
        last = x.shape[-1] if x.dim() else 1
        rows = x64.reshape(math.prod(x.shape[:-1]) if x.dim() else 1, last)
        amax = rows.abs().amax(dim=1, keepdim=True) if rows.numel() else torch.zeros(rows.shape[0], 1)
        tol = (amax / 127 * 0.5 + amax * 1e-6 + 1e-44).expand_as(rows).reshape(x.shape)
    assert bool((err <= tol).all()), f"{wire_dtype}: max error {err.max().item()}"


def decoded_bytes(out: dict) -> int:
    return sum(t.numel() * t.element_size() for t in out.values())


# ---------------------------------------------------------------- round trips


@ROUND
@given(tensors=tensor_dicts(), wire_dtype=st.sampled_from(wire.WIRE_DTYPES), meta=st.none() | metas)
def test_round_trip(tensors, wire_dtype, meta):
    data, sizes = encode(tensors, wire_dtype, meta=meta)
    got_meta, out = decode_message(data, sender=0)
    assert got_meta == (meta or {})
    assert list(out) == list(tensors)
    for name, x in tensors.items():
        check_close(x, out[name], wire_dtype)
        dtype = wire_dtype if x.dtype.is_floating_point else "int32"
        assert sizes[name] == sum(wire._part_sizes(dtype, list(x.shape)))
    assert decode(data) .keys() == out.keys()


@ROUND
@given(tensors=tensor_dicts(fp16_safe=False), wire_dtype=st.sampled_from(("fp32", "bf16", "int8")))
def test_round_trip_wide_range(tensors, wire_dtype):
    check = decode(encode(tensors, wire_dtype)[0])
    for name, x in tensors.items():
        check_close(x, check[name], wire_dtype)


def test_sizes_and_layout():
    x = torch.randn(3, 5)
    data, sizes = encode({"rows": x, "ends": torch.tensor([1, 2, 3])}, "int8", meta={"step": 1})
    assert sizes == {"rows": 15 + 3 * 4, "ends": 12}
    assert data[:5] == b"PRSM\x01"
    (hlen,) = struct.unpack_from("<I", data, 5)
    header = json.loads(data[9 : 9 + hlen])
    assert header["meta"] == {"step": 1}
    assert [e["name"] for e in header["tensors"]] == ["rows", "ends"]
    assert len(data) == 9 + hlen + sum(sizes.values())


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8),
                                  lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)])
def test_input_kinds_and_independent_outputs(wrap):
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = bytearray(encode({"x": x, "n": torch.tensor([7])}, "fp32")[0])
    src = wrap(bytes(data))
    a, b = decode(src), decode(src)
    a["x"] += 1  # writable, and shares nothing with the frame or the other decode
    assert torch.equal(b["x"], x) and torch.equal(decode(src)["x"], x)
    assert a["x"].is_contiguous() and a["n"].dtype == torch.int32


def test_local_group_round_trip():
    def fn(t):
        return t.all_gather({"r": torch.full((2,), float(t.rank))}, "bf16").items

    items = LocalGroup(3).run([fn] * 3)[0]
    assert [float(it["r"][0]) for it in items] == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------- encode errors


def test_fp16_overflow_is_an_error():
    encode({"x": torch.tensor([65504.0, -65504.0])}, "fp16")  # the largest fp16 is fine
    with pytest.raises(ValueError, match=r"wire_dtype: fp16 cannot hold tensors\['x'\].*bf16 or fp32"):
        encode({"x": torch.tensor([1.0, 70000.0])}, "fp16")
    with pytest.raises(ValueError, match=r"wire_dtype: bf16 cannot hold .*fp32"):
        encode({"x": torch.tensor([3.4e38])}, "bf16")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("wire_dtype", wire.WIRE_DTYPES)
def test_non_finite_is_not_sent(value, wire_dtype):
    with pytest.raises(ValueError, match=r"tensors\['x'\]: has NaN or inf"):
        encode({"x": torch.tensor([1.0, value])}, wire_dtype)


@pytest.mark.parametrize("meta", [[1, 2], "x", {"a": object()}, {"a": float("nan")}, {"a": "x" * (64 << 10)},
                                  {"a": [[]] * 5000}])
def test_bad_meta(meta):
    with pytest.raises(ValueError, match="^meta: "):
        encode({}, "fp32", meta=meta)


def test_encode_limits():
    with pytest.raises(ValueError, match="names must be str"):
        encode({"n" * 65: torch.zeros(1)}, "fp32")
    with pytest.raises(ValueError, match="at most 8 dimensions"):
        encode({"x": torch.zeros([1] * 9)}, "fp32")
    with pytest.raises(ValueError, match="at most 64 tensors"):
        encode({str(i): torch.zeros(1) for i in range(65)}, "fp32")
    with pytest.raises(ValueError, match="int32 range"):
        encode({"x": torch.tensor([2**40])}, "fp32")


# ---------------------------------------------------------------- untrusted frames

VALID = [
    encode({"rows": torch.randn(2, 3, 4), "counts": torch.tensor([[1, 2]]), "ends": torch.tensor([3, 5])}, dt,
           meta={"req": "abc", "n": 2})[0]
    for dt in wire.WIRE_DTYPES
]


@FUZZ
@given(data=st.data())
def test_truncation_is_an_error(data):
    full = data.draw(st.sampled_from(VALID) | tensor_dicts().map(lambda t: encode(t, "int8")[0]))
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(WireError, match=r"^rank 5: "):
        decode(full[:cut], sender=5)


@FUZZ
@given(data=st.data())
def test_corruption_is_an_error_or_bounded(data):
    full = bytearray(data.draw(st.sampled_from(VALID)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(full) - 1))
        if data.draw(st.booleans()):
            full[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            full[pos] = data.draw(st.integers(0, 255))
    try:
        meta, out = decode_message(bytes(full), sender=1)
    except WireError as exc:
        assert str(exc).startswith("rank 1: ")
        return
    assert isinstance(meta, dict)
    assert decoded_bytes(out) <= 4 * len(full)
    assert all(t.dtype in (torch.float32, torch.int32) for t in out.values())


@FUZZ
@given(data=st.data())
def test_random_headers_are_errors_or_bounded(data):
    """Structurally plausible headers with random values, around a random payload."""
    dim = st.integers(-3, 2**64) | st.integers(0, 6) | st.floats() | st.booleans() | st.none() | st.text(max_size=2)
    ent = st.fixed_dictionaries({
        "name": st.text(max_size=3) | st.integers(),
        "dtype": st.sampled_from(["fp32", "fp16", "bf16", "int8", "int32", "fp64", 4]),
        "shape": st.lists(dim, max_size=10) | dim,
        "parts": st.lists(st.integers(-2, 2**70) | st.integers(0, 64) | st.booleans(), max_size=3),
    })
    header = {"meta": data.draw(metas | st.integers()), "tensors": data.draw(st.lists(ent, max_size=4))}
    payload = data.draw(st.binary(max_size=256))
    blob = frame(header, payload)
    try:
        out = decode(blob, sender=2)
    except WireError as exc:
        assert str(exc).startswith("rank 2: ")
        return
    assert decoded_bytes(out) <= 4 * len(blob)


def nested(depth: int) -> bytes:
    return b'{"meta":{"a":' + b"[" * depth + b"]" * depth + b'},"tensors":[]}'


ABSURD = {
    "shape 2**62 x 2**62": frame({"meta": {}, "tensors": [entry(shape=(2**62, 2**62), parts=[2**126])]}),
    "zero-size with 2**62 dims": frame({"meta": {}, "tensors": [entry(shape=(0, 2**62, 2**62), parts=[0])]}),
    "negative dim": frame({"meta": {}, "tensors": [entry(shape=(-1, 4), parts=[16])]}),
    "9 dims": frame({"meta": {}, "tensors": [entry(shape=[1] * 9, parts=[4])]}),
    "float dim": frame({"meta": {}, "tensors": [entry(shape=[2.0], parts=[8])]}),
    "bool dim": frame({"meta": {}, "tensors": [entry(shape=[True], parts=[4])]}),
    "shape not a list": frame({"meta": {}, "tensors": [entry(shape=4, parts=[16])]}),
    "huge part": frame({"meta": {}, "tensors": [entry(shape=(4,), parts=[10**30])]}),
    "huge consistent part": frame({"meta": {}, "tensors": [entry(shape=(2**40,))]}, b"\0" * 100),
    "negative part": frame({"meta": {}, "tensors": [entry(shape=(0,), parts=[-1])]}),
    "bool part": frame({"meta": {}, "tensors": [entry(shape=(1,), parts=[True])]}),
    "int8 one part": frame({"meta": {}, "tensors": [entry(dtype="int8", shape=(2,), parts=[2])]}, b"\0" * 2),
    "duplicate names": frame({"meta": {}, "tensors": [entry(), entry()]}, b"\0" * 16),
    "unknown dtype": frame({"meta": {}, "tensors": [entry(dtype="fp64", parts=[16])]}, b"\0" * 16),
    "name too long": frame({"meta": {}, "tensors": [entry(name="n" * 65)]}, b"\0" * 8),
    "name not a str": frame({"meta": {}, "tensors": [entry(name=7)]}, b"\0" * 8),
    "missing key": frame({"meta": {}, "tensors": [{"name": "x", "dtype": "fp32", "shape": [2]}]}, b"\0" * 8),
    "extra key": frame({"meta": {}, "tensors": [{**entry(), "pickle": 1}]}, b"\0" * 8),
    "extra top-level key": frame({"meta": {}, "tensors": [], "x": 1}),
    "missing meta": frame({"tensors": []}),
    "meta not a dict": frame({"meta": [], "tensors": []}),
    "tensors not a list": frame({"meta": {}, "tensors": {}}),
    "header not an object": frame([1, 2]),
    "65 tensors": frame({"meta": {}, "tensors": [entry(name=str(i), shape=(0,)) for i in range(65)]}),
    "10**6 tensors": frame(b'{"meta":{},"tensors":[' + b",".join([b"{}"] * 10**6) + b"]}"),
    "10**6 tensors, lying length": frame(b'{"meta":{},"tensors":[' + b"{}," * 300000, hlen=900000),
    "deep nesting": nested(500_000),
    "deep nesting within the bracket limit": nested(3000),
    "not UTF-8": frame(b'{"meta":{"a":"\xff\xfe"},"tensors":[]}'),
    "not JSON": frame(b'{"meta":{},"tensors":[}'),
    "NaN in header": frame(b'{"meta":{"a":NaN},"tensors":[]}'),
    "huge int in header": frame(b'{"meta":{"a":' + b"9" * 5000 + b'},"tensors":[]}'),
    "duplicate JSON keys": frame(b'{"meta":{},"meta":{},"tensors":[]}'),
    "empty": b"",
    "short prefix": b"PRSM\x01\0",
    "bad magic": frame({"meta": {}, "tensors": []}, magic=b"PKL\x80"),
    "old format": struct.pack("<I", 2) + b"[]",
    "bad version": frame({"meta": {}, "tensors": []}, version=2),
    "header over 1 MiB": frame(b" " * 16, hlen=(1 << 20) + 1),
    "header past the end": frame(b"{}", hlen=50),
    "header length 2**32-1": frame(b"{}", hlen=2**32 - 1),
    "trailing bytes": frame({"meta": {}, "tensors": [entry()]}, b"\0" * 9),
    "truncated data": frame({"meta": {}, "tensors": [entry(shape=(1024,))]}, b"\0" * 100),
}


@pytest.mark.parametrize("sender", [3, None])
@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_frames(case, sender):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(WireError) as info:
            decode(ABSURD[case], sender=sender)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith("rank 3: " if sender == 3 else "frame: ")
    assert time.perf_counter() - t0 < 5
    # Nothing proportional to a claimed size: at most a few copies of the frame.
    assert peak < 4 * len(ABSURD[case]) + (1 << 20), f"peak {peak} bytes"


def test_error_wording():
    full = frame({"meta": {}, "tensors": [entry(shape=(1024,))]}, b"\0" * 100)
    with pytest.raises(WireError, match=r"^rank 2: frame truncated: header says 4096 bytes of tensor data, got 100$"):
        decode(full, sender=2)
    with pytest.raises(WireError, match=r"^frame: 1 trailing bytes after the last tensor$"):
        decode(ABSURD["trailing bytes"])
    assert issubclass(WireError, ValueError)


def patched(wire_dtype: str, raw: bytes, at_end: int = 0) -> bytes:
    """A valid frame of x = [1, 2] whose data bytes ending ``at_end`` from the end are ``raw``."""
    data = bytearray(encode({"x": torch.tensor([[1.0, 2.0]])}, wire_dtype)[0])
    end = len(data) - at_end
    data[end - len(raw) : end] = raw
    return bytes(data)


NON_FINITE = {
    "fp32 nan": patched("fp32", np.float32("nan").tobytes()),
    "fp32 inf": patched("fp32", np.float32("inf").tobytes()),
    "fp32 -inf": patched("fp32", np.float32("-inf").tobytes()),
    "fp16 inf": patched("fp16", b"\x00\x7c"),
    "fp16 nan": patched("fp16", b"\x00\x7e"),
    "bf16 inf": patched("bf16", b"\x80\x7f"),
    "bf16 nan": patched("bf16", b"\xc0\x7f"),
    "int8 nan scale": patched("int8", np.float32("nan").tobytes()),
    "int8 inf scale": patched("int8", np.float32("inf").tobytes()),
    "int8 negative scale": patched("int8", np.float32(-1.0).tobytes()),
    "int8 overflowing scale": patched("int8", np.float32(3e38).tobytes()),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_payloads(case):
    with pytest.raises(WireError, match=r"^rank 4: tensor 'x' .*(non-finite|finite and >= 0)"):
        decode(NON_FINITE[case], sender=4)
    assert decode(patched("fp32", np.float32(5.0).tobytes()))["x"].tolist() == [[1.0, 5.0]]


def test_argument_types():
    with pytest.raises(TypeError, match="^data: "):
        decode([1, 2, 3])
    with pytest.raises(TypeError, match="^data: "):
        decode(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="^data: "):
        decode(np.zeros((2, 2), np.uint8))
