"""One device's layer loop (docs/design.md, steps 2-10). Knows nothing of sockets:
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

import math
import time
from dataclasses import dataclass, field

import torch

from .. import kernels
from .accounting import block_flops, shape_of
from .attention import mean_weights, prism_attention
from ..models.common import Network
from .partition import Partition, cr_schedule, exact_slots, segment_ends, slot_ends

__all__ = ["ExactRows", "RunConfig", "LayerStats", "DeviceStats", "RunStats", "DeviceResult", "DecodeState", "DecodeStats",
           "Collected", "GenerateOptions", "OUTPUTS", "run_device", "run_request", "generate_request", "finish_request", "decode_step"]

ENGINE_MODES = ("prism", "voltage")  # what a device runs (tp and single are prism at CR 1 per device)
POINTS = ("attn_input", "hidden", "kv")
WEIGHTINGS = ("count", "none")
PHASES = ("compress", "exchange", "project", "attention", "mlp")
OUTPUTS = ("rows", "cls", "pooled", "last")


_MAX_EXACT_IDS = 4096
_MAX_TOPK = 1 << 20


@dataclass(frozen=True)
class ExactRows:
    """Rows that travel as their own rows (count 1, their own end position)
    instead of being averaged into a segment: attention sinks such as [CLS],
    [SEP] or the first position, whose weight a mean would dilute.

    first     position 0 ([CLS] of BERT and ViT, the first token of GPT-2)
    ids       every position holding one of these token ids (special tokens)
    topk      per device, layer and sequence, the k valid rows of largest L2
              norm of the layer input (outlier tokens); chosen anew at every layer
    adaptive  the other rows are grouped where consecutive rows jump most
              (same number of groups), not in groups of equal size; see
              :func:`prism_ext.method.partition.exact_slots`
    """

    first: bool = False
    ids: tuple[int, ...] = ()
    topk: int = 0
    adaptive: bool = False

    def __post_init__(self):
        if not isinstance(self.first, bool) or not isinstance(self.adaptive, bool):
            raise ValueError(f"exact_rows: first and adaptive must be bools, got {self.first!r}, {self.adaptive!r}")
        if (not isinstance(self.ids, tuple) or len(self.ids) > _MAX_EXACT_IDS or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in self.ids)):
            raise ValueError(f"exact_rows: ids must be at most {_MAX_EXACT_IDS} token ids in [0, 2**31)")
        t = self.topk
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TOPK:
            raise ValueError(f"exact_rows: topk must be an int in [0, {_MAX_TOPK}], got {t!r}")

    def __bool__(self) -> bool:
        return self.first or bool(self.ids) or self.topk > 0 or self.adaptive

    @classmethod
    def parse(cls, spec: str, special_ids=()) -> "ExactRows":
        """A user's spec: ``none``, or ``+``-joined parts ``first`` (position 0),
        ``special`` (position 0 and the model's ``special_ids``), ``top<K>``
        (the K largest-norm rows of each device), ``adaptive`` (group the
        other rows at their largest jumps), e.g. ``special+top2``."""
        if isinstance(spec, ExactRows):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"exact_rows: expected a str such as 'special' or 'none', got {type(spec).__name__}")
        first, ids, topk, adaptive = False, (), 0, False
        if spec != "none":
            for part in spec.split("+"):
                if part == "first":
                    first = True
                elif part == "adaptive":
                    adaptive = True
                elif part == "special":
                    first, ids = True, tuple(sorted(set(special_ids)))
                elif part.startswith("top") and part[3:].isdigit() and int(part[3:]) >= 1:
                    topk = int(part[3:])
                else:
                    raise ValueError(f"exact_rows: {part!r} is not one of none, first, special, top<K>, adaptive "
                                     f"(join parts with '+', e.g. 'special+top2')")
        return cls(first, ids, topk, adaptive)

    def to_meta(self) -> dict:
        return {"first": self.first, "ids": list(self.ids), "topk": self.topk, "adaptive": self.adaptive}

    @classmethod
    def from_meta(cls, meta) -> "ExactRows":
        if (not isinstance(meta, dict) or set(meta) != {"first", "ids", "topk", "adaptive"}
                or not isinstance(meta["ids"], list)):
            raise ValueError("request: exact_rows must be an object with first, ids, topk and adaptive")
        return cls(meta["first"], tuple(meta["ids"]), meta["topk"], meta["adaptive"])

    def static_mask(self, local: dict, start: int, batch: int, n: int) -> torch.Tensor:
        """[B, n] the rows that are exact at every layer (first, ids)."""
        mask = torch.zeros(batch, n, dtype=torch.bool)
        if self.first and start == 0:
            mask[:, 0] = True
        ids = local.get("input_ids")
        if self.ids and ids is not None:
            mask |= torch.isin(ids, torch.tensor(self.ids, dtype=ids.dtype))
        return mask

    def mask(self, static: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """This layer's exact rows: the static ones and the ``topk`` valid
        others of largest norm of ``x`` [B, n, d]."""
        if not self.topk:
            return static
        norms = x.norm(dim=-1).masked_fill(static | ~valid, -math.inf)
        top = norms.topk(min(self.topk, norms.shape[1]), dim=1)
        picked = torch.zeros_like(static).scatter_(1, top.indices, top.values > -math.inf)
        return static | picked


@dataclass(frozen=True)
class RunConfig:
    """What every device runs, layer by layer: the engine's view of a
    request's :class:`prism_ext.RunOptions` (whose fields document these),
    with one CR per layer and the exact rows resolved for the model."""

    mode: str = "prism"  # one of ENGINE_MODES
    crs: tuple[int, ...] = (1,)  # one per layer
    wire_dtype: str = "fp32"  # checked by the transport's wire format
    compression_point: str = "attn_input"
    mean_weighting: str = "count"
    exact_rows: ExactRows = ExactRows()  # prism mode only (Voltage sends every row anyway)

    def __post_init__(self):
        if self.mode not in ENGINE_MODES:
            raise ValueError(f"mode: expected one of {', '.join(ENGINE_MODES)}, got {self.mode!r}")
        if self.compression_point not in POINTS:
            raise ValueError(f"compression_point: expected one of {', '.join(POINTS)}, "
                             f"got {self.compression_point!r}")
        if self.mean_weighting not in WEIGHTINGS:
            raise ValueError(f"mean_weighting: expected one of {', '.join(WEIGHTINGS)}, got {self.mean_weighting!r}")
        if not isinstance(self.exact_rows, ExactRows):
            raise TypeError(f"exact_rows: expected an ExactRows, got {type(self.exact_rows).__name__}")

    @classmethod
    def make(cls, layers: int, *, cr=1, **settings) -> "RunConfig":
        """``cr`` (an int, or one per layer) for ``layers`` layers; ``settings``: the other fields."""
        return cls(crs=tuple(cr_schedule(cr, layers)), **settings)

    def to_meta(self) -> dict:
        """JSON-ready form (the request header)."""
        return {"mode": self.mode, "crs": list(self.crs), "wire_dtype": self.wire_dtype,
                "compression_point": self.compression_point, "mean_weighting": self.mean_weighting,
                "exact_rows": self.exact_rows.to_meta()}

    @classmethod
    def from_meta(cls, meta, layers: int) -> "RunConfig":
        """Rebuild and check a config that arrived in a request header (untrusted)."""
        keys = {"mode", "crs", "wire_dtype", "compression_point", "mean_weighting", "exact_rows"}
        if not isinstance(meta, dict) or set(meta) != keys:
            raise ValueError(f"request: config must be an object with {', '.join(sorted(keys))}")
        if not isinstance(meta["crs"], list):
            raise ValueError("request: crs must be a list")
        return cls.make(layers, mode=meta["mode"], cr=meta["crs"], wire_dtype=meta["wire_dtype"],
                        compression_point=meta["compression_point"], mean_weighting=meta["mean_weighting"],
                        exact_rows=ExactRows.from_meta(meta["exact_rows"]))

    @property
    def sends_kv(self) -> bool:
        """Whether the rows on the wire are means of own keys and values (the
        ``kv`` point: receivers project nothing)."""
        return self.mode == "prism" and self.compression_point == "kv"

    @property
    def sends_hidden(self) -> bool:
        """Whether the rows on the wire are hidden states (Voltage's full
        rows, or means taken at compression point ``hidden``) rather than
        attention inputs: a pre-LN receiver then applies LN1 itself."""
        return self.mode == "voltage" or self.compression_point == "hidden"


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
    input_bytes: int = 0  # the request as it reached this device (its own inputs only)
    result_bytes: int = 0  # what it sent back to rank 0 after the last layer (step 8)
    peak_rss: int = 0  # peak resident memory of the process running it, bytes
    weight_bytes: int = 0  # the weights it holds (all of them: PRISM splits positions), as stored (weight_dtype)
    kv_cache_bytes: int = 0  # keys/values kept for decoding (the last device of a generation), bytes

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

    def to_dict(self) -> dict:
        """JSON-ready (travels to rank 0 in a result's header)."""
        return {"rank": self.rank, "start": self.start, "stop": self.stop, "time_embed": self.time_embed,
                "time_head": self.time_head, "input_bytes": self.input_bytes, "result_bytes": self.result_bytes,
                "peak_rss": self.peak_rss, "weight_bytes": self.weight_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "layers": [{"bytes_sent": s.bytes_sent, "activation_bytes": s.activation_bytes,
                            "rows_sent": s.rows_sent, "rows_received": s.rows_received, "flops_proj": s.flops_proj,
                            "flops_attention": s.flops_attention, "flops_mlp": s.flops_mlp,
                            "time": {k: round(v, 7) for k, v in s.time.items()}}
                           for s in self.layers]}

    @classmethod
    def from_dict(cls, d, layers: int, where: str = "stats") -> "DeviceStats":
        """Inverse of :meth:`to_dict` for a header from another device: every
        field checked (type, range), so a garbled one is an error, not a number."""
        def count(v, name):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: {name} must be an int >= 0, got {v!r}")
            return v

        def secs(v, name):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1e9):
                raise ValueError(f"{where}: {name} must be a number of seconds, got {v!r}")
            return float(v)

        if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or len(d["layers"]) != layers:
            raise ValueError(f"{where}: expected a dict with {layers} layers")
        out = cls(count(d.get("rank"), "rank"), count(d.get("start"), "start"), count(d.get("stop"), "stop"), [],
                  secs(d.get("time_embed"), "time_embed"), secs(d.get("time_head"), "time_head"),
                  count(d.get("input_bytes"), "input_bytes"), count(d.get("result_bytes"), "result_bytes"),
                  count(d.get("peak_rss"), "peak_rss"), count(d.get("weight_bytes"), "weight_bytes"),
                  count(d.get("kv_cache_bytes"), "kv_cache_bytes"))
        for i, layer in enumerate(d["layers"]):
            if not isinstance(layer, dict) or not isinstance(layer.get("time"), dict) or set(layer["time"]) != set(PHASES):
                raise ValueError(f"{where}: layer {i} is malformed")
            st = LayerStats(*(count(layer.get(k), f"layers[{i}].{k}") for k in
                              ("bytes_sent", "activation_bytes", "rows_sent", "rows_received", "flops_proj",
                               "flops_attention", "flops_mlp")))
            st.time = {k: secs(v, f"layers[{i}].time.{k}") for k, v in layer["time"].items()}
            out.layers.append(st)
        return out


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

    @property
    def input_bytes(self) -> int:
        return sum(d.input_bytes for d in self.devices)

    @property
    def result_bytes(self) -> int:
        return sum(d.result_bytes for d in self.devices)

    def summary(self) -> str:
        lines = [f"mode={self.mode} cr={list(self.crs)} wire={self.wire_dtype} partition={self.partition.sizes()}"]
        for d in self.devices:
            lines.append(f"  device {d.rank} [{d.start}, {d.stop}): sent {d.bytes_sent} B "
                         f"({d.activation_bytes} B activations) + {d.result_bytes} B results, "
                         f"{d.flops / 1e6:.2f} MFLOP, {d.seconds * 1e3:.2f} ms")
        return "\n".join(lines)


@dataclass
class DecodeState:
    """What the last device keeps after prefill to decode with no
    communication. Per layer: K/V rows [B, capacity, 2 kv_width] (kv_heads
    heads each, rotated keys for RoPE; received rows, then
    own rows, then room for new tokens), their counts [B, capacity] and their
    last positions [B, capacity]; ``length[l]`` rows are filled."""

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
        self.positions.append(torch.cat([positions, torch.zeros(B, room, dtype=torch.int32)], dim=1))
        self.length.append(L)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv, *self.counts, *self.positions))


