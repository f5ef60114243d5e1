"""prism_ext.util.metrics: retrieval agreement of PRISM's embeddings with the
exact model's, and the confidence intervals every reported metric carries,
on cases whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prism_ext.util import metrics


def _angles(*degrees) -> torch.Tensor:
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1)


def test_identical_or_rotated_embeddings_agree_fully():
    exact = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    for got in (exact.clone(), 3.0 * exact @ torch.linalg.qr(torch.randn(8, 8))[0]):  # cosine ignores both
        r = metrics.retrieval(exact, got)
        assert r["nn_agreement"] == 1.0 and r["top5_agreement"] == 1.0 and r["recall_at_10"] == 1.0


def test_a_swap_gives_the_count_done_by_hand():
    """Items at 0, 10, 50, 100 degrees: exact neighbours 0->1, 1->0, 2->1, 3->2.
    PRISM swaps items 0 and 3 (100, 10, 50, 0 degrees): its neighbours are
    0->2, 1->3, 2->1, 3->1, so one query of four keeps its neighbour."""
    exact = _angles(0, 10, 50, 100)
    got = exact[[3, 1, 2, 0]]
    r = metrics.retrieval(exact, got)
    assert r["nn_agreement"] == 0.25 and r["n"] == 4
    # top-5 and recall@10 over 3 candidates: every set is all the others
    assert r["top5_agreement"] == 1.0 and r["recall_at_10"] == 1.0
    per = metrics.retrieval_per_query(exact, got)
    assert per["nn_agreement"].tolist() == [False, False, True, False]


def test_recall_counts_shared_neighbours():
    """12 items on a circle, PRISM reverses the order of the first 6: the
    exact top-2 of item 0 (1 and 11) becomes (5 reversed -> ...), by hand below."""
    exact = _angles(*[30 * i for i in range(12)])
    got = exact[[5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 10, 11]]
    per = metrics.retrieval_per_query(exact, got, top=2, recall=2)
    # item 0 now sits at 150 degrees: its neighbours are items 1 (120) and 6 (180); exact: 1 and 11
    assert per["recall_at_2"][0] == 0.5 and not per["top2_agreement"][0]
    # item 8 (240 degrees) is untouched, and so are its neighbours 7 and 9
    assert per["recall_at_2"][8] == 1.0 and per["top2_agreement"][8]


def test_wilson_interval():
    lo, hi = metrics.wilson(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)  # the textbook values
    assert metrics.wilson(0, 10)[0] == 0.0 and metrics.wilson(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="n"):
        metrics.wilson(1, 0)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.9, 0.05, 30), rng.normal(0.9, 0.05, 3000)
    a, b = metrics.bootstrap_mean(small), metrics.bootstrap_mean(large)
    assert a[0] < small.mean() < a[1] and b[0] < large.mean() < b[1]
    assert b[1] - b[0] < (a[1] - a[0]) / 5
    assert metrics.bootstrap_mean(small) == a  # seeded: the same interval every time
    assert metrics.bootstrap_mean([0.5]) == (0.5, 0.5)
