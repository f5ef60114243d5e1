"""One device's layer loop (DESIGN.md section 2). Knows nothing of sockets:
the transport is handed in and only its ``all_gather`` is used, once per layer.

Modes:
  prism    send segment means of the attention input (or of the hidden state)
           with their counts and end positions; K/V only for own rows and the
           received means; count-weighted attention; partition-aware causality.
  voltage  send the full layer input; every device computes K/V for all N
           positions (the baseline). The same code path with one-row segments
           of the raw hidden state, hence exact at any CR.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import kernels
from .accounting import block_flops
from .attention import prism_attention
from .models.common import Network
from .partition import Partition, cr_schedule, segment_ends

__all__ = ["RunConfig", "LayerStats", "DeviceStats", "RunStats", "DeviceResult", "run_device", "DecodeState",
           "decode_step"]

MODES = ("prism", "voltage")
POINTS = ("attn_input", "hidden")
WEIGHTINGS = ("count", "none")
PHASES = ("compress", "exchange", "project", "attention", "mlp")


@dataclass(frozen=True)
class RunConfig:
    mode: str
    crs: tuple[int, ...]  # one per layer
    wire_dtype: str = "fp32"  # checked by the transport's wire format
    compression_point: str = "attn_input"
    mean_weighting: str = "count"

    @classmethod
    def make(cls, layers: int, *, mode="prism", cr=1, wire_dtype="fp32", compression_point="attn_input",
             mean_weighting="count") -> "RunConfig":
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if compression_point not in POINTS:
            raise ValueError(f"compression_point: expected one of {', '.join(POINTS)}, got {compression_point!r}")
        if mean_weighting not in WEIGHTINGS:
            raise ValueError(f"mean_weighting: expected one of {', '.join(WEIGHTINGS)}, got {mean_weighting!r}")
        return cls(mode, tuple(cr_schedule(cr, layers)), wire_dtype, compression_point, mean_weighting)


@dataclass
class LayerStats:
    bytes_sent: int = 0  # everything serialised for the exchange (header, counts, ends included)
    activation_bytes: int = 0  # of which the activation rows (int8 scales included)
    rows_sent: int = 0
    rows_received: int = 0
    flops_proj: int = 0
    flops_attention: int = 0
    flops_mlp: int = 0
    time: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def flops(self) -> int:
        return self.flops_proj + self.flops_attention + self.flops_mlp


@dataclass
class DeviceStats:
    rank: int
    start: int
    stop: int
    layers: list[LayerStats]
    time_embed: float = 0.0
    time_head: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.layers)

    @property
    def activation_bytes(self) -> int:
        return sum(s.activation_bytes for s in self.layers)

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.layers)

    @property
    def seconds(self) -> float:
        """Own compute and (de)serialisation time, no waiting on peers."""
        return self.time_embed + self.time_head + sum(sum(s.time.values()) for s in self.layers)


@dataclass
class RunStats:
    mode: str
    crs: tuple[int, ...]
    wire_dtype: str
    partition: Partition
    devices: list[DeviceStats]

    @property
    def bytes_sent(self) -> int:
        return sum(d.bytes_sent for d in self.devices)

    @property
    def activation_bytes(self) -> int:
        return sum(d.activation_bytes for d in self.devices)

    def summary(self) -> str:
        lines = [f"mode={self.mode} cr={list(self.crs)} wire={self.wire_dtype} partition={self.partition.sizes()}"]
        for d in self.devices:
            lines.append(f"  device {d.rank} [{d.start}, {d.stop}): sent {d.bytes_sent} B "
                         f"({d.activation_bytes} B activations), {d.flops / 1e6:.2f} MFLOP, {d.seconds * 1e3:.2f} ms")
        return "\n".join(lines)


@dataclass
class DecodeState:
    """What the last device keeps after prefill to decode with no
    communication. Per layer: K/V rows [B, capacity, 2d] (received rows, then
    own rows, then room for new tokens), their counts [B, capacity] and their
    last positions [capacity]; ``length[l]`` rows are filled."""

    kv: list[torch.Tensor] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    length: list[int] = field(default_factory=list)

    def keep(self, kv: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor, room: int) -> None:
        B, L, w = kv.shape
        buf = kv.new_empty(B, L + room, w)
        buf[:, :L] = kv
        self.kv.append(buf)
        self.counts.append(torch.cat([counts, torch.ones(B, room)], dim=1))
        self.positions.append(torch.cat([positions, torch.zeros(room, dtype=torch.int32)]))
        self.length.append(L)


@dataclass
class DeviceResult:
    rows: dict[str, torch.Tensor]
    cls: dict[str, torch.Tensor]
    stats: DeviceStats
    state: DecodeState | None = None


def _tick(stats: LayerStats, phase: str, t0: float) -> float:
    t = time.perf_counter()
    stats.time[phase] += t - t0
    return t


def _exchange(blk, cfg: RunConfig, st: LayerStats, transport, rank: int, x, a, cr: int, own_valid, own_counts,
              pos, start: int, stop: int):
    """Steps 2-3: compress own rows, all-gather, return the other devices'
    rows (ready for the K/V projection), counts and end positions."""
    t = time.perf_counter()
    if cfg.mode == "voltage":
        send = {"rows": x, "counts": own_counts.to(torch.int32), "ends": pos}
    else:
        src = a if cfg.compression_point == "attn_input" else x
        means, counts = kernels.segment_means(src, cr, valid=own_valid)
        ends = torch.tensor(segment_ends(start, stop, cr), dtype=torch.int32)
        send = {"rows": means, "counts": counts.round().to(torch.int32), "ends": ends}
    _tick(st, "compress", t)

    got = transport.all_gather(send, cfg.wire_dtype)
    st.time["exchange"] += got.seconds
    st.bytes_sent = got.bytes_sent
    st.activation_bytes = got.tensor_bytes["rows"]
    st.rows_sent = send["rows"].shape[1]
    others = [item for q, item in enumerate(got.items) if q != rank]
    rows = torch.cat([o["rows"] for o in others], dim=1)
    r_counts = torch.cat([o["counts"] for o in others], dim=1).to(torch.float32)
    r_ends = torch.cat([o["ends"] for o in others])
    if cfg.mean_weighting == "none" and cfg.mode == "prism":
        r_counts = (r_counts > 0).to(torch.float32)
    if blk.pre_ln and (cfg.mode == "voltage" or cfg.compression_point == "hidden"):
        rows = blk.ln1(rows)  # received raw hidden rows: the receiver applies LN1
    return rows, r_counts, r_ends


def run_device(net: Network, inputs: dict, part: Partition, rank: int, transport, cfg: RunConfig,
               *, decode_room: int = 0, last_only: bool = False) -> DeviceResult:
    """Run every layer for device ``rank`` (own rows ``part.ranges[rank]``).

    ``decode_room`` > 0 keeps a :class:`DecodeState` with space for that many
    new tokens (generation, last device). ``last_only`` returns row outputs for
    the last own position only."""
    start, stop = part.ranges[rank]
    n = stop - start
    d = net.d
    t0 = time.perf_counter()
    x = net.embed(inputs, start, stop)
    B = x.shape[0]
    valid = net.valid(inputs)
    own_valid = None if valid is None else valid[:, start:stop]
    own_counts = torch.ones(B, n) if own_valid is None else own_valid.to(torch.float32)
    pos = torch.arange(start, stop, dtype=torch.int32)
    stats = DeviceStats(rank, start, stop, [LayerStats() for _ in net.blocks])
    stats.time_embed = time.perf_counter() - t0
    state = None
    if decode_room:
        state = DecodeState()

    for layer, (blk, cr) in enumerate(zip(net.blocks, cfg.crs)):
        st = stats.layers[layer]
        t = time.perf_counter()
        a = blk.attn_input(x)
        _tick(st, "compress", t)  # LN1 prepares what is compressed and attended
        if transport.size == 1:  # nothing to exchange with
            rows, r_counts, r_ends = x.new_empty(B, 0, d), torch.empty(B, 0), torch.empty(0, dtype=torch.int32)
        else:
            rows, r_counts, r_ends = _exchange(blk, cfg, st, transport, rank, x, a, cr, own_valid, own_counts,
                                               pos, start, stop)
        m = rows.shape[1]
        st.rows_received = m
        t = time.perf_counter()

        qkv = blk.qkv(a)  # own rows: Q, K, V
        kv = torch.cat([blk.kv(rows), qkv[..., d:]], dim=1)  # received rows first, then own
        t = _tick(st, "project", t)
        counts = torch.cat([r_counts, own_counts], dim=1)
        k_pos = torch.cat([r_ends, pos])
        causal = net.causal
        attn = prism_attention(qkv[..., :d], kv[..., :d], kv[..., d:], blk.heads, counts,
                               pos if causal else None, k_pos if causal else None)
        t = _tick(st, "attention", t)
        x = blk.finish_attention(x, attn)
        t = _tick(st, "project", t)
        x = blk.mlp(x)
        _tick(st, "mlp", t)

        f = block_flops(B, n, m, d, blk.d_ff)
        st.flops_proj, st.flops_attention, st.flops_mlp = f.proj, f.attention, f.mlp
        if state is not None:
            state.keep(kv, counts, k_pos, decode_room)

    t = time.perf_counter()
    rows_out = net.row_outputs(x[:, -1:] if last_only else x)
    cls = net.cls_outputs(rows_out) if rank == 0 and not last_only else {}
    stats.time_head = time.perf_counter() - t
    return DeviceResult(rows_out, cls, stats, state)


def decode_step(net: Network, state: DecodeState, ids: torch.Tensor, position: int) -> tuple[dict, list[LayerStats]]:
    """Process the token ``ids[:, position]`` on the last device with no
    exchange: attend over the kept K/V, append its own K/V. Returns its row
    outputs (``logits`` [B, 1, vocab]) and per-layer stats (0 bytes)."""
    d = net.d
    pos = torch.tensor([position], dtype=torch.int32)
    layers = []
    x = net.embed({"input_ids": ids}, position, position + 1)
    B = x.shape[0]
    for layer, blk in enumerate(net.blocks):
        st = LayerStats()
        t = time.perf_counter()
        a = blk.attn_input(x)
        qkv = blk.qkv(a)
        L = state.length[layer]
        if L == state.kv[layer].shape[1]:
            raise ValueError("max_new_tokens: the decode cache is full")
        state.kv[layer][:, L] = qkv[:, 0, d:]
        state.positions[layer][L] = position
        state.length[layer] = L = L + 1
        t = _tick(st, "project", t)
        kv = state.kv[layer][:, :L]
        attn = prism_attention(qkv[..., :d], kv[..., :d], kv[..., d:], blk.heads,
                               state.counts[layer][:, :L], pos, state.positions[layer][:L])
        t = _tick(st, "attention", t)
        x = blk.finish_attention(x, attn)
        t = _tick(st, "project", t)
        x = blk.mlp(x)
        _tick(st, "mlp", t)
        # The new row is an own row; the L - 1 earlier keys count as received K/V (already projected).
        f = block_flops(B, 1, 0, d, blk.d_ff)
        st.flops_proj, st.flops_mlp = f.proj, f.mlp
        st.flops_attention = 4 * B * L * d
        layers.append(st)
    return net.row_outputs(x), layers
