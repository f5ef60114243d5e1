"""Weights stored in fewer bits: ``weight_dtype`` fp32 (as loaded), bf16,
int8 (per output row: one float32 scale) or int4 (llama.cpp's Q4_1 form: a
float32 scale and offset per :data:`INT4_GROUP` weights of a row).

PRISM splits positions, not weights: every device holds the whole model, so
the bytes of the weights decide whether a model fits a board at all. The
quantized weights are the [out, in] matrices of every block (Q/K/V, the
output projection, the MLP) and the token embedding / LM head; norms,
biases, position tables and the small heads stay float32.

A :class:`Quantized` weight stands where the float32 matrix stood: the
model code calls :func:`linear` and :func:`embedding`, which take either.
For a few input rows (decoding) the weight-only kernels of
:mod:`prism_ext.kernels` read the stored bits directly, with float32
activations (the memory-bound case, where fewer bytes is faster): the
result equals the float32 model with the dequantized weights, to float32
rounding. For more rows (a prefill: compute-bound) the weight is
dequantized once per call and torch's GEMM runs: in bf16 (activations
rounded to bf16, float32 accumulation) where the CPU multiplies bf16 in
hardware (:func:`native_bf16`), since a float32 GEMM plus the dequantizing
cannot be faster than the float32 model's own GEMM; in float32 elsewhere.
bf16 weights always run torch's bf16 matmul."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels

__all__ = ["WEIGHT_DTYPES", "INT4_GROUP", "Quantized", "quantize", "gptq_int4", "InputRecorder", "linear", "embedding",
           "nbytes", "stored_bytes", "check_weight_dtype"]

WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # weights per (scale, offset) pair: llama.cpp's Q4_1 block, 6 bits a weight in all
KERNEL_ROWS = 16  # up to this many input rows the weight-only kernels; beyond, dequantize + torch's GEMM


def check_weight_dtype(weight_dtype) -> str:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: expected one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    return weight_dtype


class Quantized:
    """An [out, in] weight in fewer bits. ``stored`` holds its tensors by
    name (what is hashed, saved and counted)."""

    dtype: str

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def stored(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix these bits stand for."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, start: int, stop: int | None = None) -> "Quantized":
        """Output rows ``[start, stop)`` (a block's K/V part of its stacked Q/K/V)."""
        raise NotImplementedError

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows ``ids`` (an embedding lookup): [*ids.shape, in]."""
        flat = ids.reshape(-1).long()
        return self.rows_at(flat).dequantize().reshape(*ids.shape, self.shape[1])

    def rows_at(self, index: torch.Tensor) -> "Quantized":
        raise NotImplementedError

    @property
    def requires_grad(self) -> bool:  # the twin trains float32 tensors only
        return False

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            return self.rows(*key.indices(self.shape[0])[:2])
        raise TypeError(f"a {self.dtype} weight can only be sliced by output rows (start:stop), got {key!r}")


def _kernel_rows(x: torch.Tensor) -> bool:
    return x.numel() // max(x.shape[-1], 1) <= KERNEL_ROWS


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AMX-BF16 or
    AVX512-BF16, Arm's BF16 extension; Linux's /proc/cpuinfo says). There,
    torch's bf16 GEMM runs several times float32's (4.6x at 512 rows on an
    AMX Xeon, bench/RESULTS.md); elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"amx_bf16", "avx512_bf16", "bf16"})


def _many_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The compute-bound case (a prefill) for a dequantized weight: torch's
    GEMM, in bf16 where the CPU multiplies bf16 natively (float32
    accumulation; faster than the float32 model itself), else float32."""
    return _bf16_linear(x, weight, bias) if native_bf16() else F.linear(x, weight, bias)


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's bf16 GEMM (inputs rounded to bf16, float32 accumulation), float32 out."""
    b = None if bias is None else bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16), b).float()


@dataclass(frozen=True, eq=False)
class Bf16(Quantized):
    w: torch.Tensor  # bfloat16 [out, in]
    dtype = "bf16"

    @property
    def shape(self):
        return self.w.shape

    @property
    def stored(self):
        return {"w": self.w}

    def dequantize(self):
        return self.w.float()

    def linear(self, x, bias=None):
        return _bf16_linear(x, self.w, bias)

    def rows(self, start, stop=None):
        return Bf16(self.w[start:stop])

    def rows_at(self, index):
        return Bf16(self.w[index])


