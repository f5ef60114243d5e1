"""The face of the C++ kernels (``prism_ext._C``).

Every function takes torch CPU tensors or numpy arrays and returns the type of
its first argument. float32 inputs whose last dimension is contiguous are
passed without a copy (other strides included); anything else with the right
dtype (a last dimension with stride != 1) is copied once. Wrong dtypes, ranks,
shapes, devices and values raise TypeError/ValueError naming the argument.

The thin path: ``_C`` reads tensors and arrays of exactly the dtypes and
ranks the kernels use (float32 data, int32 positions, bool/uint8 ``valid``,
``(n,)`` or ``(B, n)`` side inputs, 4-d attention, 2-d or 3-d segment means) and
checks all of it itself, so each function first hands its arguments straight
to ``_C``; only when that refuses them (TypeError/ValueError) are they
normalised here and passed again, and then ``_C``'s error is the one raised.

Side inputs are indexed by the first (batch) dimension: ``counts`` and
``k_pos`` are ``(nk,)`` or ``(B, nk)``, ``q_pos`` is ``(nq,)`` or ``(B, nq)``.

Weight-only quantized linear layers: ``int8_linear`` / ``int4_linear`` keep
the activations in float32 and convert the weights to float in registers, so
they compute ``x @ w.T + bias`` for the dequantized weights ``w``
(``int8_dequantize`` / ``int4_dequantize`` write the same ``w``); the weights
come from ``quantize_int8`` / ``quantize_int4`` (torch, deterministic, once at
load time). The weight-side arrays (``q``, ``scale``, ``offset``, ``bias``) are
read in place and must be C-contiguous with exactly the dtype named; a
non-contiguous one is refused, not copied (a copy on every call would cost
more than the layer).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator

import numpy as np
import torch

from . import _C

__all__ = [
    "segment_means",
    "compressed_attention",
    "masked_softmax",
    "int8_linear",
    "int4_linear",
    "int8_dequantize",
    "int4_dequantize",
    "quantize_int8",
    "pack_int4",
    "quantize_int4",
    "available_isas",
    "active_isa",
    "dispatched_isas",
    "use_isa",
    "cpu_features",
    "get_num_threads",
    "set_num_threads",
]

_INT32_MAX = 2**31 - 1
_F32 = np.dtype(np.float32)


def _as_array(x, name: str, *, min_ndim: int = 1, output: bool = False) -> np.ndarray:
    """A float32 numpy view of ``x`` (torch tensor or ndarray).
    Inputs the kernels cannot read in place are copied; an ``output`` never
    is (the result would land in the copy), it raises instead.
    This runs on every kernel call: cheap checks first, nothing allocated."""
    if isinstance(x, torch.Tensor):
        if not x.is_cpu:
            raise TypeError(f"{name}: expected a CPU tensor, got a tensor on {x.device}")
        if x.layout is not torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
        if x.dtype is not torch.float32:
            raise TypeError(f"{name}: expected dtype float32, got {x.dtype}")
        if x.requires_grad:
            x = x.detach()
        if x.is_neg():
            if output:
                raise ValueError(f"{name}: must not be a lazily negated view")
            x = x.resolve_neg()
        arr = x.numpy()
    elif isinstance(x, np.ndarray):
        arr = x
        if arr.dtype != _F32:
            raise TypeError(f"{name}: expected dtype float32, got {arr.dtype}")
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(arr.shape)}")
    strides = arr.strides
    if (strides[-1] != 4 and arr.shape[-1] > 1) or min(strides) < 0:
        if output:
            raise ValueError(f"{name}: must be C-contiguous, got strides {strides}")
        arr = np.ascontiguousarray(arr)
    return arr


def _wrap(result: np.ndarray, like):
    return torch.from_numpy(result) if isinstance(like, torch.Tensor) else result


def _counts(counts, name: str, batch: int, n: int):
    """(n,) or (batch, n) finite, non-negative weights -> float32 [1 or batch, n]."""
    if counts is None:
        return None
    if isinstance(counts, torch.Tensor):
        if not counts.is_cpu:
            raise TypeError(f"{name}: expected a CPU tensor, got a tensor on {counts.device}")
        if counts.dtype == torch.bool or counts.is_complex():
            raise TypeError(f"{name}: expected real numbers, got dtype {counts.dtype}")
        counts = counts.detach().to(torch.float32).numpy()
    elif isinstance(counts, np.ndarray):
        if counts.dtype.kind not in "iuf":
            raise TypeError(f"{name}: expected real numbers, got dtype {counts.dtype}")
        counts = counts.astype(np.float32, copy=False)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(counts).__name__}")
    # Finite and >= 0 is checked by the C++ driver, which reads them anyway.
    return _batched(counts, name, batch, n)


def _positions(pos, name: str, batch: int, n: int):
    """(n,) or (batch, n) integer positions -> int32 [1 or batch, n]."""
    if pos is None:
        return None
    if isinstance(pos, torch.Tensor):
        if not pos.is_cpu:
            raise TypeError(f"{name}: expected a CPU tensor, got a tensor on {pos.device}")
        if pos.dtype.is_floating_point or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer dtype, got {pos.dtype}")
        pos = pos.detach().numpy()
    elif isinstance(pos, np.ndarray):
        if pos.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected an integer dtype, got {pos.dtype}")
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(pos).__name__}")
    if pos.dtype != np.int32:
        if pos.size and (pos.min() < -_INT32_MAX or pos.max() > _INT32_MAX):
            raise ValueError(f"{name}: positions must fit in int32")
        pos = pos.astype(np.int32)
    return _batched(pos, name, batch, n)


def _batched(a: np.ndarray, name: str, batch: int, n: int) -> np.ndarray:
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != n or a.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected shape ({n},) or ({batch}, {n}), got {tuple(a.shape)}")
    return np.ascontiguousarray(a)


def segment_means(x, seg: int, valid=None):
    """Means of consecutive ``seg``-row segments of ``x[..., n, d]``.

    Returns ``(means[..., m, d], counts[..., m])`` with ``m = ceil(n / seg)``
    (the last segment may be shorter). Rows where ``valid[..., n]`` is False
    are left out; a segment with no valid row has count 0 and a zero mean.
    """
    try:
        return _C.segment_means(x, seg, valid)
    except (TypeError, ValueError):
        pass
    arr = _as_array(x, "x", min_ndim=2)
    if isinstance(seg, bool) or not isinstance(seg, (int, np.integer)):
        raise TypeError(f"seg: expected an int, got {type(seg).__name__}")
    if seg < 1:
        raise ValueError(f"seg: must be >= 1, got {seg}")
    lead, (n, d) = arr.shape[:-2], arr.shape[-2:]
    if n < 1 or d < 1:
        raise ValueError(f"x: needs at least one row and one column, got shape {tuple(arr.shape)}")
    flat = arr.reshape(-1, n, d)
    valid_arr = None
    if valid is not None:
        if isinstance(valid, torch.Tensor):
            if not valid.is_cpu:
                raise TypeError(f"valid: expected a CPU tensor, got a tensor on {valid.device}")
            valid = valid.detach().numpy()
        if not isinstance(valid, np.ndarray):
            raise TypeError(f"valid: expected a torch.Tensor or numpy.ndarray, got {type(valid).__name__}")
        if valid.dtype != np.bool_ and valid.dtype.kind not in "iu":
            raise TypeError(f"valid: expected a bool or integer dtype, got {valid.dtype}")
        if tuple(valid.shape) != tuple(arr.shape[:-1]):
            raise ValueError(f"valid: expected shape {tuple(arr.shape[:-1])}, got {tuple(valid.shape)}")
        valid_arr = np.ascontiguousarray((valid != 0).reshape(-1, n).view(np.uint8))
    # seg > n is one segment of all n rows; clamping keeps any Python int
    # (even beyond int64) a valid argument for the C++ side.
    means, counts = _C.segment_means(flat, min(int(seg), n), valid_arr)
    m = means.shape[1]
    return _wrap(means.reshape(*lead, m, d), x), _wrap(counts.reshape(*lead, m), x)


def _heads_view(arr: np.ndarray, name: str, shape_hint: str) -> np.ndarray:
    """[..., n, dh] -> [B, G, n, dh]: first dimension batch, the rest heads."""
    if arr.ndim < 2:
        raise ValueError(f"{name}: expected {shape_hint}, got shape {tuple(arr.shape)}")
    if arr.ndim == 2:
        return arr[None, None]
    if arr.ndim == 3:
        return arr[:, None]
    return arr.reshape(arr.shape[0], -1, *arr.shape[-2:])


def compressed_attention(q, k, v, counts=None, q_pos=None, k_pos=None, scale=None):
    """Attention in which key j carries weight ``counts[j]``:

        out_i = sum_j c_j exp(s_ij) v_j / sum_j c_j exp(s_ij),  s_ij = scale q_i . k_j

    (count 0 masks a key). With positions, key j is visible to query i iff
    ``k_pos[j] <= q_pos[i]``. ``q[B, H, nq, dh]``, ``k``/``v`` ``[B, H, nk, dh]``
    (any number of head dimensions after B, or none); ``scale`` defaults to
    ``1/sqrt(dh)``. A query with no visible key gets a zero row.
    """
    try:
        return _C.compressed_attention(q, k, v, counts, q_pos, k_pos, scale)
    except (TypeError, ValueError):
        pass
    qa = _as_array(q, "q", min_ndim=2)
    ka = _as_array(k, "k", min_ndim=2)
    va = _as_array(v, "v", min_ndim=2)
    if ka.shape != va.shape:
        raise ValueError(f"v: expected the shape of k {tuple(ka.shape)}, got {tuple(va.shape)}")
    if ka.ndim != qa.ndim or ka.shape[:-2] != qa.shape[:-2] or ka.shape[-1] != qa.shape[-1]:
        raise ValueError(
            f"k: expected shape {tuple(qa.shape[:-2]) + ('nk', qa.shape[-1])} to match q {tuple(qa.shape)}, "
            f"got {tuple(ka.shape)}"
        )
    if qa.size == 0 or ka.size == 0:
        raise ValueError(f"q: empty input (q {tuple(qa.shape)}, k {tuple(ka.shape)})")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos: q_pos and k_pos must be given together")
    nq, dh = qa.shape[-2:]
    nk = ka.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    q4 = _heads_view(qa, "q", "[B, H, nq, dh]")
    k4 = _heads_view(ka, "k", "[B, H, nk, dh]")
    v4 = _heads_view(va, "v", "[B, H, nk, dh]")
    batch = q4.shape[0]
    out = _C.compressed_attention(
        q4,
        k4,
        v4,
        _counts(counts, "counts", batch, nk),
        _positions(q_pos, "q_pos", batch, nq),
        _positions(k_pos, "k_pos", batch, nk),
        float(scale),
    )
    return _wrap(out.reshape(qa.shape), q)


def masked_softmax(scores, counts=None, q_pos=None, k_pos=None, additive_mask=None, out=None):
    """Row softmax over the last dimension of ``scores[..., nq, nk]`` with key
    weights ``counts`` (0 masks), the causal position rule and an additive mask
    broadcastable to ``scores``. Rows with nothing visible are zeros.
    ``out`` (same type and shape as ``scores``, C-contiguous float32) may be
    ``scores`` itself for an in-place softmax. ``scores`` is copied if not
    C-contiguous.
    """
    try:
        return _C.masked_softmax(scores, counts, q_pos, k_pos, additive_mask, out)
    except (TypeError, ValueError):
        pass
    arr = _as_array(scores, "scores", min_ndim=2)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.size == 0:
        raise ValueError(f"scores: must not be empty, got shape {tuple(arr.shape)}")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos: q_pos and k_pos must be given together")
    nq, nk = arr.shape[-2:]
    batch = arr.shape[0] if arr.ndim > 2 else 1
    mask_arr = None
    if additive_mask is not None:
        mask_arr = _as_array(additive_mask, "additive_mask")  # broadcast by the C++ side
    out_arr = None
    if out is not None:
        if type(out) is not type(scores):
            raise TypeError(f"out: expected a {type(scores).__name__} like scores, got {type(out).__name__}")
        out_arr = _as_array(out, "out", min_ndim=2, output=True)
        if not out_arr.flags.c_contiguous:
            raise ValueError("out: must be C-contiguous")
        if out_arr.shape != arr.shape:
            raise ValueError(f"out: expected shape {tuple(arr.shape)}, got {tuple(out_arr.shape)}")
    result = _C.masked_softmax(
        arr,
        _counts(counts, "counts", batch, nk),
        _positions(q_pos, "q_pos", batch, nq),
        _positions(k_pos, "k_pos", batch, nk),
        mask_arr,
        out_arr,
    )
    if out is not None:
        return out
    return _wrap(result, scores)


# --------------------------------------------------------------------------
# Weight-only quantized linear layers


def _rows(x, name: str):
    """x[..., K] float32 -> ([M, K] array the kernels read, the leading shape)."""
    arr = _as_array(x, name)
    k = arr.shape[-1]
    return arr.reshape(-1, k), arr.shape[:-1]


def _group(group) -> int:
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise TypeError(f"group: expected an int, got {type(group).__name__}")
    return int(group)


def int8_linear(x, q, scale, bias=None):
    """``x @ (q * scale[:, None]).T + bias`` with int8 weights.

    ``x`` float32 ``[..., K]`` (any leading shape; rows may be strided),
    ``q`` int8 ``[N, K]``, ``scale`` float32 ``[N]``, ``bias`` float32 ``[N]``
    or None; returns float32 ``[..., N]`` of the type of ``x``. Each int8
    weight is converted to float in registers and multiplied into a float32
    sum, then scaled: the result is that of the dequantized weights within
    ``(K + 4) * 2**-24 * (sum_k |x_k w_k| + |bias|)`` per element (a worst
    case; typical errors are far smaller). Fast for decoding (few rows of x:
    a pass over the weight bytes); correct, not tuned, for many rows (there,
    ``F.linear(x, int8_dequantize(q, scale))`` is faster).
    """
    try:
        return _C.int8_linear(x, q, scale, bias)
    except (TypeError, ValueError):
        pass
    rows, lead = _rows(x, "x")
    out = _C.int8_linear(rows, q, scale, bias)
    return _wrap(out.reshape(*lead, out.shape[-1]), x)


def int4_linear(x, q, scale, offset, group: int, bias=None):
    """``x @ w.T + bias`` with 4-bit weights in llama.cpp's Q4_1 form:
    ``w[n, k] = q[n, k] * scale[n, k // group] + offset[n, k // group]``.

    ``q`` uint8 ``[N, K / 2]``, two weights a byte (weight k in byte k // 2:
    the low nibble for even k, the high nibble for odd k); ``scale`` and
    ``offset`` float32 ``[N, K / group]``; ``group`` even and dividing K
    (multiples of 32 take the fast path). Each weight is formed as
    ``fma(q, scale, offset)`` (exactly what ``int4_dequantize`` writes) and
    multiplied into a float32 sum; the accuracy contract is int8_linear's.
    """
    try:
        return _C.int4_linear(x, q, scale, offset, group, bias)
    except (TypeError, ValueError):
        pass
    rows, lead = _rows(x, "x")
    out = _C.int4_linear(rows, q, scale, offset, _group(group), bias)
    return _wrap(out.reshape(*lead, out.shape[-1]), x)


def int8_dequantize(q, scale):
    """float32 ``[N, K]`` weights ``q * scale[:, None]`` (each the float32
    rounding of the exact product), of the type of ``q``."""
    return _C.int8_dequantize(q, scale)


def int4_dequantize(q, scale, offset, group: int):
    """float32 ``[N, K]`` weights ``fma(q, scale, offset)`` of int4_linear's
    packed layout (each the float32 rounding of the exact value), of the type
    of ``q``."""
    try:
        return _C.int4_dequantize(q, scale, offset, group)
    except (TypeError, ValueError):
        pass
    return _C.int4_dequantize(q, scale, offset, _group(group))


def _weights64(w, name: str) -> tuple[torch.Tensor, bool]:
    """A 2-d real tensor or array -> (float64 torch copy, was numpy), refusing
    empty and non-finite weights."""
    is_numpy = isinstance(w, np.ndarray)
    if is_numpy:
        if w.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point dtype, got {w.dtype}")
        t = torch.from_numpy(np.asarray(w, dtype=np.float64))
    elif isinstance(w, torch.Tensor):
        if not w.is_cpu:
            raise TypeError(f"{name}: expected a CPU tensor, got a tensor on {w.device}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {w.dtype}")
        t = w.detach().to(torch.float64)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(w).__name__}")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty [N, K] matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: every weight must be finite")
    return t, is_numpy


def _out(t: torch.Tensor, as_numpy: bool):
    t = t.contiguous()
    return t.numpy() if as_numpy else t


def quantize_int8(w):
    """Symmetric per-row int8: ``(q int8 [N, K], scale float32 [N])`` with
    ``scale = max_k |w[n, k]| / 127`` and ``q = round(w / scale)`` (half to
    even) clamped to [-127, 127]; a row of zeros (or one so small that its
    scale would be 0 in float32) gets scale 1 and q = 0.

    Computed in float64 from the float32 (or bf16/fp16/fp64) weights with
    IEEE operations only, so the result is bit-identical on every machine.
    Returns torch tensors for a tensor, numpy arrays for an array.
    """
    t, as_numpy = _weights64(w, "w")
    scale = (t.abs().amax(dim=1) / 127).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(t / scale.to(torch.float64)[:, None]).clamp_(-127, 127).to(torch.int8)
    return _out(q, as_numpy), _out(scale, as_numpy)


def quantize_int4(w, group: int):
    """Group-wise asymmetric 4-bit (llama.cpp's Q4_1 form): for each run of
    ``group`` weights of a row, ``offset = min``, ``scale = (max - min) / 15``,
    ``q = round((w - offset) / scale)`` (half to even) clamped to [0, 15].
    A constant group (or one whose range is too small for a float32 scale)
    gets scale 1 and q = 0, so it comes back as exactly its value.

    Returns ``(q uint8 [N, K / 2] packed as int4_linear reads it,
    scale float32 [N, K / group], offset float32 [N, K / group])``; ``group``
    must be even and divide K. Deterministic as quantize_int8.
    """
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise TypeError(f"group: expected an int, got {type(group).__name__}")
    t, as_numpy = _weights64(w, "w")
    n, k = t.shape
    group = int(group)
    if group < 2 or group % 2 or k % group:
        raise ValueError(f"group: must be even and divide K = {k}, got {group}")
    g = t.reshape(n, k // group, group)
    offset = g.amin(dim=-1).to(torch.float32)
    scale = ((g.amax(dim=-1) - offset.to(torch.float64)) / 15).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - offset.to(torch.float64)[..., None]) / scale.to(torch.float64)[..., None])
    packed = pack_int4(q.clamp_(0, 15).to(torch.uint8).reshape(n, k))
    return _out(packed, as_numpy), _out(scale, as_numpy), _out(offset, as_numpy)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [N, K] (K even) -> [N, K / 2] two a byte, as
    int4_linear reads them (low nibble: the even column)."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % 2 \
            or (codes.numel() and int(codes.max()) > 15):
        raise ValueError(f"codes: expected uint8 [N, even K] in [0, 15], got {codes.dtype} {tuple(codes.shape)}")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def available_isas() -> list[str]:
    """ISAs compiled in and supported by this CPU, worst first ('serial' always)."""
    return list(_C.available_isas())


def active_isa() -> str:
    """The ISA the kernels use now."""
    return _C.active_isa()


def dispatched_isas() -> dict[str, str | None]:
    """Kernel name -> the ISA whose code it ran on its latest call in this
    process, as the C++ dispatch recorded it (None before its first call)."""
    return dict(_C.dispatched_isas())


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Force every kernel onto one ISA inside the block (tests, benchmarks).

    Process-wide, not per thread: do not mix with kernel calls on other threads.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    previous = _C.forced_isa()
    _C.force_isa(name)
    try:
        yield
    finally:
        _C.force_isa(previous)


def cpu_features() -> dict:
    """CPU features as detected at run time."""
    return dict(_C.cpu_features())


def get_num_threads() -> int:
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Threads the kernels use (the caller included)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    _C.set_num_threads(int(n))
