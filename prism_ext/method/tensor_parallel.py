"""Megatron-style tensor parallelism: the ``tp`` peer of PRISM and Voltage.

Every rank holds the whole sequence and a slice of every block: a contiguous
range of attention heads (their Q/K/V rows, their columns of the output
projection) and a contiguous range of MLP columns (rows of w1/b1, of both
the gate and the up half for a SwiGLU block; columns of w2). Per layer a rank
computes its heads' attention over all N positions and its partial output
projection, all-reduces it, adds the bias and residual, then does the same
for its MLP columns: two all-reduces of [B, N, d] per layer, after which
every rank holds the same (bit-identical) hidden state.

A rank's slice is a block of the model's own class (:meth:`TPShard.of`), so
RoPE, Qwen3's per-head q/k norms and Qwen2's q/k/v biases act on it as on the
whole block. Grouped-query attention is split by key/value heads: each rank
takes whole key/value heads with their query heads, or, with more ranks than
key/value heads, an equal number of ranks share one key/value head (each
computes it) and split its query heads. So the devices are at most the
key/value heads or a multiple of them.

Like the engine, this knows nothing of sockets: the transport is handed in
and only its ``all_reduce(tensor) -> Reduced`` is used.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .accounting import block_flops, shape_of
from .attention import prism_attention
from .engine import Collected, DeviceStats, LayerStats, assemble_results, finish_request, result_parts
from ..models.common import Block, Network

__all__ = ["TPShard", "split_range", "head_split", "check_tp_devices", "tp_shards", "run_layers_tp", "tp_request"]


def split_range(total: int, parts: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank`` when ``total`` items are split into
    ``parts`` contiguous ranges as evenly as possible (the first
    ``total % parts`` ranks get one more)."""
    base, extra = divmod(total, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def head_split(heads: int, kv_heads: int, size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads ``[h0, h1)``, key/value heads ``[k0, k1)``) of ``rank`` of
    ``size`` (:func:`check_tp_devices` first). Query head h reads key/value
    head h // (heads / kv_heads) (transformers' layout), so a rank's query
    heads always read its own key/value heads, in the same order."""
    group = heads // kv_heads
    if size <= kv_heads:  # whole key/value heads, each with its query heads
        k0, k1 = split_range(kv_heads, size, rank)
        return (k0 * group, k1 * group), (k0, k1)
    share = size // kv_heads  # ranks per key/value head: they split its query heads
    k0 = rank // share
    a, b = split_range(group, share, rank % share)
    return (k0 * group + a, k0 * group + b), (k0, k0 + 1)


def check_tp_devices(devices, heads: int, kv_heads: int | None = None) -> int:
    """``devices`` as a tensor-parallel group size: every rank needs a query
    head, and with grouped-query attention whole key/value heads or an equal
    share of one (:func:`head_split`)."""
    kv_heads = heads if kv_heads is None else kv_heads
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise TypeError(f"devices: expected an int, got {type(devices).__name__}")
    if devices < 1:
        raise ValueError(f"devices: must be >= 1, got {devices}")
    if devices > heads:
        raise ValueError(f"devices: tensor parallelism splits the {heads} attention heads over the devices, "
                         f"so at most {heads} devices; got {devices}")
    if devices > kv_heads and devices % kv_heads:
        raise ValueError(f"devices: tensor parallelism gives each device whole key/value heads or an equal share "
                         f"of one, and this model has {kv_heads} key/value heads: at most {kv_heads} devices or a "
                         f"multiple of {kv_heads}; got {devices}")
    return devices


@dataclass
class TPShard:
    """One rank's slice of one :class:`Block`: ``part``, a block of the same
    class holding only the rank's heads and MLP columns (weights [out, in],
    contiguous; no output biases: they are added once, after the reduce), and
    ``block``, the whole one, whose norms and residual adds every rank runs."""

    block: Block
    part: Block

    @classmethod
    def of(cls, blk: Block, rank: int, size: int) -> "TPShard":
        dh, q, kv = blk.head_dim, blk.q_width, blk.kv_width
        (h0, h1), (k0, k1) = head_split(blk.heads, blk.kv_heads, size, rank)
        keys = torch.arange(k0 * dh, k1 * dh)
        rows = torch.cat([torch.arange(h0 * dh, h1 * dh), q + keys, q + kv + keys])
        c0, c1 = split_range(blk.d_ff, size, rank)
        cols = torch.arange(c0, c1)
        if blk.gated:  # w1 = [gate; up]: the same columns of both halves
            cols = torch.cat([cols, blk.d_ff + cols])

        def rows_of(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
            return None if t is None else t[idx].contiguous()

        part = dataclasses.replace(
            blk, heads=h1 - h0, wqkv=rows_of(blk.wqkv, rows), bqkv=rows_of(blk.bqkv, rows),
            wo=blk.wo[:, h0 * dh : h1 * dh].contiguous(), bo=None,
            w1=rows_of(blk.w1, cols), b1=rows_of(blk.b1, cols), w2=blk.w2[:, c0:c1].contiguous(), b2=None)
        return cls(block=blk, part=part)


# Shards per network, then per (rank, size): slicing copies every weight, so
# it is done once per network and group size. Weak keys: dropping the network
# drops its shards.
_SHARDS: "weakref.WeakKeyDictionary[Network, dict[tuple[int, int], list[TPShard]]]" = weakref.WeakKeyDictionary()
_SHARDS_LOCK = threading.Lock()  # the in-process group runs ranks on threads


def tp_shards(net: Network, rank: int, size: int) -> list[TPShard]:
    """Rank ``rank`` of ``size``'s shard of every block (cached)."""
    check_tp_devices(size, net.heads, net.blocks[0].kv_heads)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank: expected an int in [0, {size}), got {rank!r}")
    with _SHARDS_LOCK:
        per_net = _SHARDS.setdefault(net, {})
        if (rank, size) not in per_net:
            per_net[(rank, size)] = [TPShard.of(blk, rank, size) for blk in net.blocks]
        return per_net[(rank, size)]