@dataclass(frozen=True, eq=False)
class Int8(Quantized):
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]
    dtype = "int8"

    @property
    def shape(self):
        return self.q.shape

    @property
    def stored(self):
        return {"q": self.q, "scale": self.scale}

    def dequantize(self):
        return kernels.int8_dequantize(self.q, self.scale)

    def linear(self, x, bias=None):
        if _kernel_rows(x):
            return kernels.int8_linear(x.contiguous(), self.q, self.scale, bias)
        return _many_rows(x, self.dequantize(), bias)

    def rows(self, start, stop=None):
        return Int8(self.q[start:stop], self.scale[start:stop])

    def rows_at(self, index):
        return Int8(self.q[index].contiguous(), self.scale[index].contiguous())


@dataclass(frozen=True, eq=False)
class Int4(Quantized):
    q: torch.Tensor  # uint8 [out, in / 2], two weights a byte (low nibble: even column)
    scale: torch.Tensor  # float32 [out, in / group]
    offset: torch.Tensor  # float32 [out, in / group]
    group: int
    dtype = "int4"

    @property
    def shape(self):
        return torch.Size((self.q.shape[0], self.q.shape[1] * 2))

    @property
    def stored(self):
        return {"q": self.q, "scale": self.scale, "offset": self.offset}

    def dequantize(self):
        return kernels.int4_dequantize(self.q, self.scale, self.offset, self.group)

    def linear(self, x, bias=None):
        if _kernel_rows(x):
            return kernels.int4_linear(x.contiguous(), self.q, self.scale, self.offset, self.group, bias)
        return _many_rows(x, self.dequantize(), bias)

    def rows(self, start, stop=None):
        return Int4(self.q[start:stop], self.scale[start:stop], self.offset[start:stop], self.group)

    def rows_at(self, index):
        return Int4(self.q[index].contiguous(), self.scale[index].contiguous(), self.offset[index].contiguous(),
                    self.group)


def quantize(w: torch.Tensor, weight_dtype: str, group: int = INT4_GROUP) -> torch.Tensor | Quantized:
    """``w`` (float32 [out, in]) stored as ``weight_dtype`` (fp32: ``w``
    itself). int4 needs ``in`` to be a multiple of ``group``; a matrix whose
    width is not keeps int8 (said by :func:`prism_ext.models.Network.quantize`'s report)."""
    check_weight_dtype(weight_dtype)
    if weight_dtype == "fp32":
        return w
    if weight_dtype == "bf16":
        return Bf16(w.to(torch.bfloat16).contiguous())
    if weight_dtype == "int4" and w.shape[1] % group == 0:
        return Int4(*kernels.quantize_int4(w, group), group)
    return Int8(*kernels.quantize_int8(w))


