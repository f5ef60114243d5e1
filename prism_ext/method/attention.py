"""PRISM attention on top of :func:`prism_ext.kernels.compressed_attention`.

Queries are a device's own rows; keys/values are its own rows followed by the
rows it received (segment means, or full rows in Voltage mode). Key j carries
weight ``counts[j]`` (1 for an own row, the number of rows a mean stands for,
0 for padding), which is exactly attention over the sequence rebuilt by
repeating every mean ``counts[j]`` times. Causal models pass positions: a key
is visible iff its last covered position is <= the query's position.
"""

from __future__ import annotations

import math

import torch

from .. import kernels

__all__ = ["prism_attention", "mean_weights", "count_bias"]


def mean_weights(counts: torch.Tensor, weighting: str) -> torch.Tensor:
    """What each received row weighs in attention: the number of positions it
    stands for (``"count"``, the method) or 1 (``"none"``, the ablation); a
    row standing for nothing (padding) weighs 0 either way, which masks it."""
    return counts if weighting == "count" else (counts > 0).to(counts.dtype)


def count_bias(counts: torch.Tensor, q_pos: torch.Tensor | None = None,
               k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """The additive logit bias that weights key j by ``counts[..., j]``, what
    :func:`prism_ext.kernels.compressed_attention` does: log(count), -inf for
    a count of 0, and with positions -inf where ``k_pos[j] > q_pos[i]`` (the
    partition-aware causal rule). ``counts`` [..., nk], ``q_pos`` [..., nq],
    ``k_pos`` [..., nk] (leading dimensions broadcast) -> [..., nq, nk], or
    [..., 1, nk] without positions. For torch's attention (the twin, the
    benchmarks' torch peers), never the engine's own path."""
    bias = counts.log().unsqueeze(-2)
    if q_pos is None:
        return bias
    hidden = k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1)
    return torch.where(hidden, -math.inf, bias)


def prism_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    counts: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q[B, n, d]``, ``k``/``v[B, nk, d]`` (row slices of wider projections
    are fine: heads are strided views, no copy) -> ``[B, n, d]``.
    ``counts[B, nk]``; ``q_pos[n]``/``k_pos[nk]`` for the causal rule."""
    B, n, d = q.shape
    nk = k.shape[1]
    dh = d // heads
    qh = q.view(B, n, heads, dh).transpose(1, 2)
    kh = k.view(B, nk, heads, dh).transpose(1, 2)
    vh = v.view(B, nk, heads, dh).transpose(1, 2)
    out = kernels.compressed_attention(qh, kh, vh, counts=counts, q_pos=q_pos, k_pos=k_pos)
    return out.transpose(1, 2).reshape(B, n, d)