@dataclass
class DeviceResult:
    hidden: torch.Tensor  # [B, n, d] own rows after the last block
    stats: DeviceStats
    state: DecodeState | None = None


@dataclass
class DecodeStats:
    """Per generated token (after the first, which the prefill gives) on the
    last device: bytes it exchanged (0 by construction), FLOPs and seconds."""

    bytes_sent: list[int] = field(default_factory=list)
    flops: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "flops": self.flops, "seconds": [round(s, 6) for s in self.seconds]}

    @classmethod
    def from_dict(cls, d, where: str = "decode stats") -> "DecodeStats":
        if not isinstance(d, dict) or set(d) != {"bytes_sent", "flops", "seconds"}:
            raise ValueError(f"{where}: expected bytes_sent, flops and seconds")
        lists = [d[k] for k in ("bytes_sent", "flops", "seconds")]
        if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
            raise ValueError(f"{where}: expected three lists of one length")
        ints = lists[0] + lists[1]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise ValueError(f"{where}: bytes and FLOPs must be ints >= 0")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e9 for v in lists[2]):
            raise ValueError(f"{where}: seconds must be numbers >= 0")
        return cls(list(lists[0]), list(lists[1]), [float(v) for v in lists[2]])


@dataclass
class Collected:
    """What rank 0 holds after a request: the output fields, every device's
    stats (gathered with the results), and for generation the new tokens."""

    fields: dict[str, torch.Tensor]
    devices: list[DeviceStats]
    tokens: torch.Tensor | None = None
    decode: DecodeStats | None = None


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # one id or several (Llama 3 has more than one)
    stream: bool = False  # the last device sends each new token to rank 0 as it is decoded
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens whose probability reaches top_p

    def __post_init__(self):
        def whole(v, name, low, none_ok=False, high=2**62):
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low or v > high:
                raise ValueError(f"{name}: expected an int >= {low}{' or None' if none_ok else ''}, got {v!r}")

        whole(self.max_new_tokens, "max_new_tokens", 1)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {t!r}")
        whole(self.top_k, "top_k", 1, none_ok=True)
        whole(self.seed, "seed", -(2**63), none_ok=True, high=2**64 - 1)  # what torch.Generator takes
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            if not eos or len(eos) > _MAX_EXACT_IDS:
                raise ValueError(f"eos_token_id: expected an int, 1..{_MAX_EXACT_IDS} ints or None, got {eos!r}")
            for v in eos:
                whole(v, "eos_token_id", 0, high=2**31 - 1)
            object.__setattr__(self, "eos_token_id", tuple(eos))
        else:
            whole(eos, "eos_token_id", 0, none_ok=True, high=2**31 - 1)
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream: expected a bool, got {self.stream!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1):
            raise ValueError(f"top_p: expected a number in [0, 1] or None, got {p!r}")