GPTQ_DAMP = 0.01  # added to the Hessian's diagonal, as a share of its mean: GPTQ's own default
GPTQ_BLOCK = 128  # columns updated together (a multiple of INT4_GROUP; the result does not depend on it)


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group: int = INT4_GROUP, damp: float = GPTQ_DAMP) -> Int4:
    """``w`` (float32 [out, in]) as int4, its codes chosen by GPTQ (Frantar
    et al., 2023) for the inputs whose ``X^T X`` is ``hessian`` ([in, in]):
    the columns are rounded one at a time, in decreasing order of input
    energy (the Hessian's diagonal, "act order"), and each column's rounding
    error is spread over the columns not yet rounded through the Cholesky
    factor of the inverse Hessian, so that the layer's output on inputs like
    those changes least. Scales and offsets are :func:`quantize`'s (taken
    from the original weights, groups of ``group`` columns in place), so the
    result is the same Q4_1 form that the kernels read; only the codes
    differ from rounding to nearest."""
    out, width = w.shape
    if hessian.shape != (width, width):
        raise ValueError(f"hessian: expected [{width}, {width}] for a weight of {width} inputs, got "
                         f"{tuple(hessian.shape)}")
    if width % group:
        raise ValueError(f"group: must divide the weight's {width} inputs, got {group}")
    _, scale, offset = kernels.quantize_int4(w, group)
    h = hessian.to(torch.float64).clone()
    weights = w.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0  # an input that never varied: its weights cannot matter, keep them as rounded
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(width, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    weights, h = weights[:, order], h[order][:, order]
    col_scale = scale.to(torch.float64).repeat_interleave(group, dim=1)[:, order]
    col_offset = offset.to(torch.float64).repeat_interleave(group, dim=1)[:, order]
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # not positive definite even damped: calibration inputs degenerate
        raise ValueError(f"hessian: not positive definite after damping {damp} ({exc})") from None
    codes = torch.empty(out, width, dtype=torch.float64)
    for a in range(0, width, GPTQ_BLOCK):
        b = min(a + GPTQ_BLOCK, width)
        part, errors = weights[:, a:b].clone(), torch.empty(out, b - a, dtype=torch.float64)
        for i in range(b - a):
            j = a + i
            q = torch.round((part[:, i] - col_offset[:, j]) / col_scale[:, j]).clamp_(0, 15)
            codes[:, j] = q
            err = (part[:, i] - (q * col_scale[:, j] + col_offset[:, j])) / u[j, j]
            part[:, i:] -= err[:, None] * u[j, j:b][None, :]
            errors[:, i] = err
        weights[:, b:] -= errors @ u[a:b, b:]
    codes = codes[:, torch.argsort(order)].to(torch.uint8)
    return Int4(kernels.pack_int4(codes), scale, offset, group)


class InputRecorder(Quantized):
    """A float32 weight that adds ``X^T X`` of every input it multiplies
    into ``hessian`` (float32, [in, in]): stands in a block while a
    calibration set runs, for :func:`gptq_int4`."""

    dtype = "fp32"

    def __init__(self, w: torch.Tensor, hessian: torch.Tensor, counted: list):
        self.w, self.hessian, self.counted = w, hessian, counted

    @property
    def shape(self):
        return self.w.shape

    @property
    def stored(self):
        return {"w": self.w}

    def dequantize(self):
        return self.w

    def linear(self, x, bias=None):
        rows = x.reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(rows.T, rows)
        self.counted[0] += rows.shape[0]
        return F.linear(x, self.w, bias)

    def rows(self, start, stop=None):
        return InputRecorder(self.w[start:stop], self.hessian, self.counted)

    def rows_at(self, index):
        return InputRecorder(self.w[index], self.hessian, self.counted)


def from_stored(dtype: str, stored: dict[str, torch.Tensor], group: int = INT4_GROUP) -> Quantized:
    """A weight back from its :attr:`Quantized.stored` tensors (a saved checkpoint)."""
    kinds = {"bf16": (Bf16, ("w",)), "int8": (Int8, ("q", "scale")), "int4": (Int4, ("q", "scale", "offset"))}
    if dtype not in kinds:
        raise ValueError(f"weight_dtype: a stored weight of unknown type {dtype!r}")
    cls, names = kinds[dtype]
    missing = [n for n in names if n not in stored]
    if missing:
        raise ValueError(f"weights: a stored {dtype} weight lacks {', '.join(missing)}")
    args = [stored[n] for n in names] + ([group] if dtype == "int4" else [])
    return cls(*args)


def stored_bytes(shape, weight_dtype: str, group: int = INT4_GROUP) -> int:
    """Bytes an [out, in] matrix takes as ``weight_dtype`` (what :func:`quantize` gives)."""
    out, width = shape
    if weight_dtype == "fp32":
        return 4 * out * width
    if weight_dtype == "bf16":
        return 2 * out * width
    if weight_dtype == "int4" and width % group == 0:
        return out * width // 2 + 8 * out * (width // group)
    return out * width + 4 * out


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a float32 or a :class:`Quantized` weight."""
    return w.linear(x, bias) if isinstance(w, Quantized) else F.linear(x, w, bias)


def embedding(ids: torch.Tensor, w) -> torch.Tensor:
    """``F.embedding`` for a float32 or a :class:`Quantized` table."""
    return w.take(ids) if isinstance(w, Quantized) else F.embedding(ids, w)


def nbytes(w) -> int:
    """Resident bytes of a weight, float32 or quantized."""
    return w.nbytes if isinstance(w, Quantized) else w.numel() * w.element_size()
