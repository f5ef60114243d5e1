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

from dataclasses import dataclass

import torch

from .checks import check_count, warn_if_coarse
from .comm.local import LocalGroup
from .comm.wire import check_wire_dtype, decode_message, encode
from .engine import OUTPUTS, Collected, ExactRows, GenerateOptions, RunConfig, RunStats, generate_request, run_request
from .models import Network
from .partition import Partition, partition

__all__ = ["MODES", "Request", "plan", "local_inputs", "encode_request", "decode_request", "run", "run_stats",
           "simulate", "count_inputs"]

# single: rank 0 alone; prism / voltage: position-wise over every device; tp: tensor parallel.
MODES = ("single", "prism", "voltage", "tp")
OPS = ("forward", "generate")
_KNOBS = ("wire_dtype", "compression_point", "mean_weighting")


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
        c = self.cfg
        return {"op": self.op, "mode": self.mode, "crs": list(c.crs), "wire_dtype": c.wire_dtype,
                "compression_point": c.compression_point, "mean_weighting": c.mean_weighting,
                "exact_rows": c.exact_rows.to_meta(),
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
        knobs = {k: meta.get(k) for k in _KNOBS}
        check_wire_dtype(knobs["wire_dtype"])
        crs = meta.get("crs")
        if not isinstance(crs, list):
            raise ValueError("request: crs must be a list")
        cfg = RunConfig.make(len(net.blocks), mode="voltage" if mode == "voltage" else "prism", cr=crs,
                             exact_rows=ExactRows.from_meta(meta.get("exact_rows")), **knobs)
        gen = meta.get("generate")
        if op == "generate":
            if not isinstance(gen, dict) or set(gen) != set(GenerateOptions.__dataclass_fields__):
                raise ValueError("request: generate options missing or malformed")
            gen = GenerateOptions(**gen)
        else:
            gen = None
        return cls(op, cfg, mode, tuple(tuple(r) for r in ranges), batch, tuple(outputs), gen)


def plan(net: Network, inputs: dict, *, devices: int, mode: str = "prism", cr=1, device_weights=None,
         wire_dtype: str = "fp32", compression_point: str = "attn_input", mean_weighting: str = "count",
         exact_rows: ExactRows = ExactRows(), outputs=("rows", "cls"),
         generate: GenerateOptions | None = None) -> Request:
    """Check a request on rank 0, before anything is sent: every error here
    names the argument and leaves the devices untouched. ``exact_rows`` is
    resolved (:meth:`prism_ext.api.PrismModel.exact_rows`); it applies in prism mode."""
    batch, n = net.check_inputs(inputs)
    devices = check_count(devices, "devices")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    outputs = tuple(outputs)
    if not outputs or not set(outputs) <= set(OUTPUTS):
        raise ValueError(f"outputs: expected a non-empty subset of {', '.join(OUTPUTS)}, got {outputs!r}")
    check_wire_dtype(wire_dtype)
    engine_mode = "voltage" if mode == "voltage" else "prism"
    cfg = RunConfig.make(len(net.blocks), mode=engine_mode, cr=cr if mode in ("prism", "voltage") else 1,
                         wire_dtype=wire_dtype, compression_point=compression_point, mean_weighting=mean_weighting,
                         exact_rows=exact_rows if mode == "prism" else ExactRows())
    if mode == "single":
        devices = 1
    if mode == "tp":
        from .tensor_parallel import check_tp_devices

        devices = check_tp_devices(devices, net.heads)
        if device_weights is not None and devices > 1:
            raise ValueError("device_weights: mode 'tp' splits heads and MLP columns evenly; pass None")
        if wire_dtype != "fp32":
            raise ValueError(f"wire_dtype: mode 'tp' all-reduces in fp32 only, got {wire_dtype!r}")
        ranges = ((0, n),) * devices  # every device sees every position
    else:
        if devices > n:
            raise ValueError(f"devices: {devices} devices need at least {devices} positions, the input has {n}")
        part = partition(n, devices, device_weights if devices > 1 else None)
        warn_if_coarse(part, mode, cfg.crs)
        ranges = part.ranges
    if generate is not None and mode not in ("prism", "single"):
        raise ValueError(f"mode: generation runs in prism or single mode, not {mode!r}")
    return Request("generate" if generate is not None else "forward", cfg, mode, ranges, batch, outputs, generate)


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
        from .tensor_parallel import tp_request

        return tp_request(net, local, request.ranges[0][1], rank, transport, request.outputs)
    part = request.partition
    if request.op == "generate":
        return generate_request(net, local, part, rank, transport, request.cfg, request.generate, on_token)
    return run_request(net, local, part, rank, transport, request.cfg, request.outputs)


def run_stats(request: Request, collected: Collected) -> RunStats:
    return RunStats(request.mode, request.cfg.crs, request.cfg.wire_dtype, request.partition, collected.devices)


def simulate(net: Network, inputs: dict, request: Request, on_token=None) -> Collected:
    """Run ``request`` on in-process devices (threads taking turns, see
    :mod:`prism_ext.comm.local`), each from the bytes it would have received.
    A streamed generation needs one device here (the in-process transport
    has no point-to-point send) or a live cluster."""
    devices = len(request.ranges)
    if request.generate is not None and request.generate.stream and devices > 1:
        raise ValueError("stream: a streamed generation over several devices needs a live cluster "
                         "(prism_ext.runtime.cluster)")
    blobs = [encode_request(request, local_inputs(net, inputs, request, r)) for r in range(devices)]

    def device(rank: int):
        def program(transport):
            req, local = decode_request(blobs[rank], net, rank, devices)
            return run(net, req, local, rank, transport, on_token if rank == 0 else None)
        return program

    return count_inputs(LocalGroup(devices).run([device(r) for r in range(devices)])[0], blobs)


def count_inputs(collected: Collected, blobs: list[bytes]) -> Collected:
    """Record what each device received (rank 0's own request never travels)."""
    for r in range(1, len(blobs)):
        collected.devices[r].input_bytes = len(blobs[r])
    return collected