def peak_rss() -> int:
    """Peak resident memory of this process, bytes: Linux's VmHWM of this
    process image. Not ru_maxrss, which Linux carries over from the parent
    across fork and exec (a worker started by a large rank 0 would report
    rank 0's peak); where there is no /proc, ru_maxrss (KiB on Linux, bytes
    on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    import sys

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _tick(stats: LayerStats, phase: str, t0: float) -> float:
    t = time.perf_counter()
    stats.time[phase] += t - t0
    return t


def _exact_means(src: torch.Tensor, exact: torch.Tensor, valid: torch.Tensor, cr: int, pos: torch.Tensor,
                 adaptive: bool = False):
    """Step 2 with exact rows: each exact row alone (count 1, its own
    position), the other valid rows averaged in the groups of
    :func:`prism_ext.method.partition.exact_slots`. Uneven, per-sequence groups are
    beyond the segment kernel, so this is a scatter-add over the rows.
    Returns (rows [B, m, d], counts [B, m] int32, ends [B, m] int32, slot [B, n])."""
    B, n, d = src.shape
    slot, m = exact_slots(exact, valid, cr, src if adaptive else None)
    target = torch.where(slot < 0, m, slot)  # padding rows land in a spare slot, dropped below
    sums = src.new_zeros(B, m + 1, d).scatter_add_(1, target[..., None].expand(B, n, d), src)
    counts = torch.zeros(B, m + 1).scatter_add_(1, target, torch.ones(B, n))
    means = sums[:, :m] / counts[:, :m].clamp(min=1)[..., None]
    return means, counts[:, :m].to(torch.int32), slot_ends(slot, m, pos).to(torch.int32), slot


def _position_offsets(slot: torch.Tensor, m: int, ends: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per sent row, the sum over the positions it covers of (its end - the
    position) [B, m] int32: with its count and end, the mean of its positions
    (end - offsets / count), at which a RoPE receiver rotates the keys of a
    mean attention input. ``slot`` [B, n] (-1 at padding), ``ends`` [m] or [B, m]."""
    B = slot.shape[0]
    target = torch.where(slot < 0, m, slot)
    row_end = torch.cat([ends.long().expand(B, m), ends.new_zeros(B, 1).long()], dim=1).gather(1, target)
    gap = torch.where(slot < 0, 0, row_end - pos.long())
    offsets = torch.zeros(B, m + 1, dtype=torch.int64).scatter_add_(1, target, gap)[:, :m]
    if offsets.numel() and int(offsets.max()) > 2**31 - 1:
        raise ValueError("compression_point: a mean covers too many positions to send its mean position "
                         "(int32); use compression_point='kv' for this length")
    return offsets.to(torch.int32)


