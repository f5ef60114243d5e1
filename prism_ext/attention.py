"""PRISM attention on top of :func:`prism_ext.kernels.compressed_attention`.

Queries are a device's own rows; keys/values are its own rows followed by the
rows it received (segment means, or full rows in Voltage mode). Key j carries
weight ``counts[j]`` (1 for an own row, the number of rows a mean stands for,
0 for padding), which is exactly attention over the sequence rebuilt by
repeating every mean ``counts[j]`` times. Causal models pass positions: a key
is visible iff its last covered position is <= the query's position.
"""

from __future__ import annotations

import torch

from . import kernels

__all__ = ["prism_attention"]


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
