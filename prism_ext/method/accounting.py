"""FLOP and byte counts of one Transformer block, shared by the engine (which
counts the shapes it really ran) and ``prism account`` (which counts a config).

One multiply-add is 2 FLOPs. Only matmuls and attention are counted (layer
norms, activations, softmax and the segment means are linear in n·d and left
out), the same convention as ``torch.utils.flop_counter``. Attention is
counted dense (every query against every key); for causal models the
kernel skips the score of an invisible key, so it runs somewhat less.
"""

from __future__ import annotations

from dataclasses import dataclass

from .partition import Partition

__all__ = ["BlockFlops", "block_flops", "tp_block_flops", "prism_layer", "voltage_layer", "reduction_table"]


@dataclass(frozen=True)
class BlockFlops:
    proj: int  # Q/K/V of own rows, K/V of received rows, output projection
    attention: int  # scores and weighted sum over n + m keys
    mlp: int

    @property
    def total(self) -> int:
        return self.proj + self.attention + self.mlp


def block_flops(batch: int, n: int, m: int, d: int, d_ff: int) -> BlockFlops:
    """One block on one device: ``n`` own rows (queries, full Q/K/V, MLP) and
    ``m`` received rows (K/V only). PRISM: m = received mean rows; Voltage:
    m = N - n, i.e. K/V for all N positions."""
    proj = 2 * batch * (n * d * 3 * d + m * d * 2 * d + n * d * d)
    attention = 4 * batch * n * (n + m) * d
    mlp = 4 * batch * n * d * d_ff
    return BlockFlops(proj, attention, mlp)


def tp_block_flops(batch: int, n: int, d: int, heads_own: int, dh: int, cols_own: int) -> BlockFlops:
    """One block on one tensor-parallel rank: Q/K/V of its ``heads_own``
    heads (``dh`` wide) for all ``n`` rows, their attention over n x n, the
    output projection of those heads (partial sums, [.., heads_own*dh] ->
    [.., d]) and the MLP on its ``cols_own`` of the d_ff columns. At one rank
    owning everything this is ``block_flops(batch, n, 0, d, d_ff)``."""
    width = heads_own * dh
    proj = 2 * batch * n * (d * 3 * width + width * d)
    attention = 4 * batch * n * n * width
    mlp = 4 * batch * n * d * cols_own
    return BlockFlops(proj, attention, mlp)


def prism_layer(part: Partition, cr: int, d: int, d_ff: int, itemsize: int = 4, exact: int = 0):
    """Per device (flops, bytes sent) of one PRISM layer with no padding;
    ``exact`` rows of each device travel as their own rows (device 0's
    position 0 among them when it is one: count it in ``exact``)."""
    sent = [part.segments(p, cr, exact) for p in range(part.devices)]
    out = []
    for p, n in enumerate(part.sizes()):
        out.append((block_flops(1, n, sum(sent) - sent[p], d, d_ff), sent[p] * d * itemsize))
    return out


def voltage_layer(part: Partition, d: int, d_ff: int, itemsize: int = 4):
    """Per device (flops, bytes sent) of one Voltage layer (full rows exchanged)."""
    total = part.length
    return [(block_flops(1, n, total - n, d, d_ff), n * d * itemsize) for n in part.sizes()]


def reduction_table(d: int, d_ff: int, devices, lengths, crs):
    """Rows of (P, N, CR, comm reduction, compute reduction of the busiest
    device, mean compute reduction over devices) of PRISM vs Voltage."""
    from .partition import partition

    rows = []
    for P in devices:
        for N in lengths:
            if P > N:
                continue
            part = partition(N, P)
            volt = voltage_layer(part, d, d_ff)
            for cr in crs:
                pri = prism_layer(part, cr, d, d_ff)
                comm = 1 - sum(b for _, b in pri) / sum(b for _, b in volt)
                per_dev = [1 - f.total / v.total for (f, _), (v, _) in zip(pri, volt)]
                busiest = 1 - max(f.total for f, _ in pri) / max(v.total for v, _ in volt)
                rows.append((P, N, cr, comm, busiest, sum(per_dev) / len(per_dev)))
    return rows
