"""``prism serve``: an HTTP inference server over a live PRISM cluster.

The cluster (:mod:`prism_ext.runtime`) loads the model once on every device
and stays up; this module puts an HTTP API in front of it, in the shapes
OpenAI clients already speak (docs/serve.md):

- ``POST /v1/completions`` (GPT-2; ``stream: true`` sends server-sent events
  token by token: the last device streams each token to rank 0 as it decodes),
- ``POST /v1/embeddings`` (mean pooling over valid tokens, computed where the
  rows are: every device sends its sum and count, not its rows),
- ``POST /v1/classify`` (text, or image files as multipart/form-data for ViT),
- ``GET /v1/models``, ``GET /health`` (every rank alive), ``GET /metrics``
  (Prometheus text format).

One thread (the dispatcher) owns the cluster: requests wait in one queue in
arrival order; consecutive embedding or classification requests with the
same settings and similar lengths are padded into one cluster call (dynamic
batching, ``max_batch`` sequences, a short wait window). A lost rank turns
into 503 errors naming it while the dispatcher forms the cluster again
(local workers are started anew; remote ones must be restarted by their
operator). Every response carries the PRISM stats of its cluster call.

Text -> token ids and image file -> pixels happen in :func:`encode_text`,
:func:`decode_tokens` and :func:`image_pixels` only.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import hmac
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field

import prometheus_client as prom
import pydantic
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ._version import __version__
from .api import PrismModel
from .method.engine import GenerateOptions
from .jobs import class_output, stats_dict
from .checks import check_count, check_number
from .options import MODES, RunOptions
from .executor.request import plan
from .runtime import DEFAULT_TIMEOUT, Cluster, ClusterError
from .runtime import first_line as _failure

__all__ = ["ServeOptions", "Backend", "create_app", "run_server", "encode_text", "decode_tokens", "image_pixels",
           "KNOBS"]

# The per-request knobs: every run option the server does not set itself (a
# field added to RunOptions is a knob here as it is). cr and mode are fields
# of every request, within the operator's limits.
_SET_BY_SERVER = {"mode", "cr", "device_weights", "outputs"}
KNOBS = tuple(name for name in RunOptions.fields() if name not in _SET_BY_SERVER)


@dataclass
class ServeOptions:
    """What the operator sets (``prism serve`` flags); requests may choose
    ``cr`` in [1, max_cr], a mode of ``modes`` and the knobs in ``knobs``."""

    model: str
    devices: int | None = 2
    master: str | None = None
    world: int | None = None
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    threads: int | None = None
    ifname: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cr: int | list[int] = 4
    mode: str = "prism"
    max_cr: int = 128
    modes: tuple[str, ...] = MODES
    knobs: tuple[str, ...] = KNOBS
    max_batch: int = 8
    batch_wait: float = 0.005  # seconds the dispatcher waits for more requests to batch
    max_tokens: int = 256
    max_inputs: int = 32
    max_body: int = 1 << 20
    body_timeout: float = 30.0  # seconds a request body may take to arrive, whatever its framing
    max_queue: int = 64
    max_image_pixels: int = 4096 * 4096
    drain_timeout: float = 30.0
    quiet: bool = False

    def check(self) -> None:
        for name in ("max_cr", "max_batch", "max_tokens", "max_inputs", "max_body", "max_queue", "max_image_pixels"):
            check_count(getattr(self, name), name)
        if check_number(self.body_timeout, "body_timeout", 0, 3600) == 0:
            raise ValueError("body_timeout: must be > 0 seconds")
        check_number(self.batch_wait, "batch_wait", 0, 10)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes: expected some of {', '.join(MODES)}, got {', '.join(self.modes) or 'none'}")
        if self.mode not in self.modes:
            raise ValueError(f"mode: the default mode {self.mode!r} must be one of the allowed modes "
                             f"({', '.join(self.modes)})")
        bad = [k for k in self.knobs if k not in KNOBS]
        if bad:
            raise ValueError(f"knobs: {', '.join(bad)} is not a knob (knobs: {', '.join(KNOBS)})")
        crs = self.cr if isinstance(self.cr, list) else [self.cr]
        if any(c > self.max_cr for c in crs):
            raise ValueError(f"cr: the default {self.cr} exceeds max_cr {self.max_cr}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: must not be empty")


class ApiError(Exception):
    """An error response: HTTP ``status``, a message and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             405: "invalid_request_error", 408: "invalid_request_error",
                             413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status, headers=self.headers)


_LEADING_NAME = re.compile(r"^([A-Za-z_][\w.\[\]]*):")


