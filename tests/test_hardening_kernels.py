"""Kernel hardening: non-finite values give the same answer on every ISA as
the serial path and the torch reference (docs/errors.md), integer arguments
are range-checked before any arithmetic, masked_softmax refuses an ``out``
that partially overlaps its inputs, and set_num_threads checks its bound
before changing anything."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import reference

from prism_ext import kernels

TOL = dict(rtol=1e-4, atol=1e-5, equal_nan=True)
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# (nq, nk, dh): a few queries (the keys-in-lanes SIMD path), many queries
# (query tiles), and several key blocks with a ragged head size.
SHAPES = [(1, 5, 8), (3, 70, 19), (40, 9, 16), (33, 130, 8)]
SEGMENT_BLOCK = 256  # rows per float32 partial sum (kSegmentMeansBlock, csrc/kernels/segment_means)


def poison(t: torch.Tensor, value: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``t`` with ``value`` at one random element."""
    t = t.clone()
    flat = t.view(-1)
    flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = value
    return t


def check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    # Same non-finite pattern, element for element, then close values.
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN in different places"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "inf in different places"
    torch.testing.assert_close(got.double(), want.double(), **TOL)


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("masks", [None, "counts", "causal"])
def test_compressed_attention_non_finite(isa, where, value, masks):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{where}{value}{masks}".encode()))
    for nq, nk, dh in SHAPES:
        q, k, v = (torch.randn(2, 2, n, dh, generator=gen) for n in (nq, nk, nk))
        args = {"q": q, "k": k, "v": v}
        args[where] = poison(args[where], value, gen)
        extra = {}
        if masks == "counts":
            counts = torch.randint(0, 4, (nk,), generator=gen).float()
            counts[0] = 0.0
            extra["counts"] = counts
        elif masks == "causal":
            extra["q_pos"] = torch.arange(nk - nq, nk)
            extra["k_pos"] = torch.arange(nk)
        got = kernels.compressed_attention(args["q"], args["k"], args["v"], **extra)
        want = reference.compressed_attention(args["q"], args["k"], args["v"], **extra)
        check(got, want)


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_compressed_attention_non_finite_matches_plain_torch(isa, where, value):
    """With nothing hidden, the answer is plain torch attention's, NaN included
    (the bug: one NaN key gave NaN on serial but a zero row on AVX)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for n in (40, 20, 20))
    args = {"q": q, "k": k, "v": v}
    args[where] = poison(args[where], value, gen)
    got = kernels.compressed_attention(args["q"], args["k"], args["v"])
    want = torch.softmax(args["q"].double() @ args["k"].double().transpose(-1, -2) / 4.0, -1) @ args["v"].double()
    check(got, want)
    if where == "k" and math.isnan(value):
        assert torch.isnan(got).all(), "a NaN key reaches every query"


def test_hidden_keys_are_never_read(isa):
    """A key hidden by count 0 or by position does not take part, even NaN."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, 8, generator=gen) for n in (4, 6, 6))
    k[..., 5, :] = math.nan
    v[..., 5, :] = math.inf
    counts = torch.ones(6)
    counts[5] = 0
    clean = kernels.compressed_attention(q, k[..., :5, :], v[..., :5, :])
    assert torch.isfinite(clean).all()
    torch.testing.assert_close(kernels.compressed_attention(q, k, v, counts=counts), clean, rtol=1e-5, atol=1e-6)
    hidden = kernels.compressed_attention(q, k, v, q_pos=torch.full((4,), 4), k_pos=torch.arange(6))
    torch.testing.assert_close(hidden, clean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("where", ["scores", "additive_mask"])
@pytest.mark.parametrize("masks", [None, "counts", "causal"])
def test_masked_softmax_non_finite(isa, where, value, masks):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{where}{value}{masks}".encode()))
    for nq, nk in [(1, 3), (5, 17), (4, 70)]:
        scores = torch.randn(2, 3, nq, nk, generator=gen)
        mask = torch.randn(nq, nk, generator=gen)
        if where == "scores":
            scores = poison(scores, value, gen)
        else:
            mask = poison(mask, value, gen)
        extra = {"additive_mask": mask}
        if masks == "counts":
            counts = torch.randint(0, 3, (nk,), generator=gen).float()
            extra["counts"] = counts
        elif masks == "causal":
            extra["q_pos"] = torch.arange(nk - nq, nk)
            extra["k_pos"] = torch.arange(nk)
        check(kernels.masked_softmax(scores, **extra), reference.masked_softmax(scores, **extra))


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_masked_softmax_non_finite_matches_torch(isa, value):
    gen = torch.Generator().manual_seed(11)
    scores = poison(torch.randn(6, 37, generator=gen), value, gen)
    check(kernels.masked_softmax(scores), torch.softmax(scores.double(), -1))


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_segment_means_non_finite(isa, value):
    gen = torch.Generator().manual_seed(13)
    for n, d, seg in [(10, 3, 4), (33, 40, 8), (7, 70, 7)]:
        x = poison(torch.randn(2, n, d, generator=gen), value, gen)
        valid = torch.rand(2, n, generator=gen) > 0.3
        for kw in ({}, {"valid": valid}):
            got, counts = kernels.segment_means(x, seg, **kw)
            want, want_counts = reference.segment_means(x, seg, *kw.values())
            if kw:  # the reference multiplies by 0 for invalid rows: NaN there; the kernel skips them
                xv = torch.where(valid.unsqueeze(-1), x, torch.zeros(()))
                want, _ = reference.segment_means(xv, seg, valid)
            check(got, want)
            torch.testing.assert_close(counts, want_counts)


# ---------------------------------------------------------------- long segments


def test_segment_mean_of_2_25_ones_is_one(isa):
    """A float32 accumulator stops growing at 2**24 (adding 1 rounds away):
    the mean of 2**25 ones came out 0.5."""
    x = torch.ones(1, 2**25, 1)
    means, counts = kernels.segment_means(x, 2**25)
    assert means.item() == 1.0 and counts.item() == 2**25
    valid = torch.arange(2**25) % 3 != 1  # the masked path too
    means, counts = kernels.segment_means(x, 2**25, valid=valid[None])
    assert means.item() == 1.0
    assert counts.item() == valid.sum().float().item()  # counts are float32: exact only up to 2**24


@pytest.mark.parametrize("masked", [False, True])
def test_long_segments_are_exact_on_every_column_path(isa, masked):
    """1 + 2**-10 per row: once a float32 sum passes 2**15 every addition
    rounds the 2**-10 away (the old kernels' mean of 2**17 rows was off by
    7e-4); blocks of float32 sums flushed into float64 keep it exact. 149
    columns reach every column block, single vector and tail of every ISA."""
    n, d = 2**17, 149
    value = 1 + 2**-10
    x = torch.full((1, n, d), value)
    valid = (torch.arange(n) % 7 != 3)[None] if masked else None
    means, _ = kernels.segment_means(x, n // 2 + 5, valid=valid)  # a long segment and a shorter last one
    assert torch.equal(means, torch.full_like(means, value))


@pytest.mark.parametrize("n, d, seg", [(2**21, 3, 2**21), (3 * 2**17 + 11, 21, 2**17 - 3)])
def test_long_segments_against_a_float64_reference(isa, n, d, seg):
    """Random rows (mean far from zero, so the sum grows like a saturating
    one) against float64: within (block + 3) units of float32 roundoff of
    mean |x|, the bound of blocked float32 sums flushed into float64."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, n, d, generator=gen) * 3 + 10
    valid = torch.rand(1, n, generator=gen) > 0.1
    for kw in ({}, {"valid": valid}):
        got, _ = kernels.segment_means(x, seg, **kw)
        want, _ = reference.segment_means(x.double(), seg, *kw.values())
        bound = (SEGMENT_BLOCK + 3) * 2.0**-24 * 13  # |x| < 13
        assert (got.double() - want).abs().max().item() <= bound


# ---------------------------------------------------------------- integer ranges


@pytest.mark.parametrize("seg", [2**31, 2**63 - 1, 2**64, 10**30])
def test_segment_means_huge_seg_is_one_segment(isa, seg):
    x = torch.randn(2, 5, 3)
    means, counts = kernels.segment_means(x, seg)
    assert means.shape == (2, 1, 3)
    torch.testing.assert_close(means[:, 0], x.mean(1))
    assert counts.tolist() == [[5.0], [5.0]]


@pytest.mark.parametrize("seg", [0, -1, -(2**63), -(2**70)])
def test_segment_means_rejects_small_seg(seg):
    with pytest.raises(ValueError, match="^seg: must be >= 1"):
        kernels.segment_means(torch.zeros(1, 2, 2), seg)


# ---------------------------------------------------------------- aliasing


def test_masked_softmax_partial_overlap_refused():
    base = torch.randn(5, 8)
    s, out = base[:4], base[1:]
    before = base.clone()
    with pytest.raises(ValueError, match="^out: overlaps scores partially"):
        kernels.masked_softmax(s, out=out)
    assert torch.equal(base, before), "nothing written when refused"
    flat = torch.randn(40)
    with pytest.raises(ValueError, match="^out: overlaps scores partially"):
        kernels.masked_softmax(flat[:32].view(4, 8), out=flat[4:36].view(4, 8))


def test_masked_softmax_out_overlapping_mask_refused():
    base = torch.randn(8, 8)
    with pytest.raises(ValueError, match="^out: overlaps additive_mask"):
        kernels.masked_softmax(torch.randn(4, 8), additive_mask=base[2:6], out=base[:4])


def test_masked_softmax_exact_alias_still_works(isa):
    s = torch.randn(3, 4, 9)
    want = reference.masked_softmax(s)
    got = kernels.masked_softmax(s, out=s)
    assert got is s
    torch.testing.assert_close(s.double(), want)
    a = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    want = reference.masked_softmax(torch.from_numpy(a.copy()))
    kernels.masked_softmax(a, out=a)
    torch.testing.assert_close(torch.from_numpy(a).double(), want)


def test_masked_softmax_disjoint_views_of_one_buffer_work():
    base = torch.randn(8, 8)
    want = reference.masked_softmax(base[:4])
    kernels.masked_softmax(base[:4], out=base[4:])
    torch.testing.assert_close(base[4:].double(), want)


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("n", [10**5, 2**40, 2**80, kernels._C.max_threads() + 1])
def test_set_num_threads_bound_checked_first(restore_threads, n):
    kernels.set_num_threads(2)
    with pytest.raises(ValueError) as info:
        kernels.set_num_threads(n)
    msg = str(info.value)
    assert msg.startswith("n: thread count must be in [1, ") and "\n" not in msg
    assert kernels.get_num_threads() == 2, "the previous state is kept"


def test_set_num_threads_max_accepted(restore_threads):
    kernels.set_num_threads(64)
    assert kernels.get_num_threads() == 64
    x = torch.randn(8, 64, 16)
    torch.testing.assert_close(kernels.segment_means(x, 4)[0], reference.segment_means(x, 4)[0])


@pytest.mark.parametrize("n", [np.int64(2**40), np.uint64(2**63)])
def test_set_num_threads_numpy_ints(restore_threads, n):
    before = kernels.get_num_threads()
    with pytest.raises(ValueError, match=r"^n: thread count must be in \[1, "):
        kernels.set_num_threads(n)
    assert kernels.get_num_threads() == before
