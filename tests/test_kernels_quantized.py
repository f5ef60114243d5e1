"""Weight-only quantized linear layers (issue 22): int8_linear, int4_linear,
their dequantization and the load-time quantizers, on every ISA this machine
runs, against the float64 reference of the dequantized weights
(tests/reference.py).

Tolerance (prism_ext.kernels.int8_linear): |y - y_exact| <= (K + 4) u
(sum_k |x_k w_k| + |bias|) per element, u = 2**-24, a worst-case bound of a
float32 sum of K terms (every ISA adds each output lane's terms in k order),
the int4 weight's own rounding and the final scale and bias; an indexing,
nibble-order or group error is O(sum |x w| / sqrt(K)), orders of magnitude above it.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference

from prism_ext import kernels

U = 2.0**-24


def assert_within_bound(y, x, w64, bias=None, like=None):
    """y (float32, the container type of ``like``) against the float64
    reference of x @ w64.T + bias within (K + 4) u * scale."""
    if like is not None:
        assert type(y) is type(like), f"expected a {type(like).__name__}, got {type(y).__name__}"
    yt = torch.as_tensor(y)
    assert yt.dtype == torch.float32
    xt = torch.as_tensor(x)
    ref, mag = reference.quantized_linear(xt.reshape(-1, xt.shape[-1]), w64, bias)
    ref = ref.reshape(*xt.shape[:-1], w64.shape[0])
    mag = mag.reshape(ref.shape)
    assert tuple(yt.shape) == tuple(ref.shape)
    k = w64.shape[1]
    err = (yt.to(torch.float64) - ref).abs()
    bound = (k + 4) * U * mag
    worst = int(torch.argmax(err - bound)) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"element {worst}: |{yt.flatten()[worst].item()} - {ref.flatten()[worst].item()}| = "
        f"{err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}"
    )


def random_int8(gen, n, k):
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.05 + 1e-3
    return q, scale


def random_int4(gen, n, k, group):
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) * 0.1 + 1e-3
    offset = -torch.rand(n, k // group, generator=gen) * 0.8
    return q, scale, offset


class Case(NamedTuple):
    lead: tuple  # leading shape of x (M = its product)
    n: int
    k: int
    group: int  # int4 only (even, divides k)
    bias: bool
    layout: str  # "contiguous", "strided_rows" (a column slice: no copy), "transposed" (copied)
    kind: str  # "torch" or "numpy"
    seed: int


@st.composite
def cases(draw, int4: bool) -> Case:
    if int4:
        group = draw(st.sampled_from([2, 6, 16, 32, 64, 34]))
        k = group * draw(st.integers(1, 6))
    else:
        group, k = 0, draw(st.one_of(st.integers(1, 70), st.sampled_from([128, 200, 896])))
    return Case(
        lead=draw(st.sampled_from([(), (1,), (3,), (5,), (8,), (17,), (2, 3), (2, 1, 9)])),
        n=draw(st.integers(1, 13)),  # whole row blocks of 4 and their rests
        k=k,
        group=group,
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "strided_rows", "transposed"])),
        kind=draw(st.sampled_from(["torch", "numpy"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_x(c: Case, gen):
    shape = (*c.lead, c.k)
    if c.layout == "strided_rows":
        x = torch.randn(*c.lead, c.k + 5, generator=gen)[..., 2 : 2 + c.k]
    elif c.layout == "transposed" and len(c.lead) >= 1:
        x = torch.randn(*c.lead[:-1], c.k, c.lead[-1], generator=gen).transpose(-1, -2)
    else:
        x = torch.randn(shape, generator=gen)
    assert tuple(x.shape) == shape
    return x


def kind(t, c: Case):
    return t.numpy() if c.kind == "numpy" else t


@settings(max_examples=40)
@given(case=cases(int4=False))
@example(case=Case((1,), 1, 1, 0, False, "contiguous", "torch", 1))  # M = N = K = 1
@example(case=Case((16,), 4, 15, 0, True, "strided_rows", "numpy", 2))  # K < 16: only the tail block
@example(case=Case((5,), 9, 33, 0, True, "transposed", "torch", 3))  # K % 16 = 1
def test_int8_linear_matches_reference(isa, case):
    gen = torch.Generator().manual_seed(case.seed)
    x = make_x(case, gen)
    q, scale = random_int8(gen, case.n, case.k)
    bias = torch.randn(case.n, generator=gen) if case.bias else None
    xk = kind(x, case)
    y = kernels.int8_linear(xk, kind(q, case), kind(scale, case), None if bias is None else kind(bias, case))
    assert_within_bound(y, x, reference.int8_dequantize(q, scale), bias, like=xk)
    assert kernels.dispatched_isas()["int8_linear"] == isa


@settings(max_examples=40)
@given(case=cases(int4=True))
@example(case=Case((1,), 1, 2, 2, False, "contiguous", "torch", 1))  # K = group = 2
@example(case=Case((3,), 5, 64, 64, True, "contiguous", "numpy", 2))  # group = K, aligned path
@example(case=Case((17,), 7, 102, 34, True, "strided_rows", "torch", 3))  # per-lane groups, K % 32 = 6
@example(case=Case((2, 3), 4, 96, 32, False, "transposed", "torch", 4))
def test_int4_linear_matches_reference(isa, case):
    gen = torch.Generator().manual_seed(case.seed)
    x = make_x(case, gen)
    q, scale, offset = random_int4(gen, case.n, case.k, case.group)
    bias = torch.randn(case.n, generator=gen) if case.bias else None
    xk = kind(x, case)
    y = kernels.int4_linear(xk, kind(q, case), kind(scale, case), kind(offset, case), case.group,
                            None if bias is None else kind(bias, case))
    assert_within_bound(y, x, reference.int4_dequantize(q, scale, offset, case.group), bias, like=xk)
    assert kernels.dispatched_isas()["int4_linear"] == isa


@pytest.mark.parametrize("n, k", [(1, 1), (5, 16), (7, 45), (33, 896)])
def test_int8_dequantize_is_exact(isa, n, k):
    """Each weight is the float32 rounding of q * scale (exact in float64)."""
    gen = torch.Generator().manual_seed(n * k)
    q, scale = random_int8(gen, n, k)
    w = kernels.int8_dequantize(q, scale)
    assert w.dtype == torch.float32 and tuple(w.shape) == (n, k)
    assert torch.equal(w, reference.int8_dequantize(q, scale).to(torch.float32))
    assert kernels.dispatched_isas()["int8_dequantize"] == isa


@pytest.mark.parametrize("n, k, group", [(1, 2, 2), (3, 64, 32), (5, 96, 96), (6, 60, 10), (9, 102, 34), (4, 256, 128)])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_int4_dequantize_is_exact(isa, n, k, group, as_numpy):
    """Each weight is the float32 rounding of q * scale + offset (one
    rounding, exact in float64 for these magnitudes)."""
    gen = torch.Generator().manual_seed(n * k + group)
    q, scale, offset = random_int4(gen, n, k, group)
    args = (q.numpy(), scale.numpy(), offset.numpy()) if as_numpy else (q, scale, offset)
    w = kernels.int4_dequantize(*args, np.int64(group) if as_numpy else group)
    assert isinstance(w, np.ndarray if as_numpy else torch.Tensor)
    assert torch.equal(torch.as_tensor(w), reference.int4_dequantize(q, scale, offset, group).to(torch.float32))
    assert kernels.dispatched_isas()["int4_dequantize"] == isa


def test_large_magnitudes_and_zeros(isa):
    gen = torch.Generator().manual_seed(5)
    n, k = 6, 77
    x = torch.randn(3, k, generator=gen) * 1e15
    x[1] = 0.0  # a zero input row gives exact zeros
    q, scale = random_int8(gen, n, k)
    scale *= 1e15
    q[2] = 0  # a zero weight row
    y8 = kernels.int8_linear(x, q, scale)
    assert_within_bound(y8, x, reference.int8_dequantize(q, scale))
    assert bool((y8[1] == 0).all()) and bool((y8[:, 2] == 0).all())
    q4, s4, o4 = random_int4(gen, n, 64, 32)
    x4 = torch.randn(2, 64, generator=gen) * 1e-20
    y4 = kernels.int4_linear(x4, q4, s4 * 1e20, o4 * 1e20, 32)
    assert_within_bound(y4, x4, reference.int4_dequantize(q4, s4 * 1e20, o4 * 1e20, 32))


@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_non_finite_inputs_propagate_as_ieee(isa, kernel):
    """A NaN or inf in x reaches exactly the outputs the float64 reference
    makes non-finite, with the same sign (docs/errors.md); the rest stay within the bound."""
    gen = torch.Generator().manual_seed(11)
    n, k = 9, 70
    x = torch.randn(6, k, generator=gen)
    x[1, 3] = float("nan")
    x[2, 69] = float("inf")  # in the tail block
    x[3, 0], x[3, 40] = float("inf"), float("-inf")
    x[4, 17] = float("-inf")
    if kernel == "int8":
        q, scale = random_int8(gen, n, k)
        q[0, 69] = 0  # inf * 0 = NaN
        w = reference.int8_dequantize(q, scale)
        y = kernels.int8_linear(x, q, scale)
    else:
        q, scale, offset = random_int4(gen, n, k, 14)
        w = reference.int4_dequantize(q, scale, offset, 14)
        y = kernels.int4_linear(x, q, scale, offset, 14)
    ref, _ = reference.quantized_linear(x, w)
    assert torch.equal(y.isnan(), ref.isnan()) and bool(ref.isnan().any())
    assert torch.equal(y.isposinf(), ref.isposinf()) and torch.equal(y.isneginf(), ref.isneginf())
    assert bool(ref.isinf().any())
    finite = [0, 5]
    assert_within_bound(y[finite], x[finite], w)


@pytest.mark.parametrize("m", [0, 1, 8, 40])
def test_linear_equals_f_linear_on_dequantized(isa, m):
    """The large-M route of the models (dequantize, then F.linear) and the
    kernels agree within the stated bound, on the Qwen2.5-0.5B MLP width."""
    gen = torch.Generator().manual_seed(m)
    n, k = 24, 896
    x = torch.randn(m, k, generator=gen)
    q, scale = random_int8(gen, n, k)
    y = kernels.int8_linear(x, q, scale)
    assert tuple(y.shape) == (m, n)
    assert_within_bound(F.linear(x, kernels.int8_dequantize(q, scale)), x, reference.int8_dequantize(q, scale))
    assert_within_bound(y, x, reference.int8_dequantize(q, scale))
    q4, s4, o4 = random_int4(gen, n, k, 32)
    assert_within_bound(kernels.int4_linear(x, q4, s4, o4, 32), x, reference.int4_dequantize(q4, s4, o4, 32))


def test_thread_count_does_not_change_results(isa, restore_threads):
    gen = torch.Generator().manual_seed(9)
    n, k = 1000, 512
    x = torch.randn(7, k, generator=gen)
    q, scale = random_int8(gen, n, k)
    q4, s4, o4 = random_int4(gen, n, k, 64)
    results = []
    for t in (1, 2, 3):
        kernels.set_num_threads(t)
        results.append((kernels.int8_linear(x, q, scale), kernels.int4_linear(x, q4, s4, o4, 64),
                        kernels.int4_dequantize(q4, s4, o4, 64)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_leading_dimensions_and_requires_grad():
    x = torch.randn(2, 3, 40, requires_grad=True)
    q, scale = random_int8(torch.Generator().manual_seed(1), 5, 40)
    y = kernels.int8_linear(x, q, torch.nn.Parameter(scale))
    assert tuple(y.shape) == (2, 3, 5)
    assert_within_bound(y, x.detach(), reference.int8_dequantize(q, scale))


# --------------------------------------------------------------------------
# Quantizers


def golden_weights(n: int, k: int) -> torch.Tensor:
    """Weights made with integer arithmetic and one IEEE division only, so
    they are the same bits on every machine (unlike a seeded randn)."""
    i = torch.arange(n * k, dtype=torch.int64)
    return (((i * 7919) % 2003 - 1001).to(torch.float32) / 37.0).reshape(n, k)


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(torch.as_tensor(a).numpy()).tobytes())
    return h.hexdigest()[:16]


def test_quantize_int8_rule():
    w = torch.tensor([[1.0, -0.5, 0.25, 127.0, -127.0], [0.0] * 5, [2.54, -1.27, 0.0, 0.005, 0.015]])
    q, scale = kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.tolist() == [1.0, 1.0, np.float32(2.54 / 127).item()]
    assert q[0].tolist() == [1, 0, 0, 127, -127]  # -0.5 rounds half to even
    assert q[1].tolist() == [0] * 5  # a zero row: scale 1, q 0
    assert q[2].tolist() == [127, -64, 0, 0, 1]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 300, generator=gen) * torch.rand(40, 1, generator=gen) * 10
    q, scale = kernels.quantize_int8(w)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (reference.int8_dequantize(q, scale) - w.double()).abs()
    assert bool((err <= scale.double()[:, None] * (0.5 + 1e-6)).all())


def test_quantize_int4_rule():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(12, 192, generator=gen)
    w[3, 64:96] = 0.7  # a constant group
    w[5] = -2.5  # a constant row
    q, scale, offset = kernels.quantize_int4(w, 32)
    assert q.dtype == torch.uint8 and tuple(q.shape) == (12, 96)
    assert tuple(scale.shape) == tuple(offset.shape) == (12, 6)
    g = w.reshape(12, 6, 32)
    assert torch.equal(offset, g.amin(-1))
    back = kernels.int4_dequantize(q, scale, offset, 32)
    err = (back.double() - w.double()).abs().reshape(12, 6, 32)
    assert bool((err <= scale.double()[..., None] * (0.5 + 1e-5)).all())
    assert torch.equal(back[3, 64:96], w[3, 64:96]) and torch.equal(back[5], w[5])  # constant groups: exact
    # each group's minimum comes back exactly (q = 0), its maximum as q = 15
    mins = g.argmin(-1)
    assert torch.equal(back.reshape(12, 6, 32).gather(-1, mins[..., None]), g.gather(-1, mins[..., None]))


def test_quantize_int4_packing_order():
    """Weight k lies in byte k // 2: the low nibble for even k, the high one for odd k."""
    w = torch.tensor([[0.0, 15.0, 1.0, 2.0]])  # group 4: offset 0, scale 1
    q, scale, offset = kernels.quantize_int4(w, 4)
    assert scale.tolist() == [[1.0]] and offset.tolist() == [[0.0]]
    assert q.tolist() == [[0xF0, 0x21]]


