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
    kv_heads: int | None = None,
) -> torch.Tensor:
    """``q[B, n, heads * dh]``, ``k``/``v[B, nk, kv_heads * dh]`` (row slices
    of wider projections are fine: key heads are strided views, no copy) ->
    ``[B, n, heads * dh]``. ``counts[B, nk]``; ``q_pos[n]`` or ``[B, n]`` and
    ``k_pos[nk]`` or ``[B, nk]`` for the causal rule.

    Grouped-query attention (``kv_heads`` < ``heads``, query head h reads key
    head h // (heads / kv_heads), transformers' layout): the g query heads of
    a key head become g x n query rows of that key head (each keeps its
    position), so keys and values are read once per key head and never
    expanded to all heads."""
    B, n, width = q.shape
    nk = k.shape[1]
    dh = width // heads
    kv_heads = heads if kv_heads is None else kv_heads
    g = heads // kv_heads
    kh = k.view(B, nk, kv_heads, dh).transpose(1, 2)
    vh = v.view(B, nk, kv_heads, dh).transpose(1, 2)
    if g == 1:
        qh = q.view(B, n, heads, dh).transpose(1, 2)
    else:
        qh = q.reshape(B, n, kv_heads, g, dh).permute(0, 2, 1, 3, 4).reshape(B, kv_heads, n * g, dh)
        if q_pos is not None:
            q_pos = q_pos.repeat_interleave(g, dim=-1).contiguous()
    out = kernels.compressed_attention(qh, kh, vh, counts=counts, q_pos=q_pos, k_pos=k_pos)
    if g == 1:
        return out.transpose(1, 2).reshape(B, n, width)
    return out.view(B, kv_heads, n, g, dh).permute(0, 2, 1, 3, 4).reshape(B, n, width)
