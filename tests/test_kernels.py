"""The Python face of the kernels (prism_ext.kernels) against the pure-torch
reference (tests/reference.py), on every ISA this machine runs.

Tolerances: the kernels compute in float32; the reference runs in float64 on
the same float32 inputs, so the differences are the kernels' own rounding:
float32 dot products over dh <= 128 terms for the logits, a vector exp within
~2 ulp, float32 sums over up to ~1000 keys (attention) or seg rows (segment
means), and logits up to |z| ~ 100 after adding log(counts) and masks, whose
rounding (ulp(100) ~ 8e-6) exp turns into that relative error of a
probability. Measured on serial and AVX2 over ~150 random cases of each
kernel, the worst absolute errors were 9e-7 (attention, outputs ~1) and 2e-6
(softmax): the tolerances below leave 5-10x headroom for other ISAs' exp and
reduction orders, and are still far below any indexing or masking error.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference

import prism_ext
from prism_ext import kernels

ATTENTION_TOL = dict(atol=5e-6, rtol=5e-5)
SEGMENT_TOL = dict(atol=1e-5, rtol=1e-5)
SOFTMAX_TOL = dict(atol=1e-6, rtol=5e-5)
ALL_KERNELS = ("segment_means", "compressed_attention", "masked_softmax", "int8_linear", "int4_linear",
               "int8_dequantize", "int4_dequantize")


def as_torch(x) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def to_kind(x: torch.Tensor, kind: str):
    """``x`` as the caller passes it: a torch tensor or a numpy view of it."""
    return x.numpy() if kind == "numpy" else x


def assert_result(actual, expected: torch.Tensor, like, tol: dict) -> None:
    """``actual`` has the container type of ``like``, dtype float32, the shape
    of ``expected``, only finite values, and matches it within ``tol``."""
    assert type(actual) is type(like), f"expected a {type(like).__name__}, got {type(actual).__name__}"
    t = as_torch(actual)
    assert t.dtype == torch.float32
    assert tuple(t.shape) == tuple(expected.shape)
    assert torch.isfinite(t).all(), "non-finite values in the result"
    torch.testing.assert_close(t.to(torch.float64), expected.to(torch.float64), **tol)


def side(gen: torch.Generator, mode: str | None, batch: int, n: int, make):
    """A per-key or per-query side input: None, shared ``(n,)`` or ``(batch, n)``."""
    if mode is None:
        return None
    return make((n,) if mode == "shared" else (batch, n), gen)


def random_counts(shape, gen):
    """Whole-number counts 0..4 (about one in five is 0: a masked key)."""
    return torch.randint(0, 5, shape, generator=gen).to(torch.float32)


def random_positions(limit: int):
    def make(shape, gen):
        return torch.randint(0, limit, shape, generator=gen, dtype=torch.int32)

    return make


# --------------------------------------------------------------------------
# compressed_attention


class AttentionCase(NamedTuple):
    ndim: int  # 2: [nq, dh], 3: [B, nq, dh], 4: [B, H, nq, dh]
    B: int
    H: int
    nq: int
    nk: int
    dh: int
    counts: str | None  # None, "shared" (nk,), "batched" (B, nk)
    positions: str | None
    layout: str  # "contiguous" or "transposed": q/k/v views of [B, n, H, dh]
    kind: str  # "torch" or "numpy"
    seed: int


@st.composite
def attention_cases(draw) -> AttentionCase:
    ndim = draw(st.sampled_from([2, 3, 4]))
    return AttentionCase(
        ndim=ndim,
        B=1 if ndim == 2 else draw(st.integers(1, 3)),
        H=draw(st.integers(1, 3)) if ndim == 4 else 1,
        nq=draw(st.integers(1, 70)),
        nk=draw(st.integers(1, 200)),  # the kernels step over keys in blocks of 64
        dh=draw(st.sampled_from([32, 64, 80, 128, 1, 7, 33])),
        counts=draw(st.sampled_from([None, "shared", "batched"])),
        positions=draw(st.sampled_from([None, "shared", "batched"])),
        layout=draw(st.sampled_from(["contiguous", "transposed"])) if ndim == 4 else "contiguous",
        kind=draw(st.sampled_from(["torch", "numpy"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def attention_inputs(c: AttentionCase):
    gen = torch.Generator().manual_seed(c.seed)

    def rows(n):
        if c.layout == "transposed":  # [B, n, H, dh] -> [B, H, n, dh]: strided, last dim contiguous
            return torch.randn(c.B, n, c.H, c.dh, generator=gen).transpose(1, 2)
        return torch.randn(c.B, c.H, n, c.dh, generator=gen)

    q, k, v = rows(c.nq), rows(c.nk), rows(c.nk)
    counts = side(gen, c.counts, c.B, c.nk, random_counts)
    limit = max(c.nq, c.nk)
    q_pos = side(gen, c.positions, c.B, c.nq, random_positions(limit))
    k_pos = side(gen, c.positions, c.B, c.nk, random_positions(limit))
    return q, k, v, counts, q_pos, k_pos


def squeeze_to(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B, H, n, dh] with B = 1 and/or H = 1 -> the rank a case passes in."""
    return t.reshape(t.shape[-(ndim):]) if ndim == 2 else (t[:, 0] if ndim == 3 else t)


