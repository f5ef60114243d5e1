"""What one device does for one request, and the request as it travels.

The same program runs whether the devices are threads of one process
(:mod:`prism_ext.api`, the simulation) or processes on other machines
(:mod:`prism_ext.runtime`): rank 0 turns the user's inputs into one
:class:`Request` and, per device, that device's own inputs only
(``Network.local_inputs``); each device decodes its bytes, checks them against
its model, runs :func:`run` with the transport it was handed, and rank 0 gets
the results. The bytes of a request are untrusted on arrival: every field is
checked before use.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..checks import check_count
from ..comm.wire import check_wire_dtype, decode_message, encode
from ..method.engine import OUTPUTS, Collected, ExactRows, GenerateOptions, RunConfig, RunStats, generate_request, run_request
from ..models import Network
from ..options import MODES, RunOptions
from ..method.partition import AccuracyWarning, Partition, coarse_warning, partition

__all__ = ["Request", "plan", "layout", "local_inputs", "encode_request", "decode_request", "run", "run_stats",
           "count_inputs"]

OPS = ("forward", "generate")


@dataclass(frozen=True)
class Request:
    op: str
    cfg: RunConfig  # mode prism or voltage (tp and single run the engine's mode "prism" at CR 1 per device)
    mode: str
    ranges: tuple[tuple[int, int], ...]  # the partition: own positions of each device
    batch: int
    outputs: tuple[str, ...] = ("rows", "cls")
    generate: GenerateOptions | None = None

    @property
    def partition(self) -> Partition:
        return Partition(self.ranges)

    def to_meta(self) -> dict:
        return {"op": self.op, "mode": self.mode, "config": self.cfg.to_meta(),
                "ranges": [list(r) for r in self.ranges], "batch": self.batch, "outputs": list(self.outputs),
                "generate": None if self.generate is None else vars(self.generate)}

    @classmethod
    def from_meta(cls, meta, net: Network, world: int) -> "Request":
        """Rebuild and check a request that arrived as JSON (rank 0's header)."""
        if not isinstance(meta, dict):
            raise ValueError("request: expected a JSON object")
        op, mode = meta.get("op"), meta.get("mode")
        if op not in OPS:
            raise ValueError(f"request: op must be one of {', '.join(OPS)}, got {op!r}")
        if mode not in MODES:
            raise ValueError(f"request: mode must be one of {', '.join(MODES)}, got {mode!r}")
        ranges = meta.get("ranges")
        if not isinstance(ranges, list) or not 1 <= len(ranges) <= world or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                for r in ranges):
            raise ValueError(f"request: ranges must be 1..{world} [start, stop] pairs")
        if mode == "tp":  # every device sees every position
            if any(r != [0, ranges[0][1]] for r in ranges) or ranges[0][1] < 1:
                raise ValueError(f"request: tp ranges {ranges} must all be the whole sequence")
        else:
            ends = [0] + [v for r in ranges for v in r]
            if any(a != b for a, b in zip(ends[0::2], ends[1::2])) or any(a >= b for a, b in ranges):
                raise ValueError(f"request: ranges {ranges} are not contiguous non-empty ranges from 0")
        if ranges[-1][1] > net.n_positions:
            raise ValueError(f"request: {ranges[-1][1]} positions exceed the model's {net.n_positions}")
        batch = meta.get("batch")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1 << 20:
            raise ValueError(f"request: batch must be an int in [1, 2**20], got {batch!r}")
        outputs = meta.get("outputs")
        if not isinstance(outputs, list) or not set(outputs) <= set(OUTPUTS):
            raise ValueError(f"request: outputs must be a list of {', '.join(OUTPUTS)}")
        cfg = RunConfig.from_meta(meta.get("config"), len(net.blocks))
        check_wire_dtype(cfg.wire_dtype)
        if cfg.mode != ("voltage" if mode == "voltage" else "prism"):
            raise ValueError(f"request: engine mode {cfg.mode!r} does not match mode {mode!r}")
        gen = meta.get("generate")
        if op == "generate":
            if not isinstance(gen, dict) or set(gen) != set(GenerateOptions.__dataclass_fields__):
                raise ValueError("request: generate options missing or malformed")
            gen = GenerateOptions(**gen)
        else:
            gen = None
        return cls(op, cfg, mode, tuple(tuple(r) for r in ranges), batch, tuple(outputs), gen)


def warn_if_coarse(part: Partition, mode: str, crs) -> None:
    """An AccuracyWarning when a PRISM run leaves some device fewer than about
    two segments (see :func:`prism_ext.method.partition.coarse_warning`)."""
    if mode != "prism":
        return
    msg = coarse_warning(part, crs)
    if msg:
        warnings.warn(msg, AccuracyWarning, stacklevel=3)


