"""Megatron-style tensor parallelism: the ``tp`` peer of PRISM and Voltage.

Every rank holds the whole sequence and a slice of every block: a contiguous
range of attention heads (their Q/K/V rows, their columns of the output
projection) and a contiguous range of MLP columns (rows of w1/b1, columns of
w2). Per layer a rank computes its heads' attention over all N positions and
its partial output projection, all-reduces it, adds the bias and residual,
then does the same for its MLP columns: two all-reduces of [B, N, d] per
layer, after which every rank holds the same (bit-identical) hidden state.

Like the engine, this knows nothing of sockets: the transport is handed in
and only its ``all_reduce(tensor) -> Reduced`` is used.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .accounting import tp_block_flops
from .attention import prism_attention
from .engine import Collected, DeviceStats, LayerStats, assemble_results, finish_request, result_parts
from ..models.common import Block, Network

__all__ = ["TPShard", "split_range", "check_tp_devices", "tp_shards", "run_layers_tp", "tp_request"]


def split_range(total: int, parts: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank`` when ``total`` items are split into
    ``parts`` contiguous ranges as evenly as possible (the first
    ``total % parts`` ranks get one more)."""
    base, extra = divmod(total, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_tp_devices(devices, heads: int) -> int:
    """``devices`` as a tensor-parallel group size: every rank needs a head."""
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise TypeError(f"devices: expected an int, got {type(devices).__name__}")
    if devices < 1:
        raise ValueError(f"devices: must be >= 1, got {devices}")
    if devices > heads:
        raise ValueError(f"devices: tensor parallelism splits the {heads} attention heads over the devices, "
                         f"so at most {heads} devices; got {devices}")
    return devices


@dataclass
class TPShard:
    """One rank's slice of one :class:`Block` (weights [out, in], contiguous);
    the norms, residual adds and activation are the block's own."""

    block: Block
    heads: int  # heads this rank owns
    head_dim: int
    wqkv: torch.Tensor  # [3 * heads * head_dim, d]: Q rows of own heads, then K, then V
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [d, heads * head_dim]: the output projection's columns of own heads
    bo: torch.Tensor | None  # the full bias, added once after the reduce
    w1: torch.Tensor  # [cols, d]
    b1: torch.Tensor | None  # [cols]
    w2: torch.Tensor  # [d, cols]
    b2: torch.Tensor | None  # the full bias, added once after the reduce

    @property
    def width(self) -> int:
        """Attention width of own heads."""
        return self.heads * self.head_dim

    @property
    def cols(self) -> int:
        return self.w1.shape[0]

    @classmethod
    def of(cls, blk: Block, rank: int, size: int) -> "TPShard":
        d, dh = blk.d, blk.d // blk.heads
        h0, h1 = split_range(blk.heads, size, rank)
        c0, c1 = split_range(blk.d_ff, size, rank)
        rows = torch.cat([torch.arange(part * d + h0 * dh, part * d + h1 * dh) for part in range(3)])
        return cls(
            block=blk, heads=h1 - h0, head_dim=dh,
            wqkv=blk.wqkv[rows].contiguous(),
            bqkv=None if blk.bqkv is None else blk.bqkv[rows].contiguous(),
            wo=blk.wo[:, h0 * dh : h1 * dh].contiguous(), bo=blk.bo,
            w1=blk.w1[c0:c1].contiguous(), b1=None if blk.b1 is None else blk.b1[c0:c1].contiguous(),
            w2=blk.w2[:, c0:c1].contiguous(), b2=blk.b2,
        )


# Shards per network, then per (rank, size): slicing copies every weight, so
# it is done once per network and group size. Weak keys: dropping the network
# drops its shards.
_SHARDS: "weakref.WeakKeyDictionary[Network, dict[tuple[int, int], list[TPShard]]]" = weakref.WeakKeyDictionary()
_SHARDS_LOCK = threading.Lock()  # the in-process group runs ranks on threads


def tp_shards(net: Network, rank: int, size: int) -> list[TPShard]:
    """Rank ``rank`` of ``size``'s shard of every block (cached)."""
    check_tp_devices(size, net.heads)
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
    pos = torch.arange(n, dtype=torch.int32) if net.causal else None
    stats = DeviceStats(rank, 0, n, [LayerStats() for _ in shards], weight_bytes=net.weight_bytes())
    stats.time_embed = time.perf_counter() - t0

    for sh, st in zip(shards, stats.layers):
        w = sh.width
        t = time.perf_counter()
        blk = sh.block
        qkv = F.linear(blk.attn_input(x), sh.wqkv, sh.bqkv)
        t = _tick(st, "project", t)
        attn = prism_attention(qkv[..., :w], qkv[..., w : 2 * w], qkv[..., 2 * w :], sh.heads, counts, pos, pos)
        t = _tick(st, "attention", t)
        partial = F.linear(attn, sh.wo)
        _tick(st, "project", t)
        reduced = _reduce(transport, partial, st)
        t = time.perf_counter()
        x = blk.add_attention(x, _add_bias(reduced, sh.bo))
        t = _tick(st, "project", t)

        partial = F.linear(blk.act(F.linear(blk.mlp_input(x), sh.w1, sh.b1)), sh.w2)
        _tick(st, "mlp", t)
        reduced = _reduce(transport, partial, st)
        t = time.perf_counter()
        x = blk.add_mlp(x, _add_bias(reduced, sh.b2))
        _tick(st, "mlp", t)

        f = tp_block_flops(batch, n, net.d, sh.heads, sh.head_dim, sh.cols)
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