def mean_positions(ends: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """[B, m] float32 positions of received rows for RoPE: the mean of the
    positions each covers (docs/design.md, "RoPE and GQA"), or, with no
    offsets (Voltage's one-row segments), its own position."""
    if offsets is None:
        return ends.to(torch.float32)
    return (ends.double() - offsets.double() / counts.double().clamp(min=1)).to(torch.float32)


def _sends_offsets(cfg: RunConfig, blk) -> bool:
    """Whether a sent row carries its position offsets: means of attention
    inputs or hidden states of a RoPE block, whose receivers rotate the keys."""
    return blk.positional and cfg.mode == "prism" and not cfg.sends_kv


def _send(cfg: RunConfig, st: LayerStats, transport, x, a, cr: int, own_valid, own_counts, pos, exact,
          kv=None, offsets: bool = False):
    """Steps 2-3, first half: compress own rows and start the all-gather;
    the caller computes its own Q/K/V while the bytes travel (or, at the
    ``kv`` point, has computed them: ``kv`` [B, n, 2 kv_width] is what is
    averaged). ``offsets``: send each mean's position offsets too."""
    t = time.perf_counter()
    if cfg.mode == "voltage":
        send = {"rows": x, "counts": own_counts.to(torch.int32), "ends": pos}
    else:
        src = {"attn_input": a, "hidden": x, "kv": kv}[cfg.compression_point]
        B, n = src.shape[:2]
        if exact is not None and cr > 1:  # at CR 1 every row travels alone anyway
            valid = own_counts > 0
            means, counts, ends, slot = _exact_means(src, cfg.exact_rows.mask(exact, x, valid), valid, cr, pos,
                                                     cfg.exact_rows.adaptive)
            if bool((ends == ends[:1]).all()):
                ends = ends[0]  # the same for every sequence: sent once, as plain segment ends are
        else:
            means, counts = kernels.segment_means(src, cr, valid=own_valid)
            counts = counts.round().to(torch.int32)
            ends = torch.tensor(segment_ends(int(pos[0]), int(pos[-1]) + 1, cr), dtype=torch.int32)
            slot = (torch.arange(n) // cr).expand(B, n)
            if own_valid is not None:
                slot = torch.where(own_valid, slot, -1)
        send = {"rows": means, "counts": counts, "ends": ends}
        if offsets:
            send["offsets"] = _position_offsets(slot, means.shape[1], ends, pos)
    _tick(st, "compress", t)
    st.rows_sent = send["rows"].shape[1]
    return transport.all_gather_start(send, cfg.wire_dtype)


def _check_item(item: dict, q: int, batch: int, d: int, offsets: bool = False) -> dict:
    """Rank ``q``'s exchange item, shapes checked (its bytes are untrusted):
    rows [B, m, d] (d: the width a row of this compression point has),
    counts [B, m], ends [m] or [B, m] (per-sequence ends of exact rows), and
    with ``offsets`` the position offsets [B, m], nothing else."""
    rows, counts, ends = item.get("rows"), item.get("counts"), item.get("ends")
    if rows is None or counts is None or ends is None or rows.dim() != 3 or rows.shape[0] != batch \
            or rows.shape[2] != d:
        raise ValueError(f"rank {q}: sent no rows [{batch}, m, {d}] in its exchange")
    m = rows.shape[1]
    if tuple(counts.shape) != (batch, m) or tuple(ends.shape) not in ((m,), (batch, m)):
        raise ValueError(f"rank {q}: sent counts {list(counts.shape)} and ends {list(ends.shape)} that do not "
                         f"match its {m} rows")
    expected = {"rows", "counts", "ends"} | ({"offsets"} if offsets else set())
    if set(item) != expected:
        raise ValueError(f"rank {q}: sent fields {sorted(item)} in its exchange, expected {sorted(expected)}")
    if offsets and (tuple(item["offsets"].shape) != (batch, m) or bool((item["offsets"] < 0).any())):
        raise ValueError(f"rank {q}: sent position offsets {list(item['offsets'].shape)} that do not match its "
                         f"{m} rows or are negative")
    return item


def _receive(blk, cfg: RunConfig, st: LayerStats, pending, rank: int, batch: int):
    """Second half: wait for the all-gather, return the other devices' keys
    and values [B, m, 2 kv_width] (received as such at the ``kv`` point,
    else projected here from their attention inputs: step 5), counts and
    end positions."""
    offsets = _sends_offsets(cfg, blk)
    width = 2 * blk.kv_width if cfg.sends_kv else blk.d
    got = pending.wait()
    st.time["exchange"] += got.seconds
    st.bytes_sent = got.bytes_sent
    st.activation_bytes = got.tensor_bytes["rows"]
    others = [_check_item(item, q, batch, width, offsets) for q, item in enumerate(got.items) if q != rank]
    rows = torch.cat([o["rows"] for o in others], dim=1)
    B = rows.shape[0]
    r_counts = torch.cat([o["counts"] for o in others], dim=1).to(torch.float32)
    # Shared segment ends travel once [m]; exact rows' ends differ per sequence [B, m].
    r_ends = torch.cat([o["ends"].expand(B, -1) for o in others], dim=1)
    t = time.perf_counter()
    if cfg.sends_kv:
        kv = rows
    else:
        r_pos = None
        if blk.positional:
            r_pos = mean_positions(r_ends, r_counts,
                                   torch.cat([o["offsets"] for o in others], dim=1) if offsets else None)
        kv = blk.kv(blk.received_attn_input(rows, cfg.sends_hidden), r_pos)
    _tick(st, "project", t)
    if cfg.mode == "prism":
        r_counts = mean_weights(r_counts, cfg.mean_weighting)
    return kv, r_counts, r_ends


def run_device(net: Network, local: dict, part: Partition, rank: int, transport, cfg: RunConfig,
               *, decode_room: int = 0) -> DeviceResult:
    """Run every layer for device ``rank`` (own rows ``part.ranges[rank]``,
    ``local`` = ``net.local_inputs(inputs, *part.ranges[rank])``).

    ``decode_room`` > 0 keeps a :class:`DecodeState` with space for that many
    new tokens (generation, last device)."""
    start, stop = part.ranges[rank]
    n = stop - start
    t0 = time.perf_counter()
    x = net.embed(local, start, stop)
    B = x.shape[0]
    own_valid = net.valid(local)
    own_counts = torch.ones(B, n) if own_valid is None else own_valid.to(torch.float32)
    pos = torch.arange(start, stop, dtype=torch.int32)
    exact = None
    if cfg.exact_rows and cfg.mode == "prism":
        exact = cfg.exact_rows.static_mask(local, start, B, n)
    stats = DeviceStats(rank, start, stop, [LayerStats() for _ in net.blocks], weight_bytes=net.weight_bytes())
    stats.time_embed = time.perf_counter() - t0
    state = None
    if decode_room:
        state = DecodeState()

    for layer, (blk, cr) in enumerate(zip(net.blocks, cfg.crs)):
        st = stats.layers[layer]
        qw, kw = blk.q_width, blk.kv_width
        t = time.perf_counter()
        a = blk.attn_input(x)
        _tick(st, "compress", t)  # LN1 prepares what is compressed and attended
        qkv = None
        if cfg.sends_kv:  # own keys and values are what is averaged: project them first
            t = time.perf_counter()
            qkv = blk.qkv(a, pos)
            _tick(st, "project", t)
        pending = None
        if transport.size > 1:
            pending = _send(cfg, st, transport, x, a, cr, own_valid, own_counts, pos, exact,
                            None if qkv is None else qkv[..., qw:], _sends_offsets(cfg, blk))
        if qkv is None:
            t = time.perf_counter()
            qkv = blk.qkv(a, pos)  # own rows: Q, K, V, while the exchange is in flight
            _tick(st, "project", t)
        if pending is None:  # nothing to exchange with
            r_kv, r_counts, r_ends = x.new_empty(B, 0, 2 * kw), torch.empty(B, 0), torch.empty(B, 0, dtype=torch.int32)
        else:
            r_kv, r_counts, r_ends = _receive(blk, cfg, st, pending, rank, B)
        m = r_kv.shape[1]
        st.rows_received = m
        t = time.perf_counter()
        kv = torch.cat([r_kv, qkv[..., qw:]], dim=1)  # received rows first, then own
        counts = torch.cat([r_counts, own_counts], dim=1)
        q_pos = pos.expand(B, n).contiguous()  # batched like the received ends (exact rows differ per sequence)
        k_pos = torch.cat([r_ends, q_pos], dim=1)
        causal = net.causal
        attn = prism_attention(qkv[..., :qw], kv[..., :kw], kv[..., kw:], blk.heads, counts,
                               q_pos if causal else None, k_pos if causal else None, blk.kv_heads)
        t = _tick(st, "attention", t)
        x = blk.finish_attention(x, attn)
        t = _tick(st, "project", t)
        x = blk.mlp(x)
        _tick(st, "mlp", t)

        f = block_flops(B, n, m, shape_of(blk), project_received=not cfg.sends_kv)
        st.flops_proj, st.flops_attention, st.flops_mlp = f.proj, f.attention, f.mlp
        if state is not None:
            state.keep(kv, counts, k_pos, decode_room)
    if state is not None:
        stats.kv_cache_bytes = state.nbytes
    return DeviceResult(x, stats, state)


def finish_request(transport, rank: int, stats: DeviceStats, send: dict, meta: dict) -> list | None:
    """Step 8: send what rank 0 needs (and this device's stats) to rank 0.
    Returns, on rank 0, every rank's (meta, tensors); elsewhere None."""
    stats.peak_rss = peak_rss()
    got = transport.gather(send, {**meta, "stats": stats.to_dict()}, dst=0)
    if got.items is None:
        return None
    # The stats travelled inside the result, so its size is known on arrival.
    for q, (m, _) in enumerate(got.items):
        m["stats"] = DeviceStats.from_dict(m.get("stats"), len(stats.layers), f"rank {q}: stats")
        m["stats"].result_bytes = got.received[q]
    return got.items


def _device_stats(items: list) -> list[DeviceStats]:
    return [meta["stats"] for meta, _ in items]


def run_request(net: Network, local: dict, part: Partition, rank: int, transport, cfg: RunConfig,
                outputs: tuple[str, ...] = ("rows", "cls")) -> Collected | None:
    """One forward pass on device ``rank``, then only what ``outputs`` asks
    for goes to rank 0 (docs/design.md, step 9), counted in ``result_bytes``:

    rows    every row output of every position (``last_hidden_state``, ``logits``)
    cls     the per-sequence heads ([CLS]: pooler, classifier), computed on rank 0
    pooled  ``mean_pooled``: the mean of ``last_hidden_state`` over valid positions
            (each device sends its sum and count, not its rows)
    last    the row outputs of the last position (next-token logits), from the last device

    Returns a :class:`Collected` on rank 0, None elsewhere."""
    res = run_device(net, local, part, rank, transport, cfg)
    t = time.perf_counter()
    send, cls = result_parts(net, local, res.hidden, outputs, first=rank == 0, last=rank == part.devices - 1)
    res.stats.time_head = time.perf_counter() - t
    items = finish_request(transport, rank, res.stats, send, {})
    if items is None:
        return None
    return Collected(assemble_results([tensors for _, tensors in items], outputs, cls), _device_stats(items))


def result_parts(net: Network, local: dict, x: torch.Tensor, outputs: tuple[str, ...], *, first: bool,
                 last: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What one device's final hidden rows ``x`` contribute to ``outputs``
    (see :func:`run_request`): the tensors it sends rank 0, and on the first
    device (``first``: it holds [CLS]) the per-sequence heads."""
    send: dict[str, torch.Tensor] = {}
    rows = None
    if "rows" in outputs or "pooled" in outputs or (first and "cls" in outputs):
        rows = net.row_outputs(x)
    if "rows" in outputs:
        send.update({f"rows.{k}": v for k, v in rows.items()})
    if "pooled" in outputs:
        valid = net.valid(local)
        h = rows["last_hidden_state"]
        w = torch.ones(h.shape[:2]) if valid is None else valid.to(torch.float32)
        send["pooled.sum"] = torch.einsum("bn,bnd->bd", w, h)
        send["pooled.count"] = w.sum(1).round().to(torch.int32)
    if "last" in outputs and last:
        tail = net.row_outputs(x[:, -1:]) if rows is None else {k: v[:, -1:] for k, v in rows.items()}
        send.update({f"last.{k}": v for k, v in tail.items()})
    cls = net.cls_outputs(rows) if first and "cls" in outputs else {}
    return send, cls


def assemble_results(parts: list[dict[str, torch.Tensor]], outputs: tuple[str, ...],
                     cls: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0 joins every device's :func:`result_parts` (in rank order) into the output fields."""
    fields: dict[str, torch.Tensor] = {}
    if "rows" in outputs:
        for name in (k for k in parts[0] if k.startswith("rows.")):
            fields[name[5:]] = torch.cat([t[name] for t in parts], dim=1)
    if "last" in outputs:
        fields.update({k[5:]: v for k, v in parts[-1].items() if k.startswith("last.")})
    if "pooled" in outputs:
        total = sum(t["pooled.sum"] for t in parts)
        count = sum(t["pooled.count"] for t in parts).to(torch.float32)
        fields["mean_pooled"] = total / count.clamp(min=1)[:, None]
    fields.update(cls)
    return fields


def generate_request(net: Network, local: dict, part: Partition, rank: int, transport, cfg: RunConfig,
                     options: GenerateOptions, on_token=None) -> Collected | None:
    """GPT-2 generation: the prefill on every device, then the last device
    decodes alone from its kept K/V (own rows and earlier partitions' means:
    no communication per token) and sends the new tokens to rank 0.

    ``temperature`` 0 is greedy; > 0 samples from softmax(logits / T),
    restricted to the ``top_k`` most likely tokens and then to the ``top_p``
    nucleus if given (:func:`warp_logits`), row b with a ``torch.Generator``
    seeded by ``sample_seed(seed, b)``. Sequences that emit ``eos_token_id``
    continue with it (like HF padding with eos).

    With ``options.stream`` the last device also sends each step's tokens to
    rank 0 as soon as they are picked (the transport's point-to-point
    ``send``/``recv``), where ``on_token(tokens [B])`` is called with them.
    ``on_token`` returning False ends the generation after those tokens (a
    client gone, a stop string found): rank 0 answers every token frame but
    the last with a small ``{"stop": bool}`` frame, which the last device
    reads after computing its next step (so the answer is in flight while it
    computes). The stream's frames, both ways, count in the last device's
    ``result_bytes``."""
    last_rank = part.devices - 1
    last = rank == last_rank
    res = run_device(net, local, part, rank, transport, cfg, decode_room=options.max_new_tokens - 1 if last else 0)
    send: dict[str, torch.Tensor] = {}
    meta: dict = {}
    streamed: list[torch.Tensor] = []
    stream_bytes = 0
    going = [True]  # rank 0 as the last device: whether on_token wants more
    if last:
        t = time.perf_counter()
        logits = net.row_outputs(res.hidden[:, -1:])["logits"][:, -1]
        res.stats.time_head = time.perf_counter() - t

        def emit(token: torch.Tensor, done: bool) -> None:
            if rank != 0:
                transport.send({"tokens": token.to(torch.int32)}, {"done": done}, 0)
                return
            streamed.append(token)
            if on_token is not None and on_token(token) is False:
                going[0] = False

        def proceed() -> bool:
            if rank == 0:
                return going[0]
            meta, tensors, _ = transport.recv(0)
            if tensors or set(meta) != {"stop"} or not isinstance(meta["stop"], bool):
                raise ValueError(f"rank 0: sent a malformed stream answer (fields {sorted(meta)[:4]})")
            return not meta["stop"]

        ids, decode = _decode(net, res.state, part.length, logits, options, emit if options.stream else None,
                              proceed if options.stream else None)
        send["tokens"] = ids
        meta["decode"] = decode.to_dict()
    elif rank == 0 and options.stream:
        stream_bytes = _receive_stream(transport, last_rank, local, options.max_new_tokens, on_token, streamed)
    items = finish_request(transport, rank, res.stats, send, meta)
    if items is None:
        return None
    meta, tensors = items[-1]
    tokens = tensors.get("tokens")
    if tokens is None or tokens.dim() != 2 or tokens.shape[1] > options.max_new_tokens:
        raise ValueError(f"rank {last_rank}: sent no valid tokens")
    if options.stream and not torch.equal(torch.stack(streamed, dim=1), tokens.long()):
        raise ValueError(f"rank {last_rank}: the tokens it streamed differ from those it sent at the end")
    stats = _device_stats(items)
    stats[last_rank].result_bytes += stream_bytes
    return Collected({}, stats, tokens.long(),
                     DecodeStats.from_dict(meta.get("decode"), f"rank {last_rank}: decode stats"))


def _receive_stream(transport, src: int, local: dict, limit: int, on_token, streamed: list) -> int:
    """Rank 0's end of a token stream: one frame per decoding step from rank
    ``src`` until it says done (answering each other one: go on or stop);
    returns the stream's bytes, both ways."""
    batch = next(iter(local.values())).shape[0]
    received = 0
    while True:
        meta, tensors, nbytes = transport.recv(src)
        received += nbytes
        token = tensors.get("tokens")
        if token is None or tuple(token.shape) != (batch,) or len(streamed) >= limit or set(meta) != {"done"}:
            raise ValueError(f"rank {src}: sent a malformed token stream (step {len(streamed)})")
        streamed.append(token.long())
        wanted = on_token is None or on_token(token.long()) is not False
        if meta["done"] is True:
            return received
        stop = not wanted
        received += transport.send({}, {"stop": stop}, src)
        if stop:  # the last device ends after this step too: the stream is complete
            return received


def _decode(net: Network, state: DecodeState, n: int, logits: torch.Tensor, options: GenerateOptions,
            emit=None, proceed=None) -> tuple[torch.Tensor, DecodeStats]:
    """The decoding loop of the last device: returns the new tokens [B, T];
    ``emit(tokens [B], done)`` is called after every step, and ``proceed()``
    after computing the next one (False: end with the tokens emitted so far)."""
    # one generator per row: a row's sample depends on its seed alone, not on the rows beside it
    gen = None if options.seed is None else [torch.Generator().manual_seed(sample_seed(options.seed, b))
                                             for b in range(logits.shape[0])]
    eos = options.eos_token_id
    eos = None if eos is None else torch.tensor(eos if isinstance(eos, tuple) else (eos,))
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    new: list[torch.Tensor] = []
    stats = DecodeStats()
    for step in range(options.max_new_tokens):
        token = _pick(logits, options, gen)
        if eos is not None:  # finished sequences continue with the first eos id (transformers pads with it)
            token = torch.where(done, torch.full_like(token, int(eos[0])), token)
            done |= torch.isin(token, eos)
        new.append(token)
        finished = step == options.max_new_tokens - 1 or (eos is not None and bool(done.all()))
        if emit is not None:
            emit(token, finished)
        if finished:
            break
        t = time.perf_counter()
        rows, layer_stats = decode_step(net, state, token[:, None], n + step)
        stats.seconds.append(time.perf_counter() - t)
        stats.bytes_sent.append(sum(s.bytes_sent for s in layer_stats))
        stats.flops.append(sum(s.flops for s in layer_stats))
        logits = rows["logits"][:, -1]
        if proceed is not None and not proceed():
            break
    return torch.stack(new, dim=1), stats


def sample_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a sampled generation seeded by ``seed``:
    ``seed`` itself for row 0 (a one-row generation is unchanged), and for
    the others a distinct value in torch.Generator's range (Weyl steps of
    the golden ratio, as SplitMix64 spaces its streams)."""
    return seed if row == 0 else (seed + row * 0x9E3779B97F4A7C15) % 2**64


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """The logits sampling draws from, as transformers composes its warpers:
    divided by ``temperature`` (> 0), then all but the ``top_k`` largest set
    to -inf, then all but the nucleus (the most likely tokens whose softmax
    reaches ``top_p``; at least one) set to -inf. Float64 [B, V].

    The logits are shifted so the largest is 0 first, in float64, where every
    positive Python float is non-zero (in float32, T = 1e-300 is 0 and 0 / 0
    is NaN): no scaled value overflows, and a T far below the logits' gaps
    gives the greedy token."""
    z = logits.double()
    z = (z - z.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # transformers' TopPLogitsWarper: ascending sort, drop the tail whose mass is <= 1 - top_p, keep the top one
        ordered, order = torch.sort(z, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1:] = False
        z = z.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return z


def _pick(logits: torch.Tensor, options: GenerateOptions, gen: list | None) -> torch.Tensor:
    """The next token of every row: greedy at temperature 0, else sampled
    from :func:`warp_logits` (row b with ``gen[b]``)."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp_logits(logits, options.temperature, options.top_k, options.top_p), dim=-1)
    if gen is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g)[:, 0] for b, g in enumerate(gen)])