@settings(max_examples=30)
@given(case=attention_cases())
@example(case=AttentionCase(4, 2, 3, 5, 1, 64, "batched", "batched", "transposed", "torch", 1))  # nk = 1
@example(case=AttentionCase(4, 1, 1, 33, 129, 80, "shared", None, "contiguous", "numpy", 2))  # 3 key blocks
@example(case=AttentionCase(3, 3, 1, 1, 65, 128, None, "batched", "contiguous", "torch", 3))
def test_compressed_attention_matches_reference_and_repetition(isa, case):
    q, k, v, counts, q_pos, k_pos = attention_inputs(case)
    args = [to_kind(squeeze_to(t, case.ndim), case.kind) for t in (q, k, v)]
    side_args = [to_kind(t, case.kind) if t is not None else None for t in (counts, q_pos, k_pos)]
    out = kernels.compressed_attention(*args, *side_args)

    expected = reference.compressed_attention(q, k, v, counts, q_pos, k_pos)
    assert_result(out, squeeze_to(expected, case.ndim), args[0], ATTENTION_TOL)
    # The naive form: every key/value row repeated counts[j] times.
    ones = torch.ones(case.nk)
    repeated = reference.repeated_attention(q, k, v, ones if counts is None else counts, q_pos, k_pos)
    assert_result(out, squeeze_to(repeated, case.ndim), args[0], ATTENTION_TOL)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_compressed_attention_many_keys(isa, causal):
    """~1000 keys (16 key blocks), counts up to 16, dh = 64: the tolerance
    above holds for the longest sums the tests make."""
    gen = torch.Generator().manual_seed(7)
    B, H, nq, nk, dh = 2, 2, 40, 1000, 64
    q, k, v = (torch.randn(B, H, n, dh, generator=gen) for n in (nq, nk, nk))
    counts = torch.randint(0, 17, (B, nk), generator=gen).to(torch.float32)
    q_pos = k_pos = None
    if causal:
        q_pos = torch.randint(0, 4 * nk, (B, nq), generator=gen, dtype=torch.int32)
        k_pos = torch.randint(0, 4 * nk, (B, nk), generator=gen, dtype=torch.int32)
    out = kernels.compressed_attention(q, k, v, counts, q_pos, k_pos)
    assert_result(out, reference.compressed_attention(q, k, v, counts, q_pos, k_pos), q, ATTENTION_TOL)


def exact_logit_inputs(logits: torch.Tensor, dh: int, gen: torch.Generator):
    """q, k with q_i . k_j == logits[i, j] exactly in float32 (k_j = e_j), so
    any difference from the reference comes from the kernel's softmax."""
    nq, nk = logits.shape
    assert dh >= nk
    q = torch.zeros(1, 1, nq, dh)
    q[0, 0, :, :nk] = logits
    k = torch.eye(nk, dh).reshape(1, 1, nk, dh)
    v = torch.randn(1, 1, nk, dh, generator=gen)
    return q, k, v


@pytest.mark.parametrize(
    "pattern",
    ["spread_80", "all_equal_80", "all_equal_minus_80", "one_hot_80", "spread_1000"],
)
def test_compressed_attention_extreme_logits(isa, pattern):
    gen = torch.Generator().manual_seed(11)
    nq, nk, dh = 9, 100, 128  # nk crosses a key block boundary
    if pattern == "spread_80":
        logits = torch.empty(nq, nk).uniform_(-80, 80, generator=gen)
    elif pattern == "all_equal_80":
        logits = torch.full((nq, nk), 80.0)
    elif pattern == "all_equal_minus_80":
        logits = torch.full((nq, nk), -80.0)
    elif pattern == "one_hot_80":
        logits = torch.full((nq, nk), -80.0)
        logits[torch.arange(nq), torch.arange(nq) * 7] = 80.0
    else:  # differences so large that exp underflows to 0 for all but the max
        logits = torch.empty(nq, nk).uniform_(-1000, 1000, generator=gen)
    q, k, v = exact_logit_inputs(logits, dh, gen)
    counts = random_counts((nk,), gen).clamp(min=1)
    out = kernels.compressed_attention(q, k, v, counts, scale=1.0)
    expected = reference.compressed_attention(q, k, v, counts, scale=1.0)
    assert_result(out, expected, q, ATTENTION_TOL)


