"""What a user of an embedding model loses under PRISM, and how sure a
number is: retrieval agreement with the exact model, and the confidence
intervals every reported metric carries (``prism eval``, ``prism finetune``).

Retrieval (:func:`retrieval`): every item of a corpus is a query against the
others. Its neighbours under PRISM are ranked by the cosine of PRISM's
embeddings (the corpus embedded by PRISM too, as a deployment would), its
exact neighbours by the exact model's; per query, whether the nearest
neighbour is the same, whether the top-5 sets are equal, and the share of
the exact top-10 found in PRISM's top-10 (recall@10). With fewer items the
sets shrink to all the others.

Intervals are 95%: Wilson's score interval for a proportion (exact at 0 and
n, unlike the normal approximation); a percentile bootstrap for a mean,
seeded so that a report is reproducible. Both are a few lines of numpy,
which the package already depends on (scipy would be a new runtime
dependency for two formulas).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["retrieval", "retrieval_per_query", "wilson", "bootstrap_mean", "bootstrap_ratio", "Z95"]

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
_CHUNK = 1024  # queries per similarity block: the corpus may hold tens of thousands of items


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] the k nearest other items of each item by cosine, nearest first."""
    e = torch.nn.functional.normalize(emb.double(), dim=-1)
    out = []
    for s in range(0, len(e), _CHUNK):
        sim = e[s:s + _CHUNK] @ e.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -math.inf  # not itself
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def retrieval_per_query(exact, got, *, top: int = 5, recall: int = 10) -> dict[str, np.ndarray]:
    """Per query (each item against the others): ``nn_agreement`` (bool),
    ``top{top}_agreement`` (bool: the same set), ``recall_at_{recall}``
    (float). ``exact``, ``got`` [n, d] embeddings of the same n items."""
    exact, got = torch.as_tensor(exact), torch.as_tensor(got)
    if exact.dim() != 2 or exact.shape != got.shape:
        raise ValueError(f"embeddings: expected two [n, d] tensors of one shape, got {tuple(exact.shape)} "
                         f"and {tuple(got.shape)}")
    n = exact.shape[0]
    if n < 2:
        raise ValueError(f"embeddings: retrieval needs at least 2 items, got {n}")
    k_top, k_rec = min(top, n - 1), min(recall, n - 1)
    width = max(k_top, k_rec)
    a, b = _neighbours(exact, width), _neighbours(got, width)
    same_top = (a[:, :k_top].sort(1).values == b[:, :k_top].sort(1).values).all(1)
    shared = (a[:, :k_rec, None] == b[:, None, :k_rec]).any(2).sum(1)
    return {"nn_agreement": (a[:, 0] == b[:, 0]).numpy(), f"top{top}_agreement": same_top.numpy(),
            f"recall_at_{recall}": (shared.double() / k_rec).numpy()}


def retrieval(exact, got) -> dict:
    """Means of :func:`retrieval_per_query` (top-5, recall@10) and ``n``."""
    per = retrieval_per_query(exact, got)
    return {**{k: float(v.mean()) for k, v in per.items()}, "n": len(per["nn_agreement"])}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``k`` of ``n``."""
    if n < 1:
        raise ValueError(f"n: a proportion needs n >= 1, got {n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 and k = n the bounds are 0 and 1 exactly (rounding would leave 1 - 1e-16)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def bootstrap_mean(values, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values: a mean needs at least one value")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for s in range(0, resamples, 250):  # bounded memory for long value lists
        take = min(250, resamples - s)
        means[s:s + take] = v[rng.integers(0, v.size, (take, v.size))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def bootstrap_ratio(numerators, denominators, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of sum(numerators) / sum(denominators),
    resampling the items (e.g. a perplexity's per-window NLL and token count:
    tokens of one window are not independent draws)."""
    num, den = np.asarray(numerators, np.float64).ravel(), np.asarray(denominators, np.float64).ravel()
    if num.size == 0 or num.shape != den.shape:
        raise ValueError(f"values: expected two lists of one length >= 1, got {num.size} and {den.size}")
    if num.size == 1:
        return float(num[0] / den[0]), float(num[0] / den[0])
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for s in range(0, resamples, 250):
        take = min(250, resamples - s)
        idx = rng.integers(0, num.size, (take, num.size))
        ratios[s:s + take] = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return float(lo), float(hi)
