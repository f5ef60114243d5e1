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

from ..models.quant import stored_bytes
from .partition import Partition

__all__ = ["BlockFlops", "BlockShape", "block_flops", "shape_of", "row_values", "prism_layer",
           "voltage_layer", "reduction_table", "matrix_bytes"]


@dataclass(frozen=True)
class BlockFlops:
    proj: int  # Q/K/V of own rows, K/V of received rows, output projection
    attention: int  # scores and weighted sum over n + m keys
    mlp: int

    @property
    def total(self) -> int:
        return self.proj + self.attention + self.mlp


@dataclass(frozen=True)
class BlockShape:
    """The widths that decide a block's FLOPs and a sent row's size: ``q_width``
    = heads x head_dim, ``kv_width`` = kv_heads x head_dim (grouped-query
    attention when smaller), ``gated``: a SwiGLU MLP (three d x d_ff matmuls,
    not two). Defaults: a standard block (q_width = kv_width = d)."""

    d: int
    d_ff: int
    q_width: int | None = None
    kv_width: int | None = None
    gated: bool = False

    @property
    def q(self) -> int:
        return self.d if self.q_width is None else self.q_width

    @property
    def kv(self) -> int:
        return self.d if self.kv_width is None else self.kv_width


def shape_of(blk) -> BlockShape:
    """The :class:`BlockShape` of a :class:`prism_ext.models.Block`."""
    return BlockShape(blk.d, blk.d_ff, blk.q_width, blk.kv_width, blk.gated)


def matrix_bytes(shape: BlockShape, layers: int, vocab: int, weight_dtype: str) -> int:
    """Bytes of what ``weight_dtype`` stores in fewer bits, which every
    device holds whole (PRISM splits positions, not weights): each block's
    Q/K/V, output and MLP matrices and one token table of ``vocab`` rows
    (norms, biases and position tables, a few MiB at most, left out)."""
    d, q, kv, ff = shape.d, shape.q, shape.kv, shape.d_ff
    mats = [(q + 2 * kv, d), (d, q), ((2 if shape.gated else 1) * ff, d), (d, ff)]
    per_layer = sum(stored_bytes(m, weight_dtype) for m in mats)
    return layers * per_layer + (stored_bytes((vocab, d), weight_dtype) if vocab else 0)


def row_values(shape: BlockShape, point: str) -> int:
    """Values in one sent row: d for the attention input or the hidden state,
    a mean key and a mean value (2 kv_width) for the ``kv`` point."""
    return 2 * shape.kv if point == "kv" else shape.d


def block_flops(batch: int, n: int, m: int, d, d_ff: int | None = None, *, project_received: bool = True) -> BlockFlops:
    """One block on one device: ``n`` own rows (queries, full Q/K/V, MLP) and
    ``m`` received rows (their K/V projected unless ``project_received`` is
    False: the ``kv`` point receives keys and values). PRISM: m = received
    mean rows; Voltage: m = N - n, i.e. K/V for all N positions. ``d``: the
    hidden size (with ``d_ff``: a standard block) or a :class:`BlockShape`."""
    s = d if isinstance(d, BlockShape) else BlockShape(d, d_ff)
    d, q, kv = s.d, s.q, s.kv
    proj = 2 * batch * (n * d * (q + 2 * kv) + (m * d * 2 * kv if project_received else 0) + n * q * d)
    attention = 4 * batch * n * (n + m) * q
    mlp = 2 * batch * n * d * s.d_ff * (3 if s.gated else 2)
    return BlockFlops(proj, attention, mlp)


def _shape(d, d_ff) -> BlockShape:
    return d if isinstance(d, BlockShape) else BlockShape(d, d_ff)


def prism_layer(part: Partition, cr: int, d, d_ff: int | None = None, itemsize: int = 4, exact: int = 0,
                point: str = "attn_input"):
    """Per device (flops, bytes sent) of one PRISM layer with no padding;
    ``exact`` rows of each device travel as their own rows (device 0's
    position 0 among them when it is one: count it in ``exact``). ``d``: the
    hidden size (with ``d_ff``) or a :class:`BlockShape`; ``point``: the
    compression point (``kv`` sends 2 kv_width values a row and projects
    nothing for received rows)."""
    s = _shape(d, d_ff)
    sent = [part.segments(p, cr, exact) for p in range(part.devices)]
    out = []
    for p, n in enumerate(part.sizes()):
        out.append((block_flops(1, n, sum(sent) - sent[p], s, project_received=point != "kv"),
                    sent[p] * row_values(s, point) * itemsize))
    return out


def voltage_layer(part: Partition, d, d_ff: int | None = None, itemsize: int = 4):
    """Per device (flops, bytes sent) of one Voltage layer (full rows exchanged)."""
    s = _shape(d, d_ff)
    total = part.length
    return [(block_flops(1, n, total - n, s), n * s.d * itemsize) for n in part.sizes()]


def reduction_table(d, d_ff: int | None, devices, lengths, crs, point: str = "attn_input"):
    """Rows of (P, N, CR, comm reduction, compute reduction of the busiest
    device, mean compute reduction over devices) of PRISM (at compression
    ``point``) vs Voltage; ``d`` a hidden size (with ``d_ff``) or a
    :class:`BlockShape` (grouped-query attention, a gated MLP)."""
    from .partition import partition

    s = _shape(d, d_ff)
    rows = []
    for P in devices:
        for N in lengths:
            if P > N:
                continue
            part = partition(N, P)
            volt = voltage_layer(part, s)
            for cr in crs:
                pri = prism_layer(part, cr, s, point=point)
                comm = 1 - sum(b for _, b in pri) / sum(b for _, b in volt)
                per_dev = [1 - f.total / v.total for (f, _), (v, _) in zip(pri, volt)]
                busiest = 1 - max(f.total for f, _ in pri) / max(v.total for v, _ in volt)
                rows.append((P, N, cr, comm, busiest, sum(per_dev) / len(per_dev)))
    return rows