def decode_step(net: Network, state: DecodeState, token: torch.Tensor, position: int) -> tuple[dict, list[LayerStats]]:
    """Process ``token`` [B, 1] at ``position`` on the last device with no
    exchange: attend over the kept K/V, append its own K/V. Returns its row
    outputs (``logits`` [B, 1, vocab]) and per-layer stats (0 bytes)."""
    pos = torch.tensor([position], dtype=torch.int32)
    layers = []
    x = net.embed({"input_ids": token}, position, position + 1)
    B = x.shape[0]
    for layer, blk in enumerate(net.blocks):
        st = LayerStats()
        t = time.perf_counter()
        qw, kw = blk.q_width, blk.kv_width
        a = blk.attn_input(x)
        qkv = blk.qkv(a, pos)
        L = state.length[layer]
        if L == state.kv[layer].shape[1]:
            raise ValueError("max_new_tokens: the decode cache is full")
        state.kv[layer][:, L] = qkv[:, 0, qw:]
        state.positions[layer][:, L] = position
        state.length[layer] = L = L + 1
        t = _tick(st, "project", t)
        kv = state.kv[layer][:, :L]
        attn = prism_attention(qkv[..., :qw], kv[..., :kw], kv[..., kw:], blk.heads,
                               state.counts[layer][:, :L], pos.expand(B, 1).contiguous(), state.positions[layer][:, :L],
                               blk.kv_heads)
        t = _tick(st, "attention", t)
        x = blk.finish_attention(x, attn)
        t = _tick(st, "project", t)
        x = blk.mlp(x)
        _tick(st, "mlp", t)
        # The new row is an own row; the L - 1 earlier keys count as received K/V (already projected).
        f = block_flops(B, 1, 0, shape_of(blk))
        st.flops_proj, st.flops_mlp = f.proj, f.mlp
        st.flops_attention = 4 * B * L * qw
        layers.append(st)
    return net.row_outputs(x), layers