def test_compressed_attention_masked_rows_are_zero(isa):
    """Queries that see no key (every count 0 in batch 0; positions before
    every key for some queries of batch 1) give zero rows, never NaN."""
    gen = torch.Generator().manual_seed(5)
    B, H, nq, nk, dh = 2, 2, 6, 70, 32
    q, k, v = (torch.randn(B, H, n, dh, generator=gen) for n in (nq, nk, nk))
    counts = torch.ones(B, nk)
    counts[0] = 0
    k_pos = torch.arange(10, 10 + nk, dtype=torch.int32).expand(B, nk).contiguous()
    q_pos = torch.tensor([[100, 100, 100, 100, 100, 100], [0, 9, 10, 11, 40, 200]], dtype=torch.int32)
    out = kernels.compressed_attention(q, k, v, counts, q_pos, k_pos)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))  # q_pos 0, 9 < every k_pos
    assert out[1, :, 2:].abs().sum() > 0
    assert_result(out, reference.compressed_attention(q, k, v, counts, q_pos, k_pos), q, ATTENTION_TOL)


def test_compressed_attention_fractional_counts(isa):
    """Counts need not be whole numbers (weights such as valid fractions)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (8, 50, 50))
    counts = torch.rand(50, generator=gen) * 3
    counts[::7] = 0
    out = kernels.compressed_attention(q, k, v, counts)
    assert_result(out, reference.compressed_attention(q, k, v, counts), q, ATTENTION_TOL)


def test_compressed_attention_scale(isa):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 1, n, 80, generator=gen) for n in (10, 30, 30))
    for scale in (0.0, 0.3, -1.5, np.float32(0.25)):
        out = kernels.compressed_attention(q, k, v, scale=scale)
        assert_result(out, reference.compressed_attention(q, k, v, scale=scale), q, ATTENTION_TOL)


# --------------------------------------------------------------------------
# segment_means


class SegmentCase(NamedTuple):
    lead: tuple
    n: int
    d: int
    seg: int
    valid: str | None  # None, "random" or "sparse" (segments with no valid row)
    layout: str  # "contiguous", "row_slice" (row stride > d) or "every_other_row"
    kind: str
    seed: int


@st.composite
def segment_cases(draw) -> SegmentCase:
    n = draw(st.integers(1, 100))
    return SegmentCase(
        lead=tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
        n=n,
        d=draw(st.sampled_from([1, 3, 17, 32, 64, 80, 128])),
        seg=draw(st.one_of(st.integers(1, 40), st.integers(n, n + 10))),  # the second: n <= seg
        valid=draw(st.sampled_from([None, "random", "sparse"])),
        layout=draw(st.sampled_from(["contiguous", "row_slice", "every_other_row"])),
        kind=draw(st.sampled_from(["torch", "numpy"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=40)
@given(case=segment_cases())
@example(case=SegmentCase((2,), 10, 64, 4, "sparse", "row_slice", "torch", 1))  # n % seg != 0
@example(case=SegmentCase((), 3, 32, 8, None, "contiguous", "numpy", 2))  # n < seg
@example(case=SegmentCase((2, 3), 12, 17, 1, "random", "every_other_row", "torch", 3))  # seg = 1
def test_segment_means_matches_reference(isa, case):
    gen = torch.Generator().manual_seed(case.seed)
    shape = (*case.lead, case.n, case.d)
    if case.layout == "row_slice":
        x = torch.randn(*case.lead, case.n, case.d + 5, generator=gen)[..., : case.d]
    elif case.layout == "every_other_row":
        x = torch.randn(*case.lead, 2 * case.n, case.d, generator=gen)[..., ::2, :]
    else:
        x = torch.randn(shape, generator=gen)
    valid = None
    if case.valid is not None:
        keep = 0.5 if case.valid == "random" else 0.1
        valid = torch.rand(shape[:-1], generator=gen) < keep
    xin = to_kind(x, case.kind)
    means, counts = kernels.segment_means(xin, case.seg, None if valid is None else to_kind(valid, case.kind))

    ref_means, ref_counts = reference.segment_means(x.to(torch.float64), case.seg, valid)
    assert_result(means, ref_means, xin, SEGMENT_TOL)
    assert_result(counts, ref_counts, xin, dict(atol=0, rtol=0))
    m = math.ceil(case.n / case.seg)
    assert tuple(as_torch(means).shape) == (*case.lead, m, case.d)


def test_segment_means_empty_segment_is_zero(isa):
    x = torch.randn(2, 9, 33)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 3:6] = False  # segment 1 of batch 0 has no valid row
    means, counts = kernels.segment_means(x, 3, valid)
    assert counts[0].tolist() == [3.0, 0.0, 3.0]
    assert torch.equal(means[0, 1], torch.zeros(33))
    assert_result(means, reference.segment_means(x.double(), 3, valid)[0], x, SEGMENT_TOL)


def test_segment_means_valid_as_integers(isa):
    """``valid`` may be 0/1 integers (numpy or torch) as well as bool."""
    x = np.random.default_rng(0).standard_normal((4, 10, 16)).astype(np.float32)
    valid = (np.arange(40).reshape(4, 10) % 3 != 0).astype(np.int64)
    means, counts = kernels.segment_means(x, 4, valid)
    ref_means, ref_counts = reference.segment_means(torch.from_numpy(x).double(), 4, torch.from_numpy(valid != 0))
    assert_result(means, ref_means, x, SEGMENT_TOL)
    assert_result(counts, ref_counts, x, dict(atol=0, rtol=0))


# --------------------------------------------------------------------------
# masked_softmax


class SoftmaxCase(NamedTuple):
    lead: tuple
    nq: int
    nk: int
    magnitude: float  # scores are randn * magnitude
    counts: str | None
    positions: str | None
    mask: str | None  # None, "full", "keys" (nk,), "queries" (nq, 1): stride 0 last
    out: str | None  # None, "new" or "inplace"
    kind: str
    seed: int


@st.composite
def softmax_cases(draw) -> SoftmaxCase:
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    batched = ["batched"] if lead else []  # (B, n) side inputs need a batch dim
    return SoftmaxCase(
        lead=lead,
        nq=draw(st.integers(1, 40)),
        nk=draw(st.integers(1, 300)),
        magnitude=draw(st.sampled_from([1.0, 10.0, 30.0])),
        counts=draw(st.sampled_from([None, "shared", *batched])),
        positions=draw(st.sampled_from([None, "shared", *batched])),
        mask=draw(st.sampled_from([None, "full", "keys", "queries"])),
        out=draw(st.sampled_from([None, "new", "inplace"])),
        kind=draw(st.sampled_from(["torch", "numpy"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def softmax_mask(gen, mode, shape):
    """An additive mask: randn with about one entry in six -inf."""
    if mode is None:
        return None
    mshape = {"full": shape, "keys": shape[-1:], "queries": (shape[-2], 1)}[mode]
    m = torch.randn(mshape, generator=gen)
    return m.masked_fill(torch.rand(mshape, generator=gen) < 1 / 6, -math.inf)


@settings(max_examples=40)
@given(case=softmax_cases())
@example(case=SoftmaxCase((2,), 3, 1, 1.0, "batched", "batched", None, "inplace", "torch", 1))  # nk = 1
@example(case=SoftmaxCase((), 5, 70, 30.0, "shared", "shared", "full", "new", "numpy", 2))
@example(case=SoftmaxCase((3, 2), 4, 65, 10.0, None, None, "queries", None, "torch", 3))
def test_masked_softmax_matches_reference(isa, case):
    gen = torch.Generator().manual_seed(case.seed)
    shape = (*case.lead, case.nq, case.nk)
    scores = torch.randn(shape, generator=gen) * case.magnitude
    batch = case.lead[0] if case.lead else 1
    counts = side(gen, case.counts, batch, case.nk, random_counts)
    limit = max(case.nq, case.nk)
    q_pos = side(gen, case.positions, batch, case.nq, random_positions(limit))
    k_pos = side(gen, case.positions, batch, case.nk, random_positions(limit))
    mask = softmax_mask(gen, case.mask, shape)
    expected = reference.masked_softmax(scores, counts, q_pos, k_pos, mask)

    given_scores = scores.clone()
    sin = to_kind(given_scores, case.kind)
    # "keys" and "queries" masks reach the kernel as broadcast views (stride 0).
    extra = [to_kind(t, case.kind) if t is not None else None for t in (counts, q_pos, k_pos, mask)]
    out = {None: None, "new": to_kind(torch.full(shape, math.nan), case.kind), "inplace": sin}[case.out]
    result = kernels.masked_softmax(sin, *extra, out=out)

    assert_result(result, expected, sin, SOFTMAX_TOL)
    if out is not None:
        assert result is out
    if case.out != "inplace":
        assert torch.equal(given_scores, scores), "scores changed although out is not scores"


@pytest.mark.parametrize("value", [80.0, -80.0, 0.0])
def test_masked_softmax_all_equal_logits(isa, value):
    """All-equal rows give count-weighted uniform rows, whatever the level."""
    scores = torch.full((3, 5, 77), value)
    counts = torch.randint(0, 4, (3, 77), generator=torch.Generator().manual_seed(0)).float()
    p = kernels.masked_softmax(scores, counts)
    expected = (counts / counts.sum(-1, keepdim=True)).unsqueeze(1).expand(3, 5, 77)
    assert_result(p, expected.double(), scores, SOFTMAX_TOL)


def test_masked_softmax_extreme_logits(isa):
    gen = torch.Generator().manual_seed(1)
    scores = torch.empty(4, 8, 130).uniform_(-80, 80, generator=gen)
    scores[0, 0] = -80.0
    scores[0, 0, 129] = 80.0  # one key takes everything
    scores[1] = torch.empty(8, 130).uniform_(-1000, 1000, generator=gen)  # exp underflows to 0
    p = kernels.masked_softmax(scores)
    assert_result(p, reference.masked_softmax(scores), scores, SOFTMAX_TOL)
    assert_result(p.sum(-1), torch.ones(4, 8, dtype=torch.float64), p, dict(atol=1e-5, rtol=0))


def test_masked_softmax_masked_rows_are_zero(isa):
    """Rows whose keys are all hidden (by counts, positions or an additive
    -inf mask) are zeros, never NaN."""
    scores = torch.randn(3, 4, 20)
    counts = torch.ones(3, 20)
    counts[0] = 0
    q_pos = torch.tensor([[5, 5, 5, 5], [-1, 5, 5, 5], [5, 5, 5, 5]], dtype=torch.int32)
    k_pos = torch.zeros(3, 20, dtype=torch.int32)
    mask = torch.zeros(3, 4, 20)
    mask[2, 3] = -math.inf
    p = kernels.masked_softmax(scores, counts, q_pos, k_pos, mask)
    dead = torch.zeros(3, 4, dtype=torch.bool)
    dead[0] = True
    dead[1, 0] = True
    dead[2, 3] = True
    assert torch.equal(p[dead], torch.zeros_like(p[dead]))
    assert_result(p[~dead].sum(-1), torch.ones(int((~dead).sum()), dtype=torch.float64), p, dict(atol=1e-5, rtol=0))
    assert_result(p, reference.masked_softmax(scores, counts, q_pos, k_pos, mask), scores, SOFTMAX_TOL)


def test_masked_softmax_in_place(isa):
    scores = torch.randn(2, 6, 50) * 5
    expected = reference.masked_softmax(scores)
    result = kernels.masked_softmax(scores, out=scores)
    assert result is scores
    assert_result(scores, expected, scores, SOFTMAX_TOL)


# --------------------------------------------------------------------------
# Layouts: zero-copy views and documented copies


class Recorder:
    """Stands in for prism_ext._C and keeps the arrays each call received."""

    def __init__(self, real):
        self._real = real
        self.calls = {}

    def __getattr__(self, name):
        fn = getattr(self._real, name)

        def record(*args):
            self.calls[name] = args
            return fn(*args)

        return record


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder(kernels._C)
    monkeypatch.setattr(kernels, "_C", rec)
    return rec


def test_strided_views_are_not_copied(recorder):
    """Documented: float32 inputs whose last dimension is contiguous reach the
    C++ kernels without a copy, other strides included."""
    base_q = torch.randn(2, 7, 3, 32)  # [B, n, H, dh]
    q = base_q.transpose(1, 2)  # [B, H, n, dh], not contiguous
    k = torch.randn(2, 3, 9, 40)[..., :32]  # row stride 40
    v = torch.randn(2, 3, 9, 32)
    out = kernels.compressed_attention(q, k, v)
    sent_q, sent_k, sent_v = recorder.calls["compressed_attention"][:3]
    assert np.shares_memory(sent_q, base_q.numpy())
    assert np.shares_memory(sent_k, k.numpy())
    assert np.shares_memory(sent_v, v.numpy())
    assert_result(out, reference.compressed_attention(q, k, v), q, ATTENTION_TOL)

    x = torch.randn(3, 20, 24)[:, ::2, :16]
    kernels.segment_means(x, 3)
    assert np.shares_memory(recorder.calls["segment_means"][0], x.numpy())

    scores = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    kernels.masked_softmax(scores, out=scores)
    assert np.shares_memory(recorder.calls["masked_softmax"][0], scores)


def test_non_contiguous_inputs_are_copied_and_correct(isa):
    """Documented: a last dimension with stride != 1 (or a non-C-contiguous
    ``scores``) is copied once; the answer is the same."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 64, generator=gen)[..., ::2]  # last stride 2
    k = torch.randn(1, 2, 32, 9, generator=gen).transpose(-1, -2)  # last stride 9
    v = torch.randn(1, 2, 9, 32, generator=gen)
    out = kernels.compressed_attention(q, k, v)
    assert_result(out, reference.compressed_attention(q, k, v), q, ATTENTION_TOL)

    x = np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32)
    for view in (x.T, x[::-1], x[:, ::-2]):  # column-major, negative strides
        means, counts = kernels.segment_means(view, 5)
        ref_means, ref_counts = reference.segment_means(torch.from_numpy(view.copy()).double(), 5)
        assert_result(means, ref_means, view, SEGMENT_TOL)
        assert_result(counts, ref_counts, view, dict(atol=0, rtol=0))

    scores = torch.randn(30, 6, generator=gen).T  # [6, 30], column-major
    p = kernels.masked_softmax(scores)
    assert_result(p, reference.masked_softmax(scores), scores, SOFTMAX_TOL)