def _tick(stats: LayerStats, phase: str, t0: float) -> float:
    t = time.perf_counter()
    stats.time[phase] += t - t0
    return t


def _reduce(transport, partial: torch.Tensor, st: LayerStats) -> torch.Tensor:
    got = transport.all_reduce(partial)
    st.time["exchange"] += got.seconds
    st.bytes_sent += got.bytes_sent
    st.activation_bytes += got.bytes_sent  # an all-reduce sends activations only
    return got.tensor


def _add_bias(t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return t if bias is None else t.add_(bias)


def run_layers_tp(net: Network, local: dict, n: int, rank: int, transport) -> tuple[torch.Tensor, DeviceStats]:
    """Embed the whole sequence of ``n`` positions (``local`` =
    ``net.local_inputs(inputs, 0, n)``) and run every layer as rank ``rank``
    of ``transport.size``; returns the final hidden state [B, N, d] (the
    same, bitwise, on every rank) and this rank's stats."""
    shards = tp_shards(net, rank, transport.size)
    t0 = time.perf_counter()
    x = net.embed(local, 0, n)
    batch = x.shape[0]
    valid = net.valid(local)
    counts = None if valid is None else valid.to(torch.float32)  # padding keys weigh 0
    positions = torch.arange(n)  # RoPE's (a block without it ignores them)
    pos = positions.to(torch.int32) if net.causal else None  # the causal rule's
    stats = DeviceStats(rank, 0, n, [LayerStats() for _ in shards], weight_bytes=net.weight_bytes())
    stats.time_embed = time.perf_counter() - t0

    for sh, st in zip(shards, stats.layers):
        blk, part = sh.block, sh.part
        t = time.perf_counter()
        q, k, v = part.split_qkv(part.qkv(blk.attn_input(x), positions))
        t = _tick(st, "project", t)
        attn = prism_attention(q, k, v, part.heads, counts, pos, pos, kv_heads=part.kv_heads)
        t = _tick(st, "attention", t)
        partial = F.linear(attn, part.wo)
        _tick(st, "project", t)
        reduced = _reduce(transport, partial, st)
        t = time.perf_counter()
        x = blk.add_attention(x, _add_bias(reduced, blk.bo))
        t = _tick(st, "project", t)

        partial = part.mlp_branch(blk.mlp_input(x))
        _tick(st, "mlp", t)
        reduced = _reduce(transport, partial, st)
        t = time.perf_counter()
        x = blk.add_mlp(x, _add_bias(reduced, blk.b2))
        _tick(st, "mlp", t)

        f = block_flops(batch, n, 0, shape_of(part))  # a rank's slice is a whole block's work on fewer heads
        st.flops_proj, st.flops_attention, st.flops_mlp = f.proj, f.attention, f.mlp
    return x, stats


def tp_request(net: Network, inputs: dict, n: int, rank: int, transport,
               outputs: tuple[str, ...] = ("rows", "cls")) -> Collected | None:
    """Run every layer as tensor-parallel rank ``rank`` of ``transport.size``
    (``inputs``: ``net.local_inputs`` of the whole sequence of ``n``, on every rank). Every rank ends with
    the same hidden state, so rank 0 computes ``outputs`` (see
    :func:`prism_ext.method.engine.run_request`) itself; the others send only their stats."""
    x, stats = run_layers_tp(net, inputs, n, rank, transport)
    fields: dict[str, torch.Tensor] = {}
    if rank == 0:  # rank 0 holds every row: the whole sequence's parts, assembled as the engine's
        t = time.perf_counter()
        parts, cls = result_parts(net, inputs, x, outputs, first=True, last=True)
        fields = assemble_results([parts], outputs, cls)
        stats.time_head = time.perf_counter() - t
    items = finish_request(transport, rank, stats, {}, {})
    return None if items is None else Collected(fields, [meta["stats"] for meta, _ in items])