def plan(net: Network, inputs: dict, options: RunOptions, *, devices: int, special_ids=(),
         generate: GenerateOptions | None = None) -> Request:
    """Check a request on rank 0, before anything is sent: every error here
    names the argument and leaves the devices untouched. ``special_ids``: the
    model's special token ids, for ``exact_rows`` ``special``
    (:attr:`prism_ext.api.PrismModel.special_ids`)."""
    batch, n = net.check_inputs(inputs)
    cfg, ranges = layout(net, n, devices, options, special_ids, generating=generate is not None)
    if options.mode != "tp":
        warn_if_coarse(Partition(ranges), options.mode, cfg.crs)
    return Request("generate" if generate is not None else "forward", cfg, options.mode, ranges, batch,
                   options.outputs, generate)


def layout(net: Network, n: int, devices: int, options: RunOptions, special_ids=(), *,
           generating: bool = False) -> tuple[RunConfig, tuple[tuple[int, int], ...]]:
    """The checks of :func:`plan` that need only the input's length ``n``:
    the engine's per-layer settings and each device's positions. Jobs call it
    before they start anything."""
    devices = check_count(devices, "devices")
    mode = options.mode
    if generating and mode not in ("prism", "single"):
        raise ValueError(f"mode: generation runs in prism or single mode, not {mode!r}")
    spec, point = (net.resolve(k, getattr(options, k)) for k in ("exact_rows", "compression_point"))
    exact_rows = ExactRows.parse(spec, special_ids) if mode == "prism" else ExactRows()
    cfg = RunConfig.make(len(net.blocks), mode="voltage" if mode == "voltage" else "prism",
                         cr=options.cr if mode in ("prism", "voltage") else 1, wire_dtype=options.wire_dtype,
                         compression_point=point, mean_weighting=options.mean_weighting,
                         exact_rows=exact_rows)
    if mode == "single":
        devices = 1
    if mode == "tp":
        from ..method.tensor_parallel import check_tp_devices

        if net.weight_dtype != "fp32":  # its shards slice the matrices by columns too
            raise ValueError(f"mode: 'tp' needs fp32 weights; this model's are {net.weight_dtype} "
                             f"(use prism, voltage or single)")
        devices = check_tp_devices(devices, net.heads, net.blocks[0].kv_heads)
        if options.device_weights is not None and devices > 1:
            raise ValueError("device_weights: mode 'tp' splits heads and MLP columns evenly; pass None")
        if options.wire_dtype != "fp32":
            raise ValueError(f"wire_dtype: mode 'tp' all-reduces in fp32 only, got {options.wire_dtype!r}")
        return cfg, ((0, n),) * devices  # every device sees every position
    if devices > n:
        raise ValueError(f"devices: {devices} devices need at least {devices} positions, the input has {n}")
    return cfg, partition(n, devices, options.device_weights if devices > 1 else None).ranges


def local_inputs(net: Network, inputs: dict, request: Request, rank: int) -> dict:
    return net.local_inputs(inputs, *request.ranges[rank])  # tp: every range is the whole sequence


def encode_request(request: Request, local: dict) -> bytes:
    """The bytes of ``request`` for one device: its own inputs at full precision."""
    return encode({k: v.to(torch.float32) if v.dtype.is_floating_point else v for k, v in local.items()}, "fp32",
                  meta={"request": request.to_meta()})[0]


def decode_request(blob, net: Network, rank: int, world: int, sender: int = 0) -> tuple[Request, dict]:
    """Parse and check a request that arrived for device ``rank``."""
    meta, local = decode_message(blob, sender=sender)
    request = Request.from_meta(meta.get("request"), net, world)
    if rank >= len(request.ranges):
        raise ValueError(f"request: rank {rank} has no positions in {len(request.ranges)} ranges")
    net.check_local(local, request.batch, *request.ranges[rank])  # tp: every range is the whole sequence
    return request, local


def run(net: Network, request: Request, local: dict, rank: int, transport, on_token=None) -> Collected | None:
    """Device ``rank``'s part of ``request``; on rank 0 the collected results
    (``on_token``: rank 0's callback for a streamed generation)."""
    if request.mode == "tp":
        from ..method.tensor_parallel import tp_request

        return tp_request(net, local, request.ranges[0][1], rank, transport, request.outputs)
    part = request.partition
    if request.op == "generate":
        return generate_request(net, local, part, rank, transport, request.cfg, request.generate, on_token)
    return run_request(net, local, part, rank, transport, request.cfg, request.outputs)


def run_stats(request: Request, collected: Collected) -> RunStats:
    return RunStats(request.mode, request.cfg.crs, request.cfg.wire_dtype, request.partition, collected.devices)


def count_inputs(collected: Collected, blobs: list[bytes]) -> Collected:
    """Record what each device received (rank 0's own request never travels)."""
    for r in range(1, len(blobs)):
        collected.devices[r].input_bytes = len(blobs[r])
    return collected