def test_quantizers_are_deterministic_bit_for_bit():
    """Golden digests of a fixed input: the same bits here and on aarch64 (scripts/arm-test.sh runs this file)."""
    w = golden_weights(24, 96)
    assert digest(*kernels.quantize_int8(w)) == GOLDEN_INT8
    assert digest(*kernels.quantize_int4(w, 32)) == GOLDEN_INT4
    q, s = kernels.quantize_int8(w.numpy())
    assert isinstance(q, np.ndarray) and digest(q, s) == GOLDEN_INT8
    # bf16 weights go through float64 exactly
    assert digest(*kernels.quantize_int8(w.to(torch.bfloat16))) == digest(*kernels.quantize_int8(w.to(torch.bfloat16).float()))


GOLDEN_INT8 = "2e974bb0ba62cd47"
GOLDEN_INT4 = "aba897618d0361a0"


# --------------------------------------------------------------------------
# Bad input: one clear error naming the argument

_G = torch.Generator().manual_seed(0)
_Q8, _S8 = random_int8(_G, 4, 64)
_Q4, _S4, _O4 = random_int4(_G, 4, 64, 32)
_X = torch.zeros(2, 64)


def _i8(**over):
    args = dict(x=_X, q=_Q8, scale=_S8)
    args.update(over)
    return lambda: kernels.int8_linear(**args)