def _user_error(exc: Exception, rename: dict[str, str]) -> ApiError:
    """A prism_ext ValueError/TypeError ("name: what is wrong") as a 400
    naming the request field (``rename`` maps engine names to fields)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = _LEADING_NAME.match(message)
    name = m.group(1) if m else None
    param = rename.get(name, name)
    if m and param != name:
        message = f"{param}: {message[m.end():].strip()}"
    return ApiError(400, message, param)


# ---------------------------------------------------------------- inputs

def encode_text(model: PrismModel, text: str) -> list[int]:
    """Text -> token ids as transformers makes them (special tokens added:
    [CLS] ... [SEP] for encoders, none for GPT-2)."""
    return model.tokenizer.encode(text)


def decode_tokens(model: PrismModel, ids: list[int]) -> str:
    return model.tokenizer.decode(ids)


def image_pixels(model: PrismModel, data: bytes, field_name: str, max_pixels: int) -> torch.Tensor:
    """One uploaded image file (any format Pillow reads) -> pixel_values [1, C, H, W];
    the pixel limit is checked from the header, before anything is decoded."""
    from .inputs.images import check_image

    try:
        check_image(data, max_pixels=max_pixels)  # the server's own limit, from the header
        return model.image_processor.to_pixels(data)
    except ValueError as exc:
        raise ApiError(400, f"{field_name}: {str(exc).removeprefix('image: ')}", field_name) from None


# -------------------------------------------------------- request bodies

class _Settings(pydantic.BaseModel):
    """The fields every inference request may carry besides its input; other
    fields are knobs (checked against the operator's list) or errors."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    model: str | None = None
    cr: int | list[int] | None = None
    mode: str | None = None


class CompletionRequest(_Settings):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class EmbeddingRequest(_Settings):
    input: str | list[str]
    encoding_format: str = "float"


class ClassifyRequest(_Settings):
    input: str | list[str]


def _parse(kind: type[_Settings], body: dict) -> _Settings:
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object", "body")
    try:
        return kind.model_validate(body)
    except pydantic.ValidationError as exc:
        # the most specific error: a union's member with an index (input[1]) over the union as a whole
        err = max(exc.errors(), key=lambda e: sum(isinstance(i, int) for i in e.get("loc") or ()))
        loc = err.get("loc") or ()
        param = str(loc[0]) if loc else "body"
        param += "".join(f"[{i}]" for i in loc[1:] if isinstance(i, int))
        raise ApiError(400, f"{param}: {err.get('msg', 'invalid')}", param) from None


# ------------------------------------------------------------------ jobs

@dataclass
class Job:
    """One request as the dispatcher sees it."""

    endpoint: str  # "completions", "embeddings", "classify"
    inputs: list  # token id lists (text) or pixel tensors [1, C, H, W] (images)
    settings: RunOptions  # cr, mode and knobs
    options: dict = field(default_factory=dict)  # generation options
    on_token: object = None  # streaming callback (rank 0's request thread); returning False ends the generation
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when its client is gone
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self):
        """Requests with the same key can share one cluster call."""
        if self.endpoint == "completions":
            return None
        return (self.endpoint, json.dumps(self.settings.to_meta(), sort_keys=True))

    @property
    def lengths(self) -> list[int]:
        return [len(x) if isinstance(x, list) else 0 for x in self.inputs]