# --------------------------------------------------------------------------
# Bad input: TypeError/ValueError naming the argument, never a crash


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _attn(**over):
    """compressed_attention with valid [2, 3, 4, 8] / [2, 3, 5, 8] inputs,
    some replaced by ``over``."""
    args = dict(q=_t(2, 3, 4, 8), k=_t(2, 3, 5, 8), v=_t(2, 3, 5, 8))
    args.update(over)
    return lambda: kernels.compressed_attention(**args)


def _softmax(**over):
    args = dict(scores=_t(2, 4, 5))
    args.update(over)
    return lambda: kernels.masked_softmax(**args)


def _means(**over):
    args = dict(x=_t(2, 6, 8), seg=2)
    args.update(over)
    return lambda: kernels.segment_means(**args)


_POS4 = torch.arange(4, dtype=torch.int32)
_POS5 = torch.arange(5, dtype=torch.int32)
_META = dict(device="meta")

BAD_INPUTS = {
    # segment_means
    "means-x-float64": (_means(x=_t(2, 6, 8, dtype=torch.float64)), TypeError, "x"),
    "means-x-int32": (_means(x=_t(2, 6, 8, dtype=torch.int32)), TypeError, "x"),
    "means-x-list": (_means(x=[[1.0, 2.0]]), TypeError, "x"),
    "means-x-rank1": (_means(x=_t(6)), ValueError, "x"),
    "means-x-no-rows": (_means(x=_t(2, 0, 8)), ValueError, "x"),
    "means-x-meta": (_means(x=torch.zeros(2, 6, 8, **_META)), TypeError, "x"),
    "means-seg-0": (_means(seg=0), ValueError, "seg"),
    "means-seg-negative": (_means(seg=-3), ValueError, "seg"),
    "means-seg-float": (_means(seg=2.0), TypeError, "seg"),
    "means-seg-bool": (_means(seg=True), TypeError, "seg"),
    "means-valid-shape": (_means(valid=torch.ones(2, 5, dtype=torch.bool)), ValueError, "valid"),
    "means-valid-float": (_means(valid=torch.ones(2, 6)), TypeError, "valid"),
    "means-valid-meta": (_means(valid=torch.ones(2, 6, dtype=torch.bool, **_META)), TypeError, "valid"),
    # compressed_attention: dtypes, ranks, shapes, devices
    "attn-q-float64": (_attn(q=_t(2, 3, 4, 8, dtype=torch.float64)), TypeError, "q"),
    "attn-k-int64": (_attn(k=_t(2, 3, 5, 8, dtype=torch.int64)), TypeError, "k"),
    "attn-v-float16": (_attn(v=_t(2, 3, 5, 8, dtype=torch.float16)), TypeError, "v"),
    "attn-q-numpy-float64": (_attn(q=np.zeros((2, 3, 4, 8))), TypeError, "q"),
    "attn-q-rank1": (_attn(q=_t(8)), ValueError, "q"),
    "attn-k-rank": (_attn(k=_t(3, 5, 8), v=_t(3, 5, 8)), ValueError, "k"),
    "attn-k-dh": (_attn(k=_t(2, 3, 5, 7), v=_t(2, 3, 5, 7)), ValueError, "k"),
    "attn-k-heads": (_attn(k=_t(2, 2, 5, 8), v=_t(2, 2, 5, 8)), ValueError, "k"),
    "attn-v-shape": (_attn(v=_t(2, 3, 6, 8)), ValueError, "v"),
    "attn-q-empty": (_attn(q=_t(2, 3, 0, 8)), ValueError, "q"),
    "attn-q-meta": (_attn(q=torch.zeros(2, 3, 4, 8, **_META)), TypeError, "q"),
    "attn-v-meta": (_attn(v=torch.zeros(2, 3, 5, 8, **_META)), TypeError, "v"),
    # counts
    "attn-counts-length": (_attn(counts=torch.ones(4)), ValueError, "counts"),
    "attn-counts-batch": (_attn(counts=torch.ones(3, 5)), ValueError, "counts"),
    "attn-counts-rank": (_attn(counts=torch.ones(2, 1, 5)), ValueError, "counts"),
    "attn-counts-negative": (_attn(counts=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])), ValueError, "counts"),
    "attn-counts-nan": (_attn(counts=torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0])), ValueError, "counts"),
    "attn-counts-inf": (_attn(counts=torch.tensor([1.0, math.inf, 1.0, 1.0, 1.0])), ValueError, "counts"),
    "attn-counts-bool": (_attn(counts=torch.ones(5, dtype=torch.bool)), TypeError, "counts"),
    "attn-counts-list": (_attn(counts=[1.0] * 5), TypeError, "counts"),
    "attn-counts-meta": (_attn(counts=torch.ones(5, **_META)), TypeError, "counts"),
    # positions
    "attn-q_pos-length": (_attn(q_pos=_POS5, k_pos=_POS5), ValueError, "q_pos"),
    "attn-k_pos-length": (_attn(q_pos=_POS4, k_pos=_POS4), ValueError, "k_pos"),
    "attn-k_pos-batch": (_attn(q_pos=_POS4, k_pos=torch.zeros(3, 5, dtype=torch.int32)), ValueError, "k_pos"),
    "attn-q_pos-float": (_attn(q_pos=_POS4.float(), k_pos=_POS5), TypeError, "q_pos"),
    "attn-k_pos-numpy-float": (_attn(q_pos=_POS4, k_pos=np.zeros(5)), TypeError, "k_pos"),
    "attn-q_pos-without-k_pos": (_attn(q_pos=_POS4), ValueError, "q_pos"),
    # "q_pos: q_pos and k_pos must be given together"
    "attn-k_pos-without-q_pos": (_attn(k_pos=_POS5), ValueError, "q_pos"),
    "attn-q_pos-int64-overflow": (_attn(q_pos=torch.full((4,), 2**40), k_pos=_POS5), ValueError, "q_pos"),
    "attn-scale-nan": (_attn(scale=math.nan), ValueError, "scale"),
    "attn-scale-string": (_attn(scale="0.5"), TypeError, "scale"),
    "attn-scale-complex": (_attn(scale=1j), TypeError, "scale"),
    # masked_softmax
    "softmax-scores-float64": (_softmax(scores=_t(2, 4, 5, dtype=torch.float64)), TypeError, "scores"),
    "softmax-scores-int32": (_softmax(scores=np.zeros((4, 5), dtype=np.int32)), TypeError, "scores"),
    "softmax-scores-rank1": (_softmax(scores=_t(5)), ValueError, "scores"),
    "softmax-scores-empty": (_softmax(scores=_t(2, 0, 5)), ValueError, "scores"),
    "softmax-scores-meta": (_softmax(scores=torch.zeros(2, 4, 5, **_META)), TypeError, "scores"),
    "softmax-counts-length": (_softmax(counts=torch.ones(4)), ValueError, "counts"),
    "softmax-counts-nan": (_softmax(counts=torch.full((5,), math.nan)), ValueError, "counts"),
    "softmax-counts-negative": (_softmax(counts=-torch.ones(2, 5)), ValueError, "counts"),
    "softmax-q_pos-length": (_softmax(q_pos=_POS5, k_pos=_POS5), ValueError, "q_pos"),
    "softmax-k_pos-float": (_softmax(q_pos=_POS4, k_pos=_POS5.double()), TypeError, "k_pos"),
    "softmax-q_pos-without-k_pos": (_softmax(q_pos=_POS4), ValueError, "q_pos"),
    "softmax-mask-shape": (_softmax(additive_mask=_t(3, 5)), ValueError, "additive_mask"),
    "softmax-mask-float64": (_softmax(additive_mask=_t(4, 5, dtype=torch.float64)), TypeError, "additive_mask"),
    "softmax-mask-meta": (_softmax(additive_mask=torch.zeros(4, 5, **_META)), TypeError, "additive_mask"),
    "softmax-out-shape": (_softmax(out=_t(2, 4, 6)), ValueError, "out"),
    "softmax-out-float64": (_softmax(out=_t(2, 4, 5, dtype=torch.float64)), TypeError, "out"),
    "softmax-out-not-contiguous": (_softmax(out=_t(2, 5, 4).transpose(1, 2)), ValueError, "out"),
    "softmax-out-reversed": (
        lambda: kernels.masked_softmax(np.zeros((4, 5), np.float32), out=np.zeros((4, 5), np.float32)[::-1]),
        ValueError,
        "out",
    ),
    "softmax-out-numpy-for-torch": (_softmax(out=np.zeros((2, 4, 5), dtype=np.float32)), TypeError, "out"),
    "softmax-out-read-only": (
        lambda: kernels.masked_softmax(np.zeros((4, 5), np.float32), out=_read_only((4, 5))),
        ValueError,
        "out",
    ),
}