def _i4(**over):
    args = dict(x=_X, q=_Q4, scale=_S4, offset=_O4, group=32)
    args.update(over)
    return lambda: kernels.int4_linear(**args)


BAD = {
    "i8-x-float64": (_i8(x=_X.double()), TypeError, "x"),
    "i8-x-list": (_i8(x=[[0.0] * 64]), TypeError, "x"),
    "i8-x-scalar": (_i8(x=torch.tensor(1.0)), ValueError, "x"),
    "i8-x-K": (_i8(x=torch.zeros(2, 63)), ValueError, "q"),
    "i8-x-meta": (_i8(x=torch.zeros(2, 64, device="meta")), TypeError, "x"),
    "i8-q-uint8": (_i8(q=_Q4.repeat(1, 2)), TypeError, "q"),
    "i8-q-int32": (_i8(q=_Q8.to(torch.int32)), TypeError, "q"),
    "i8-q-rank": (_i8(q=_Q8[0]), ValueError, "q"),
    "i8-q-no-rows": (_i8(q=_Q8[:0]), ValueError, "q"),
    "i8-q-not-contiguous": (_i8(q=torch.zeros(64, 4, dtype=torch.int8).T), ValueError, "q"),
    "i8-scale-shape": (_i8(scale=_S8[:3]), ValueError, "scale"),
    "i8-scale-float64": (_i8(scale=_S8.double()), TypeError, "scale"),
    "i8-scale-strided": (_i8(scale=torch.zeros(8)[::2]), ValueError, "scale"),
    "i8-bias-shape": (_i8(bias=torch.zeros(5)), ValueError, "bias"),
    "i8-bias-int": (_i8(bias=torch.zeros(4, dtype=torch.int64)), TypeError, "bias"),
    "i4-group-odd": (_i4(group=3), ValueError, "group"),
    "i4-group-not-dividing": (_i4(group=24), ValueError, "group"),
    "i4-group-zero": (_i4(group=0), ValueError, "group"),
    "i4-group-float": (_i4(group=32.0), TypeError, "group"),
    "i4-group-bool": (_i4(group=True), TypeError, "group"),
    "i4-x-odd-K": (_i4(x=torch.zeros(2, 63)), ValueError, "group"),
    "i4-q-int8": (_i4(q=_Q4.to(torch.int8)), TypeError, "q"),
    "i4-q-bool": (_i4(q=_Q4.bool()), TypeError, "q"),
    "i4-q-width": (_i4(q=torch.zeros(4, 64, dtype=torch.uint8)), ValueError, "q"),
    "i4-scale-groups": (_i4(scale=torch.zeros(4, 1)), ValueError, "scale"),
    "i4-offset-shape": (_i4(offset=torch.zeros(4, 3)), ValueError, "offset"),
    "i4-offset-none": (_i4(offset=None), TypeError, "offset"),
    "i4-offset-meta": (_i4(offset=torch.zeros(4, 2, device="meta")), TypeError, "offset"),
    "deq8-q-rank": (lambda: kernels.int8_dequantize(_Q8[0], _S8), ValueError, "q"),
    "deq8-scale": (lambda: kernels.int8_dequantize(_Q8, _S8[:2]), ValueError, "scale"),
    "deq4-group": (lambda: kernels.int4_dequantize(_Q4, _S4, _O4, 5), ValueError, "group"),
    "deq4-offset": (lambda: kernels.int4_dequantize(_Q4, _S4, _O4[:, :1], 32), ValueError, "offset"),
    "quant8-w-int": (lambda: kernels.quantize_int8(torch.zeros(2, 3, dtype=torch.int32)), TypeError, "w"),
    "quant8-w-rank": (lambda: kernels.quantize_int8(torch.zeros(3)), ValueError, "w"),
    "quant8-w-empty": (lambda: kernels.quantize_int8(torch.zeros(0, 3)), ValueError, "w"),
    "quant8-w-nan": (lambda: kernels.quantize_int8(torch.tensor([[1.0, float("nan")]])), ValueError, "w"),
    "quant8-w-list": (lambda: kernels.quantize_int8([[1.0]]), TypeError, "w"),
    "quant4-group": (lambda: kernels.quantize_int4(torch.zeros(2, 6), 4), ValueError, "group"),
    "quant4-group-odd": (lambda: kernels.quantize_int4(torch.zeros(2, 6), 3), ValueError, "group"),
    "quant4-group-str": (lambda: kernels.quantize_int4(torch.zeros(2, 6), "2"), TypeError, "group"),
    "quant4-w-inf": (lambda: kernels.quantize_int4(torch.tensor([[1.0, float("inf")]]), 2), ValueError, "w"),
}


@pytest.mark.parametrize("call, error, name", BAD.values(), ids=BAD.keys())
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(f"{name}:"), f"message does not start with {name!r}: {info.value}"