def _similar(lengths: list[int]) -> bool:
    """Lengths close enough to pad to the longest (at most a quarter, or 4 positions, of padding)."""
    return max(lengths) - min(lengths) <= max(4, max(lengths) // 4)


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, backend: "Backend"):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("prism_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.latency = prom.Histogram("prism_request_seconds", "Request latency (to the last byte for streams)",
                                      ["endpoint"], registry=r,
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.bytes_sent = prom.Histogram("prism_request_bytes_sent",
                                         "Bytes the devices exchanged for a request's cluster call", ["endpoint"],
                                         registry=r, buckets=tuple(4.0 ** k for k in range(4, 16)))
        self.tokens = prom.Counter("prism_generated_tokens", "Tokens generated by /v1/completions", registry=r)
        self.batch = prom.Histogram("prism_batch_requests", "Requests sharing one cluster call", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.reforms = prom.Counter("prism_cluster_reforms", "Times the cluster was formed again after a loss",
                                    registry=r)
        prom.Gauge("prism_queue_depth", "Requests waiting for the cluster", registry=r).set_function(
            lambda: len(backend.pending))
        prom.Gauge("prism_cluster_up", "1 while the cluster serves requests", registry=r).set_function(
            lambda: float(backend.down is None))


class Backend:
    """The cluster, its queue and the dispatcher thread that owns both."""

    def __init__(self, model: PrismModel, options: ServeOptions, name: str | None = None):
        options.check()
        self.model, self.options = model, options
        self.name = name or options.model
        self.cluster: Cluster | None = None
        self.down: str | None = "starting"  # why the cluster cannot serve now (None: it can)
        self.pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.metrics = _Metrics(self)
        self._say = (lambda msg: None) if options.quiet else (
            lambda msg: print(f"prism serve: {msg}", file=sys.stderr, flush=True))
        self.cluster = self._form()  # the first time, failures go to the caller
        self.down = None
        self._thread = threading.Thread(target=self._dispatch, name="prism-dispatcher", daemon=True)
        self._thread.start()

    @property
    def devices(self) -> int:
        o = self.options
        return o.world or o.devices

    def _form(self) -> Cluster:
        o = self.options
        kw = dict(token=o.token, timeout=o.timeout, ifname=o.ifname, quiet=o.quiet)
        if o.master is not None:
            return Cluster(self.model, master=o.master, world=o.world, threads=o.threads, **kw)
        # Rank 0 shares this machine with its workers: its share of the cores, as each worker gets.
        return Cluster(self.model, o.devices, threads=o.threads or max(1, (os.cpu_count() or 1) // o.devices), **kw)

    # ------------------------------------------------------------ queue

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cv:
            if self._stopping:
                raise ApiError(503, "server: shutting down; no new requests", headers={"Retry-After": "5"})
            if self.down is not None:
                raise _unavailable(self.down)
            if len(self.pending) >= self.options.max_queue:
                raise ApiError(429, f"queue: {len(self.pending)} requests are waiting (the server's limit); "
                                    f"retry later", headers={"Retry-After": "1"})
            self.pending.append(job)
            self._cv.notify_all()
        return job.future

    def _take(self) -> list[Job] | None:
        """The next cluster call's jobs: the oldest, and the requests right
        behind it that can share its call (same endpoint and settings,
        similar lengths, at most max_batch sequences), waiting up to
        batch_wait for more to arrive."""
        o = self.options
        with self._cv:
            if not self._cv.wait_for(lambda: self.pending or self._stopping, timeout=0.5) or not self.pending:
                return None
            batch = [self.pending.popleft()]
            key = batch[0].batch_key
            if key is None:
                return batch
            sequences = len(batch[0].inputs)
            lengths = batch[0].lengths
            deadline = time.monotonic() + o.batch_wait
            while sequences < o.max_batch:
                while self.pending and sequences < o.max_batch:
                    nxt = self.pending[0]
                    if nxt.batch_key != key or sequences + len(nxt.inputs) > o.max_batch \
                            or not _similar(lengths + nxt.lengths):
                        return batch  # arrival order: never jump over a request
                    batch.append(self.pending.popleft())
                    sequences += len(nxt.inputs)
                    lengths += nxt.lengths
                left = deadline - time.monotonic()
                if sequences >= o.max_batch or left <= 0 or self._stopping:
                    break
                self._cv.wait(left)
            return batch

    def _dispatch(self) -> None:
        """The dispatcher thread. Whatever ends it unexpectedly is named in
        ``down``, so /health and every request report it (503) instead of a
        server that stays up with nothing serving."""
        try:
            self._serve_queue()
        except BaseException as exc:  # noqa: BLE001 - the loop handles everything it can; this is the rest
            reason = f"server: the dispatcher thread died ({_failure(exc)}); restart the server"
            self._say(reason)
            with self._cv:
                self.down = reason
                queued = list(self.pending)
                self.pending.clear()
            for job in queued:
                if not job.future.done():
                    job.future.set_exception(ApiError(500, reason))

    def _serve_queue(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                with self._cv:
                    if self._stopping and not self.pending:
                        return
                try:
                    self._watch()
                except Exception as exc:  # noqa: BLE001 - a failed health check is a lost cluster
                    self._lost(f"cluster: health check failed ({_failure(exc)})")
                continue
            if self.down is not None:
                for job in batch:
                    job.future.set_exception(_unavailable(self.down))
                continue
            self.metrics.batch.observe(len(batch))
            try:
                if batch[0].endpoint == "completions":
                    self._generate(batch[0])
                else:
                    self._forward(batch)
            except ClusterError as exc:
                self._lost(str(exc))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(_unavailable(self.down))
            except (ValueError, TypeError) as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(_user_error(exc, _RENAME[job.endpoint]))
            except BaseException as exc:  # noqa: BLE001 - the dispatcher must outlive any one request
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ApiError(500, f"server: {_failure(exc)}"))

    # ------------------------------------------------------------ health

    def _lost(self, reason: str) -> None:
        """The cluster failed: refuse new requests and the queued ones with
        ``reason``; the dispatcher forms it again when idle."""
        c = self.cluster
        with self._cv:
            self.down = reason
            self.cluster = None
            queued = list(self.pending)
            self.pending.clear()
        self._say(f"cluster lost: {reason}")
        if c is not None:
            c.abort(reason)
        for job in queued:
            job.future.set_exception(_unavailable(reason))

    def _watch(self) -> None:
        """Between requests: find lost ranks, or form the cluster again.
        Any failed attempt is named and tried again (remote workers keep
        trying to join for their --join-timeout)."""
        if self._stopping:
            return
        if self.cluster is not None:
            lost = self.cluster.lost_ranks()
            if lost:
                self._lost(f"cluster: {lost[min(lost)]}")
            return
        self._say("forming the cluster again")
        try:
            c = self._form()
        except Exception as exc:  # noqa: BLE001 - every failed attempt is named, then tried again
            with self._cv:
                self.down = f"cluster: forming it again failed ({_failure(exc)}); trying again"
            self._say(f"not yet: {_failure(exc)}")
            with self._cv:  # a pause between attempts, cut short by close()
                self._cv.wait_for(lambda: self._stopping, 1.0)
            return
        with self._cv:
            if self._stopping:
                c.close()
                return
            self.cluster, self.down = c, None
        self.metrics.reforms.inc()
        self._say(f"cluster formed again ({self.devices} devices)")

    def health(self) -> dict:
        c = self.cluster
        if not self._thread.is_alive() and not self._stopping and self.down is None:
            self.down = "server: the dispatcher thread is not running; restart the server"
        if self.down is not None or c is None:
            return {"status": "unavailable", "reason": self.down, "devices": self.devices}
        lost = c.lost_ranks()
        ranks = [{"rank": r, "alive": r not in lost, **({"reason": lost[r]} if r in lost else {})}
                 for r in range(self.devices)]
        return {"status": "ok" if not lost else "unavailable", "devices": self.devices, "ranks": ranks,
                "queue": len(self.pending), **({"reason": lost[min(lost)]} if lost else {})}

    def close(self) -> None:
        """Drain: refuse new requests, finish the queued ones, then stop every device."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(self.options.drain_timeout)
        with self._cv:
            for job in self.pending:
                job.future.set_exception(ApiError(503, "server: shut down before this request ran"))
            self.pending.clear()
        c, self.cluster = self.cluster, None
        self.down = "server shut down"
        if c is not None:
            c.close()
        self._say("stopped; every device exited")

    # ------------------------------------------------------------ running

    def _forward(self, batch: list[Job]) -> None:
        c = self.cluster
        endpoint = batch[0].endpoint
        outputs = ("pooled",) if endpoint == "embeddings" else ("cls",)
        sequences = [x for job in batch for x in job.inputs]
        if isinstance(sequences[0], torch.Tensor):
            inputs = {"pixel_values": torch.cat(sequences)}
        else:
            n = max(len(s) for s in sequences)
            ids = torch.zeros(len(sequences), n, dtype=torch.long)
            mask = torch.zeros(len(sequences), n, dtype=torch.long)
            for i, s in enumerate(sequences):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            inputs = {"input_ids": ids}
            if not bool(mask.all()):
                inputs["attention_mask"] = mask
        t0 = time.monotonic()
        out = c.model(inputs, options=batch[0].settings.replace(outputs=outputs))
        seconds = time.monotonic() - t0
        rows = out["mean_pooled"] if endpoint == "embeddings" else out["logits"]
        stats = prism_stats(out.stats)
        stats["batch"] = {"requests": len(batch), "sequences": len(sequences),
                          "positions": int(next(iter(inputs.values())).shape[1]) if "input_ids" in inputs
                          else self.model.net.grid ** 2 + 1}
        start = 0
        for job in batch:
            k = len(job.inputs)
            self.metrics.bytes_sent.labels(f"/v1/{endpoint}").observe(out.stats.bytes_sent)
            job.future.set_result((rows[start:start + k].clone(), {
                **stats, "queue_seconds": round(t0 - job.arrived, 6), "cluster_seconds": round(seconds, 6)}))
            start += k

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left while it waited: nothing to generate for
            job.future.set_exception(ApiError(400, "client: disconnected before the generation started"))
            return
        c = self.cluster
        ids = torch.tensor([job.inputs[0]])
        t0 = time.monotonic()
        out, stats, decode = c.model.generate(ids, options=job.settings, return_stats=True, on_token=job.on_token,
                                        **job.options)
        seconds = time.monotonic() - t0
        new = out[0, ids.shape[1]:].tolist()
        self.metrics.bytes_sent.labels("/v1/completions").observe(stats.bytes_sent)
        self.metrics.tokens.inc(len(new))
        job.future.set_result((new, {**prism_stats(stats), "decode": {
            "tokens": len(new), "bytes_sent": sum(decode.bytes_sent), "flops": sum(decode.flops)},
            "queue_seconds": round(t0 - job.arrived, 6), "cluster_seconds": round(seconds, 6)}))


def _unavailable(reason: str) -> ApiError:
    return ApiError(503, f"cluster unavailable: {reason}; the server is forming it again, retry shortly",
                    headers={"Retry-After": "2"})


def prism_stats(stats) -> dict:
    """The PRISM costs of one cluster call (every response's ``prism`` field)."""
    per_device = stats_dict(stats)["devices"]
    crs = list(stats.crs)
    return {"devices": len(stats.devices), "mode": stats.mode, "cr": crs[0] if len(set(crs)) == 1 else crs,
            "wire_dtype": stats.wire_dtype, "partition": [list(r) for r in stats.partition.ranges],
            "bytes_sent": stats.bytes_sent, "activation_bytes": stats.activation_bytes,
            "input_bytes": stats.input_bytes, "result_bytes": stats.result_bytes,
            "busiest_device_flops": max(d["flops"] for d in per_device), "per_device": per_device}


# Engine argument names -> request fields, per endpoint (for 400s that name the field).
_INPUT = {"input_ids": "input", "inputs": "input", "text": "input", "devices": "input", "attention_mask": "input",
          "pixel_values": "image", "image": "image"}
_RENAME = {"completions": {**_INPUT, "input": "prompt", "input_ids": "prompt", "inputs": "prompt", "text": "prompt",
                           "devices": "prompt", "max_new_tokens": "max_tokens"},
           "embeddings": _INPUT, "classify": _INPUT}


# ------------------------------------------------------------- the API

class _Api:
    """Request handling between HTTP and the backend."""

    def __init__(self, backend: Backend):
        self.b = backend
        self.o = backend.options
        self.model = backend.model
        self.net = backend.model.net

    def settings(self, req: _Settings, endpoint: str) -> RunOptions:
        """cr, mode and knobs of a request, within the operator's limits."""
        o = self.o
        if req.model is not None and req.model != self.b.name:
            raise ApiError(404, f"model: {req.model!r} is not served here (this server serves {self.b.name!r})",
                           "model")
        cr = o.cr if req.cr is None else req.cr
        crs = cr if isinstance(cr, list) else [cr]
        if not crs or any(not 1 <= c <= o.max_cr for c in crs):
            raise ApiError(400, f"cr: every value must be in [1, {o.max_cr}] (the server's limit), got {cr}", "cr")
        mode = o.mode if req.mode is None else req.mode
        if mode not in o.modes:
            raise ApiError(400, f"mode: expected one of {', '.join(o.modes)} (allowed by the server), got {mode!r}",
                           "mode")
        knobs = {}
        for name, value in (req.model_extra or {}).items():
            if name not in KNOBS:
                raise ApiError(400, f"{name}: unknown field", name)
            if name not in o.knobs:
                raise ApiError(400, f"{name}: the server does not let requests set this knob "
                                    f"(allowed: {', '.join(o.knobs) or 'none'})", name)
            knobs[name] = value
        if endpoint == "completions" and mode not in ("prism", "single"):
            raise ApiError(400, f"mode: generation runs in prism or single mode, not {mode!r}", "mode")
        try:
            return RunOptions(cr=cr, mode=mode, **knobs)
        except (ValueError, TypeError) as exc:
            raise _user_error(exc, _RENAME[endpoint]) from None

    def check_plan(self, inputs: dict, settings: RunOptions, endpoint: str, where: str | None = None,
                   outputs=None) -> None:
        """Every check the cluster call would make, before the request queues
        (``where``: the input's field, ``input[1]`` for an item of a list)."""
        devices = 1 if settings.mode == "single" else self.b.devices
        rename = _RENAME[endpoint] if where is None else {**_RENAME[endpoint],
                                                          **{k: where for k, v in _RENAME[endpoint].items()
                                                             if v in ("input", "prompt")}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # coarse-partition warnings: the stats show the partition
                plan(self.net, inputs, settings if outputs is None else settings.replace(outputs=outputs),
                     devices=devices, special_ids=self.model.special_ids)
        except (ValueError, TypeError) as exc:
            raise _user_error(exc, rename) from None

    def texts(self, value, endpoint: str, room: int = 0) -> list[list[int]]:
        field_name = "prompt" if endpoint == "completions" else "input"
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ApiError(400, f"{field_name}: must not be empty", field_name)
        if len(items) > self.o.max_inputs:
            raise ApiError(400, f"{field_name}: {len(items)} inputs exceed the server's limit of {self.o.max_inputs}",
                           field_name)
        out = []
        for i, text in enumerate(items):
            where = _item(field_name, value, i)
            if not text:
                raise ApiError(400, f"{where}: must be a non-empty string", where)
            try:
                ids = encode_text(self.model, text)
            except (ValueError, TypeError) as exc:
                raise ApiError(400, f"{where}: {exc}", where) from None
            except (OSError, ImportError) as exc:  # the checkpoint has no usable tokenizer: not the client's fault
                raise ApiError(500, f"model: cannot encode text: {exc}", "model") from None
            limit = self.net.n_positions
            if len(ids) > limit:
                raise ApiError(400, f"{where}: {len(ids)} tokens exceed the model's {limit} positions", where)
            if len(ids) + room > limit:
                raise ApiError(400, f"max_tokens: {len(ids)} prompt tokens + {room} new tokens exceed the model's "
                                    f"{limit} positions; ask for at most {limit - len(ids)}", "max_tokens")
            if not ids:
                raise ApiError(400, f"{where}: encodes to no tokens", where)
            out.append(ids)
        return out

    def needs(self, endpoint: str) -> None:
        m = self.model
        if endpoint == "completions" and self.net.head != "lm":
            raise ApiError(400, f"model: /v1/completions needs a GPT-2 language model; {self.b.name!r} is "
                                f"{m.model_type} ({self.net.head} head)", "model")
        if endpoint == "embeddings" and m.model_type == "vit":
            raise ApiError(400, f"model: /v1/embeddings takes text; {self.b.name!r} is a ViT (use /v1/classify "
                                f"with an image)", "model")
        if endpoint == "classify" and self.net.head != "classification":
            raise ApiError(400, f"model: /v1/classify needs a classification head; {self.b.name!r} is "
                                f"{m.model_type} ({self.net.head} head)", "model")

    async def run(self, job: Job):
        return await asyncio.wrap_future(self.b.submit(job))


def _json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply", "body") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: not valid JSON ({exc})", "body") from None


async def _read_json(request: Request, o: ServeOptions):
    return await run_in_threadpool(_json, await _read_body(request, o))  # a 1 MiB body: off the event loop


async def _read_body(request: Request, o: ServeOptions) -> bytes:
    """The body, as read: at most ``max_body`` bytes whatever the framing
    (Content-Length, chunked, or both), within ``body_timeout`` seconds."""
    limit = o.max_body
    length = request.headers.get("content-length")
    if length is not None:  # announced too big: refused before reading (chunked framing is counted below)
        if not length.isdigit():
            raise ApiError(400, f"Content-Length: not a number: {length!r}", "Content-Length")
        if int(length) > limit:
            raise ApiError(413, f"body: {length} bytes exceed the server's limit of {limit}", "body")
    body = bytearray()
    try:
        async with asyncio.timeout(o.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"body: more than the server's limit of {limit} bytes", "body")
    except TimeoutError:
        raise ApiError(408, f"body: not received within {o.body_timeout:g} s (the server's limit)", "body") from None
    except ClientDisconnect:
        raise ApiError(400, "body: the client disconnected while sending it", "body") from None
    request._body = bytes(body)  # Starlette's cache of the body: request.form() parses these bytes
    return request._body


def _auth_ok(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


class _TextStream:
    """Generated tokens -> text, for streaming: whole UTF-8 characters only,
    nothing past a stop string (text that could begin one is held back)."""

    def __init__(self, model: PrismModel, stops: list[str]):
        self.model, self.stops = model, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = decode_tokens(self.model, self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._flush(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))  # an incomplete character decodes as U+FFFD for now
        for s in self.stops:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._flush(safe)

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


def create_app(backend: Backend) -> FastAPI:
    """The FastAPI application over ``backend`` (closing the app drains it)."""
    o = backend.options
    api = _Api(backend)
    metrics = backend.metrics
    app = FastAPI(title="prism serve", version=__version__,
                  description="PRISM distributed Transformer inference over a live cluster (docs/serve.md)")
    app.router.add_event_handler("shutdown", backend.close)
    routes = {"/v1/completions", "/v1/embeddings", "/v1/classify", "/v1/models", "/health", "/metrics"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.monotonic()
        path = request.url.path
        endpoint = path if path in routes else "other"
        if o.api_key is not None and path != "/health" and not _auth_ok(request, o.api_key):
            response = ApiError(401, "Authorization: a valid bearer token is required (Authorization: Bearer KEY)",
                                "Authorization", headers={"WWW-Authenticate": "Bearer"}).response()
        else:
            try:
                response = await call_next(request)
            except ApiError as exc:
                response = exc.response()
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        body = getattr(response, "body_iterator", None)
        if body is None:
            metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
            return response

        async def timed():  # to the last byte (a stream's last event), once
            try:
                async for chunk in body:
                    yield chunk
            finally:
                metrics.latency.labels(endpoint).observe(time.monotonic() - t0)

        response.body_iterator = timed()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug: still JSON, with its type
        return ApiError(500, f"server: {type(exc).__name__}: {exc}").response()

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return ApiError(404, f"path: no endpoint {request.url.path} (see /v1/models, docs/serve.md)", "path").response()

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return ApiError(405, f"method: {request.method} is not allowed on {request.url.path}", "method").response()

    @app.get("/health")
    async def health():
        state = await asyncio.get_running_loop().run_in_executor(None, backend.health)
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        m, net = backend.model, backend.model.net
        return {"object": "list", "data": [{
            "id": backend.name, "object": "model", "created": 0, "owned_by": "prism-ext",
            "prism": {"model_type": m.model_type, "head": net.head, "layers": len(net.blocks), "d": net.d,
                      "n_positions": net.n_positions, "devices": backend.devices,
                      "endpoints": [e for e in ("completions", "embeddings", "classify") if _serves(api, e)],
                      "defaults": {"cr": o.cr, "mode": o.mode},
                      "limits": {"max_cr": o.max_cr, "modes": list(o.modes), "knobs": list(o.knobs),
                                 "max_tokens": o.max_tokens, "max_inputs": o.max_inputs, "max_batch": o.max_batch,
                                 "max_body_bytes": o.max_body, "max_queue": o.max_queue}}}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _read_json(request, o))
        api.needs("completions")
        settings = api.settings(req, "completions")
        if not 1 <= req.max_tokens <= o.max_tokens:
            raise ApiError(400, f"max_tokens: must be in [1, {o.max_tokens}] (the server's limit), got "
                                f"{req.max_tokens}", "max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop")
        ids = (await run_in_threadpool(api.texts, req.prompt, "completions", req.max_tokens))[0]
        eos = backend.model.config.get("eos_token_id")
        eos = eos if isinstance(eos, int) and 0 <= eos < int(backend.model.config.get("vocab_size") or 0) else None
        options = {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_k": req.top_k,
                   "seed": req.seed, "eos_token_id": eos}
        try:
            GenerateOptions(**options)
        except (ValueError, TypeError) as exc:
            raise _user_error(exc, _RENAME["completions"]) from None
        if req.temperature > 0 and req.seed is None:
            options["seed"] = int.from_bytes(uuid.uuid4().bytes[:7], "little")  # sampled: a fresh seed, reported
        api.check_plan({"input_ids": torch.tensor([ids])}, settings, "completions")
        created = int(time.time())
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": cid, "object": "text_completion", "created": created, "model": backend.name}
        text = _TextStream(backend.model, stops)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_token(t: torch.Tensor) -> bool:  # rank 0's request thread, as each token arrives
            token = int(t[0])
            if eos is None or token != eos:
                piece = text.push(token)
                if piece and req.stream:
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
            # False ends the generation: its text is complete (a stop string), or its client is gone
            return not (text.stopped or cancelled.is_set())

        def finish_reason(new: list[int]) -> str:
            return "stop" if text.stopped or (eos is not None and new and new[-1] == eos) else "length"

        def body(new: list[int], prism: dict) -> dict:
            return {"usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                              "total_tokens": len(ids) + len(new)},
                    "prism": {**prism, "seed": options["seed"]}}

        # Tokens come one by one (and decoding can end early) when streaming or watching for a stop string.
        job = Job("completions", [ids], settings, options, on_token=on_token if req.stream or stops else None,
                  cancelled=cancelled)
        if not req.stream:
            new, prism = await api.run(job)
            if job.on_token is None:
                for t in new:
                    on_token(torch.tensor([t]))
            return {**head, "choices": [{"text": text.text, "index": 0, "logprobs": None,
                                         "finish_reason": finish_reason(new)}], **body(new, prism)}

        future = backend.submit(job)  # refused now (503, 429) rather than inside a 200 stream
        done = asyncio.wrap_future(future)

        def event(obj) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        async def stream():
            try:
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        if pieces.empty():
                            break
                        continue
                    yield event({**head, "choices": [{"text": getter.result(), "index": 0, "logprobs": None,
                                                      "finish_reason": None}]})
                try:
                    new, prism = done.result()
                except ApiError as exc:
                    yield event({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                           "code": exc.status}})
                    return
                yield event({**head, "choices": [{"text": text.finish(), "index": 0, "logprobs": None,
                                                  "finish_reason": finish_reason(new)}], **body(new, prism)})
                yield b"data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client gone mid-stream: the cluster stops generating for it

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = _parse(EmbeddingRequest, await _read_json(request, o))
        api.needs("embeddings")
        if req.encoding_format not in ("float", "base64"):
            raise ApiError(400, f"encoding_format: expected float or base64, got {req.encoding_format!r}",
                           "encoding_format")
        settings = api.settings(req, "embeddings")
        seqs = await run_in_threadpool(api.texts, req.input, "embeddings")
        for i, s in enumerate(seqs):
            api.check_plan({"input_ids": torch.tensor([s])}, settings, "embeddings", _item("input", req.input, i),
                           outputs=("pooled",))
        rows, prism = await api.run(Job("embeddings", seqs, settings))
        data = []
        for i, row in enumerate(rows):
            vec = row.to(torch.float32)
            emb = base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode() \
                if req.encoding_format == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(s) for s in seqs)
        return {"object": "list", "data": data, "model": backend.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "prism": prism}

    @app.post("/v1/classify")
    async def classify(request: Request):
        api.needs("classify")
        ctype = request.headers.get("content-type", "")
        if backend.model.model_type == "vit":
            if not ctype.startswith("multipart/form-data"):
                raise ApiError(400, "image: a ViT takes image files: send multipart/form-data with one or more "
                                    "`image` fields", "image")
            await _read_body(request, o)
            form = await request.form(max_files=o.max_inputs, max_fields=o.max_inputs)
            unknown = [k for k in form.keys() if k not in ("image", "model", "cr", "mode", *o.knobs)]
            if unknown:
                raise ApiError(400, f"{unknown[0]}: unknown field", unknown[0])
            files = form.getlist("image")
            if not files:
                raise ApiError(400, "image: no `image` file in the form", "image")
            fields = {k: _form_value(k, v) for k, v in form.multi_items() if k != "image"}
            req = _parse(_Settings, fields)
            settings = api.settings(req, "classify")
            inputs = []
            for i, f in enumerate(files):
                where = "image" if len(files) == 1 else f"image[{i}]"
                if isinstance(f, str):
                    raise ApiError(400, f"{where}: expected a file upload, got a text field", where)
                data = await f.read()
                inputs.append(await run_in_threadpool(image_pixels, backend.model, data, where, o.max_image_pixels))
            api.check_plan({"pixel_values": inputs[0]}, settings, "classify", outputs=("cls",))
        else:
            if ctype.startswith("multipart/form-data"):
                raise ApiError(400, f"image: {backend.model.model_type} takes text: send JSON with `input`", "image")
            req = _parse(ClassifyRequest, await _read_json(request, o))
            settings = api.settings(req, "classify")
            inputs = await run_in_threadpool(api.texts, req.input, "classify")
            for i, s in enumerate(inputs):
                api.check_plan({"input_ids": torch.tensor([s])}, settings, "classify", _item("input", req.input, i),
                               outputs=("cls",))
        logits, prism = await api.run(Job("classify", inputs, settings))
        data = [{"index": i, **class_output(backend.model, row.to(torch.float32))} for i, row in enumerate(logits)]
        return {"object": "list", "data": data, "model": backend.name, "prism": prism}

    return app


def _item(field_name: str, value, i: int) -> str:
    """How errors name item ``i`` of a field that is a string or a list of them."""
    return field_name if isinstance(value, str) else f"{field_name}[{i}]"


def _form_value(name: str, value):
    """A form field's text as the JSON value it stands for (cr=4 -> 4)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{name}: expected a text field, got a file", name)
    try:
        return json.loads(value)
    except ValueError:
        return value


def _serves(api: _Api, endpoint: str) -> bool:
    try:
        api.needs(endpoint)
    except ApiError:
        return False
    return True


def run_server(options: ServeOptions) -> int:
    """``prism serve``: form the cluster, serve HTTP until SIGINT/SIGTERM,
    then drain (in-flight requests finish, queued ones run) and stop every
    device. Returns the exit status."""
    import uvicorn

    from .jobs import load_model

    options.check()
    sock = _listen(options.host, options.port)  # first: a taken port is one line, with nothing started yet
    try:
        model = load_model(options.model)
        say = (lambda msg: None) if options.quiet else (lambda msg: print(f"prism serve: {msg}", file=sys.stderr,
                                                                          flush=True))
        say(f"starting {options.world or options.devices} devices for {model.model_type} ({options.model})")
        try:
            backend = Backend(model, options)
        except ClusterError as exc:
            print(f"prism serve: {exc}", file=sys.stderr)
            return 1
        app = create_app(backend)
        config = uvicorn.Config(app, log_level="warning" if options.quiet else "info",
                                timeout_graceful_shutdown=options.drain_timeout, lifespan="on")
        server = uvicorn.Server(config)
        say(f"serving {backend.name} on http://{options.host}:{options.port} ({backend.devices} devices)")
        try:
            server.run(sockets=[sock])  # on SIGINT/SIGTERM: drains, closes the backend, then ends by that signal
        finally:
            backend.close()
        return 0
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the cluster starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)  # SO_REUSEADDR, as uvicorn sets it
    except OSError as exc:
        raise OSError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