def _read_only(shape):
    a = np.zeros(shape, np.float32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("call, error, name", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_names_the_argument(call, error, name):
    """The message starts with the argument's name, as every message does."""
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(f"{name}:"), f"message does not start with {name!r}: {info.value}"


# --------------------------------------------------------------------------
# ISA and thread controls


def test_available_isas():
    isas = kernels.available_isas()
    assert isas[0] == "serial"
    assert set(isas) <= {"serial", "avx2", "avx512", "neon"}
    assert kernels.active_isa() == isas[-1]  # the best one unless forced
    for name in isas:
        with kernels.use_isa(name):
            assert kernels.active_isa() == name
        assert kernels.active_isa() == isas[-1]


def test_dispatch_records_the_isa_that_ran(isa):
    """The C++ side reports the ISA whose code each kernel ran (what `prism
    info` prints), here the one forced by the isa fixture."""
    x = np.ones((2, 3, 8), dtype=np.float32)
    kernels.segment_means(x, 2)
    kernels.compressed_attention(x, x, x)
    kernels.masked_softmax(x)
    q8, s8 = np.ones((2, 8), dtype=np.int8), np.ones(2, dtype=np.float32)
    q4, s4 = np.ones((2, 4), dtype=np.uint8), np.ones((2, 1), dtype=np.float32)
    kernels.int8_linear(x, q8, s8)
    kernels.int4_linear(x, q4, s4, s4, 8)
    kernels.int8_dequantize(q8, s8)
    kernels.int4_dequantize(q4, s4, s4, 8)
    assert kernels.dispatched_isas() == dict.fromkeys(ALL_KERNELS, isa)


def test_prism_info_reports_the_dispatch(capsys):
    """In a process whose kernels are forced onto serial, `prism info` says serial, not the CPU's best."""
    from prism_ext.cli import main

    with kernels.use_isa("serial"):
        assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for op in ALL_KERNELS:
        assert f"kernel    {op}: serial" in lines


def test_use_isa_unknown_name():
    before = kernels.active_isa()
    with pytest.raises(ValueError, match="sse9"):
        with kernels.use_isa("sse9"):
            pass
    assert kernels.active_isa() == before


def test_use_isa_rejects_non_string():
    with pytest.raises(TypeError, match="^name: "):
        with kernels.use_isa(2):
            pass


@pytest.mark.parametrize("name", [n for n in ("avx2", "avx512", "neon") if n not in kernels.available_isas()])
def test_use_isa_unavailable(name):
    before = kernels.active_isa()
    with pytest.raises(ValueError, match=f"'{name}' is not available"):
        with kernels.use_isa(name):
            pass
    assert kernels.active_isa() == before


def test_use_isa_restores_on_error():
    isas = kernels.available_isas()
    with pytest.raises(RuntimeError):
        with kernels.use_isa("serial"):
            raise RuntimeError("inside")
    assert kernels.active_isa() == isas[-1]
    with kernels.use_isa("serial"):  # nested: the outer choice comes back
        with kernels.use_isa(isas[-1]):
            assert kernels.active_isa() == isas[-1]
        assert kernels.active_isa() == "serial"


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_set_num_threads_rejects(restore_threads, n, error):
    before = kernels.get_num_threads()
    with pytest.raises(error, match="^n: "):
        kernels.set_num_threads(n)
    assert kernels.get_num_threads() == before


def test_set_num_threads(restore_threads):
    for n in (1, 3, 2):
        prism_ext.set_num_threads(n)
        assert prism_ext.get_num_threads() == n


def _workload(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, n, 64, generator=gen) for n in (96, 300, 300))
    counts = random_counts((2, 300), gen)
    x = torch.randn(3, 500, 48, generator=gen)
    scores = torch.randn(2, 64, 200, generator=gen) * 10
    return (q, k, v, counts), x, scores


def _run(work):
    attn_args, x, scores = work
    return (
        kernels.compressed_attention(*attn_args),
        *kernels.segment_means(x, 7),
        kernels.masked_softmax(scores, attn_args[3][:, :200]),
    )


def test_thread_count_does_not_change_results(isa, restore_threads):
    """Every output row is computed by one thread in a fixed order, so the
    results are bit-identical whatever the thread count."""
    work = _workload(0)
    kernels.set_num_threads(1)
    one = _run(work)
    kernels.set_num_threads(2)
    two = _run(work)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_concurrent_calls_from_python_threads(isa, restore_threads):
    """The kernels release the GIL; calls from two Python threads at once (one
    gets the pool, the other runs inline) both give the single-call result."""
    kernels.set_num_threads(2)
    works = [_workload(1), _workload(2)]
    expected = [_run(w) for w in works]
    results: dict[int, list] = {0: [], 1: []}
    errors = []
    start = threading.Barrier(2)

    def worker(i):
        try:
            start.wait()
            for _ in range(5):
                results[i].append(_run(works[i]))
        except BaseException as e:  # reported on the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 5
        for got in results[i]:
            for a, b in zip(got, expected[i]):
                assert torch.equal(a, b)


# --------------------------------------------------------------------------
# prism info


@pytest.mark.parametrize("how", ["module", "console-script"])
def test_prism_info(tmp_path, how):
    if how == "module":
        cmd = [sys.executable, "-m", "prism_ext.cli", "info"]
    else:
        script = Path(sys.executable).parent / "prism"
        assert script.exists(), f"console script not installed next to {sys.executable}"
        cmd = [str(script), "info"]
    # OMP_NUM_THREADS sets torch's thread count, which the kernels follow by default.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines if line.strip()}
    assert fields["prism-ext"] == prism_ext.__version__
    assert fields["isas"] == ", ".join(kernels.available_isas())
    best = kernels.available_isas()[-1]
    for op in ALL_KERNELS:
        assert f"kernel    {op}: {best}" in lines
    assert fields["threads"] == "1"
