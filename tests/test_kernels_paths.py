"""The second-round kernel paths (issue 11), on every ISA this machine runs,
against the float64 reference: whole-row attention tiles at dh = 32 and 64
(and the generic tiles beside them), softmax rows held in registers and rows
streamed in online blocks, logits near exp's overflow with -inf masks, the
thread split, and the thin call path (``_C`` reading torch tensors, the face
normalising only what ``_C`` refuses). Tolerances as in test_kernels.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference

from prism_ext import _C, kernels

ATTENTION_TOL = dict(atol=5e-6, rtol=5e-5)
SOFTMAX_TOL = dict(atol=1e-6, rtol=5e-5)


def close(actual, expected, tol):
    torch.testing.assert_close(torch.as_tensor(actual).to(torch.float64), expected.to(torch.float64), **tol)


@pytest.mark.parametrize("dh", [32, 64, 48])
@pytest.mark.parametrize("nq", [1, 7, 13, 40])  # whole tiles of 12/6 rows and their tails (avx512)
def test_attention_tiles(isa, dh, nq):
    gen = torch.Generator().manual_seed(dh * 100 + nq)
    nk = 70
    q, k, v = (torch.randn(2, 3, n, dh, generator=gen) for n in (nq, nk, nk))
    counts = torch.randint(0, 5, (2, nk), generator=gen).to(torch.float32)
    counts[:, 0] = 1.0
    q_pos = torch.arange(nk - nq, nk, dtype=torch.int32)
    k_pos = torch.randint(0, nk, (nk,), generator=gen, dtype=torch.int32)
    k_pos[0] = 0
    got = kernels.compressed_attention(q, k, v, counts, q_pos, k_pos)
    close(got, reference.compressed_attention(q, k, v, counts, q_pos, k_pos), ATTENTION_TOL)


# Rows held in registers up to 64 (avx2) / 256 (avx512) keys; longer rows in
# online blocks of 4 vectors, whole or ragged at the end.
@pytest.mark.parametrize("nk", [5, 68, 176, 256, 257, 320, 600])
def test_softmax_row_lengths(isa, nk):
    gen = torch.Generator().manual_seed(nk)
    scores = torch.randn(3, 5, nk, generator=gen) * 4
    counts = torch.randint(0, 4, (nk,), generator=gen).to(torch.float32)
    q_pos = torch.randint(0, nk, (5,), generator=gen, dtype=torch.int32)
    k_pos = torch.randint(0, nk, (nk,), generator=gen, dtype=torch.int32)
    got = kernels.masked_softmax(scores, counts, q_pos, k_pos)
    close(got, reference.masked_softmax(scores, counts, q_pos, k_pos), SOFTMAX_TOL)


@pytest.mark.parametrize("nk", [40, 300])  # in registers, in blocks
def test_softmax_logits_near_exp_overflow(isa, nk):
    """Logits in [86, 95] (exp alone would overflow float32 from 88.7), the
    row max rising from block to block, -inf in the additive mask, a row with
    one visible key and a row with none."""
    gen = torch.Generator().manual_seed(nk)
    scores = 86 + 9 * torch.rand(4, nk, generator=gen)
    scores[0] = torch.linspace(86, 95, nk)  # the max rises along the row
    mask = torch.where(torch.rand(4, nk, generator=gen) < 0.3, -math.inf, 0.0)
    mask[2] = -math.inf
    mask[2, nk // 2] = 0.0  # one visible key: probability 1
    mask[3] = -math.inf  # nothing visible: zeros
    got = torch.as_tensor(kernels.masked_softmax(scores, additive_mask=mask))
    close(got, reference.masked_softmax(scores, additive_mask=mask), SOFTMAX_TOL)
    assert got[2, nk // 2] == 1.0 and bool((got[3] == 0).all())
    assert bool((got[mask == -math.inf] == 0).all()), "a hidden key's probability is exactly 0"


def test_softmax_nan_and_inf_logits_make_the_row_nan(isa):
    scores = torch.zeros(3, 300)
    scores[0, 5] = math.nan
    scores[1, 299] = math.inf
    got = kernels.masked_softmax(scores)
    assert bool(got[0].isnan().all()) and bool(got[1].isnan().all())
    close(got[2], torch.full((300,), 1 / 300), SOFTMAX_TOL)


def test_thread_split_gives_the_same_bits(isa, restore_threads):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 511, 384, generator=gen)
    q, k, v = (torch.randn(1, 12, n, 64, generator=gen) for n in (64, 176, 176))
    counts = torch.full((176,), 4.0)
    scores = torch.randn(12, 256, 176, generator=gen)  # all three large enough to split
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        results.append((kernels.segment_means(x, 16), kernels.compressed_attention(q, k, v, counts),
                        kernels.masked_softmax(scores, counts)))
    (m1, c1), a1, s1 = results[0]
    (m2, c2), a2, s2 = results[1]
    assert torch.equal(m1, m2) and torch.equal(c1, c2) and torch.equal(a1, a2) and torch.equal(s1, s2)


# ---------------------------------------------------------------- the thin call path


def test_c_reads_torch_tensors_and_returns_them():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen) for n in (4, 6, 6))
    counts = torch.ones(6)
    q_pos, k_pos = torch.arange(2, 6, dtype=torch.int32), torch.arange(6, dtype=torch.int32)
    got = _C.compressed_attention(q, k, v, counts, q_pos, k_pos, None)
    assert isinstance(got, torch.Tensor)
    want = _C.compressed_attention(q.numpy(), k.numpy(), v.numpy(), counts.numpy()[None], q_pos.numpy()[None],
                                   k_pos.numpy()[None], 1 / math.sqrt(32))
    assert isinstance(want, np.ndarray) and torch.equal(got, torch.from_numpy(want))
    scores = torch.randn(2, 4, 6, generator=gen)
    out = torch.empty_like(scores)
    assert _C.masked_softmax(scores, counts, q_pos, k_pos, None, out) is out
    means, cnt = _C.segment_means(torch.randn(1, 9, 5, generator=gen), 4, torch.ones(1, 9, dtype=torch.bool))
    assert isinstance(means, torch.Tensor) and cnt.tolist() == [[4.0, 4.0, 1.0]]


@pytest.mark.parametrize("call, error, match", [
    (lambda: _C.masked_softmax(torch.zeros(2, 3, dtype=torch.float64), None, None, None, None, None),
     TypeError, "scores: expected dtype float32"),
    (lambda: _C.masked_softmax(torch.zeros(2, 3, device="meta"), None, None, None, None, None),
     TypeError, "scores: expected a CPU tensor"),
    (lambda: _C.masked_softmax(torch.zeros(2, 3).to_sparse(), None, None, None, None, None),
     TypeError, "scores: expected a dense"),
    (lambda: _C.compressed_attention(*(torch.zeros(1, 1, 2, 4),) * 3, torch.ones(3), None, None, None),
     ValueError, "counts: expected a C-contiguous array of shape"),
    (lambda: _C.compressed_attention(*(torch.zeros(1, 1, 2, 4),) * 3, None, None, None, True),
     TypeError, "scale: expected a real number"),
    (lambda: _C.segment_means(torch.zeros(1, 4, 2), True, None), TypeError, "seg: expected an int"),
    (lambda: _C.segment_means(torch.zeros(1, 4, 2), 2, torch.ones(1, 4, dtype=torch.int64)),
     TypeError, "valid: expected dtype"),
    (lambda: _C.masked_softmax(torch.zeros(2, 3), None, None, None, None, np.zeros((2, 3), np.float32)),
     TypeError, "out: expected the type of scores"),
])
def test_c_rejects_what_the_kernels_cannot_read(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_face_normalises_what_c_refuses():
    """Inputs _C refuses (other dtypes, 3-d heads, 1-d side inputs as int64)
    go through the face's conversions and give the canonical answer."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 16, generator=gen) for n in (5, 8, 8))
    counts = torch.randint(1, 4, (8,), generator=gen)
    q_pos, k_pos = torch.arange(3, 8), torch.arange(8)
    got = kernels.compressed_attention(q, k, v, counts, q_pos, k_pos, scale=np.float32(0.5))
    want = kernels.compressed_attention(q[:, None], k[:, None], v[:, None], counts.float(), q_pos.int(), k_pos.int(),
                                        scale=0.5)[:, 0]
    assert torch.equal(got, want)
    x = torch.randn(10, 6, generator=gen)
    valid = torch.tensor([1, 0, 2, 1, 1, 0, 0, 1, 1, 1])
    m, c = kernels.segment_means(x, 3, valid=valid)
    m2, c2 = kernels.segment_means(x[None], 3, valid=valid[None] != 0)
    assert torch.equal(m, m2[0]) and torch.equal(c, c2[0])
