"""The cluster, its queue and the dispatcher thread that owns both: requests
wait in arrival order; consecutive embedding or classification requests with
the same settings and similar lengths share one cluster call (dynamic
batching); a lost rank makes the cluster unavailable while it forms again.
Raises the domain errors of :mod:`prism_ext.serve.errors`."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from ..api import PrismModel
from ..options import RunOptions
from ..outputs import stats_dict
from ..runtime import Cluster, ClusterError
from ..runtime import first_line as _failure
from .errors import FIELDS, BadRequest, QueueFull, ServerFault, Unavailable, unavailable, user_error
from .metrics import Metrics
from .options import ServeOptions


@dataclass
class Job:
    """One request as the dispatcher sees it."""

    endpoint: str  # "completions", "embeddings", "classify"
    inputs: list  # token id lists (text; a completion's: its prompt once per sample) or pixel tensors [1, C, H, W]
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
        self.metrics = Metrics(lambda: len(self.pending), lambda: float(self.down is None))
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
                raise Unavailable("server: shutting down; no new requests", retry_after=5)
            if self.down is not None:
                raise unavailable(self.down)
            if len(self.pending) >= self.options.max_queue:
                raise QueueFull(f"queue: {len(self.pending)} requests are waiting (the server's limit); retry later",
                                retry_after=1)
            self.pending.append(job)
            self._cv.notify_all()
        return job.future

    async def result(self, job: Job):
        """Submit ``job`` and wait for its result (on the event loop, without blocking it)."""
        return await asyncio.wrap_future(self.submit(job))

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
                    job.future.set_exception(ServerFault(reason))

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
                    job.future.set_exception(unavailable(self.down))
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
                        job.future.set_exception(unavailable(self.down))
            except (ValueError, TypeError) as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(user_error(exc, FIELDS[job.endpoint]))
            except BaseException as exc:  # noqa: BLE001 - the dispatcher must outlive any one request
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ServerFault(f"server: {_failure(exc)}"))

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
            job.future.set_exception(unavailable(reason))

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
                job.future.set_exception(Unavailable("server: shut down before this request ran"))
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
        if endpoint == "embeddings":  # the checkpoint's sentence-transformers pipeline, as every caller gets it
            out = c.model.embed(inputs, options=batch[0].settings)
            rows = out["embeddings"]
        else:
            out = c.model(inputs, options=batch[0].settings.replace(outputs=("cls",)))
            rows = out["logits"]
        seconds = time.monotonic() - t0
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
            job.future.set_exception(BadRequest("client: disconnected before the generation started"))
            return
        c = self.cluster
        ids = torch.tensor(job.inputs)  # one prompt, once per sample (n rows of equal length)
        t0 = time.monotonic()
        out, stats, decode = c.model.generate(ids, options=job.settings, return_stats=True, on_token=job.on_token,
                                              **job.options)
        seconds = time.monotonic() - t0
        new = out[:, ids.shape[1]:].tolist()  # per row
        self.metrics.bytes_sent.labels("/v1/completions").observe(stats.bytes_sent)
        self.metrics.tokens.inc(sum(len(row) for row in new))
        job.future.set_result((new, {**prism_stats(stats), "decode": {
            "tokens": len(new[0]), "bytes_sent": sum(decode.bytes_sent), "flops": sum(decode.flops)},
            "queue_seconds": round(t0 - job.arrived, 6), "cluster_seconds": round(seconds, 6)}))


def prism_stats(stats) -> dict:
    """The PRISM costs of one cluster call (every response's ``prism`` field)."""
    per_device = stats_dict(stats)["devices"]
    crs = list(stats.crs)
    return {"devices": len(stats.devices), "mode": stats.mode, "cr": crs[0] if len(set(crs)) == 1 else crs,
            "wire_dtype": stats.wire_dtype, "partition": [list(r) for r in stats.partition.ranges],
            "bytes_sent": stats.bytes_sent, "activation_bytes": stats.activation_bytes,
            "input_bytes": stats.input_bytes, "result_bytes": stats.result_bytes,
            "busiest_device_flops": max(d["flops"] for d in per_device), "per_device": per_device}
