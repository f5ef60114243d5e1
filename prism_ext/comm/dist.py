"""Transport over torch.distributed (gloo): devices are processes, on this
machine (loopback) or on other boards (TCP). Same interface as
:class:`prism_ext.comm.local.LocalTransport`.

What another rank sends is untrusted: sizes are checked against a bound
before anything is allocated, and every frame goes through :mod:`.wire`'s
checked decoder, whose errors name the sending rank. Nothing is pickled:
blobs travel as uint8 tensors after their sizes (int64) are exchanged.

``bytes_sent`` (in :class:`Gathered`) is what this rank serialised, the
engine's accounting; ``wire_bytes`` adds up what this rank handed to gloo
for the exchanges, once per peer, size words included: what left it on the
network. Control frames (:data:`CONTROL_TAG`, the runtime's signed requests
and heartbeats) travel on a tag of their own, so they never mix with an
exchange's frames, and are counted in ``control_bytes``.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from .wire import Gathered, GatheredTo, Pending, Reduced, WireError, check_wire_dtype, decode, decode_message, encode

__all__ = ["CONTROL_TAG", "DistTransport", "TaskThread"]

_SIZE = torch.int64
CONTROL_TAG = 0x7072  # gloo point-to-point tag of control frames; the exchanges use tag 0


def _as_tensor(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


class TaskThread:
    """One long-lived daemon thread that runs the functions handed to it, in
    order. Used for the gloo transfers (gloo releases the GIL, so the
    caller computes meanwhile) and for rank 0's part of each request (the
    caller's thread stays free for Ctrl-C). Long-lived so per-thread state
    (torch's intra-op pool) is made once."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._queue.get()
            if fn is None:
                return
            try:
                with torch.no_grad():  # grad mode is per thread
                    box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                box["error"] = exc
            finally:
                done.set()

    def submit(self, fn) -> tuple[dict, threading.Event]:
        """Queue ``fn``; ``done`` is set once ``box`` holds its result or error."""
        box: dict = {}
        done = threading.Event()
        self._queue.put((fn, box, done))
        return box, done

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after what it is running (a thread that used torch
        must not outlive the interpreter's shutdown)."""
        self._queue.put((None, None, None))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class DistTransport:
    """Rank ``rank`` of the default process group (``dist.init_process_group``
    done by :mod:`prism_ext.runtime`). ``timeout``: seconds any one gloo
    operation may take (the runtime sets its exchange timeout once formed)."""

    def __init__(self, rank: int, size: int, *, max_frame_bytes: int = 1 << 30, timeout: float = 120.0):
        self.rank = rank
        self.size = size
        self.max_frame_bytes = max_frame_bytes
        self.timeout = timeout
        self.wire_bytes = 0
        self.control_bytes = 0
        self._background = TaskThread("prism-exchange")

    def close(self, timeout: float = 10.0) -> None:
        self._background.stop(timeout)

    def _wait(self, *works) -> None:
        """Wait for gloo operations, each for at most ``timeout`` seconds.
        Always with an explicit limit: without one gloo waits for the limit
        its group was formed with (the start-up timeout), not the exchange's."""
        limit = datetime.timedelta(seconds=self.timeout)
        for w in works:
            w.wait(limit)

    def _sizes(self, n: int) -> list[int]:
        """Every rank's frame size (an all-gather of one int64 each), bounded."""
        mine = torch.tensor([n], dtype=_SIZE)
        sizes = [torch.empty(1, dtype=_SIZE) for _ in range(self.size)]
        self._wait(dist.all_gather(sizes, mine, async_op=True))
        self.wire_bytes += 8 * (self.size - 1)
        return [self._bounded(q, int(s[0])) for q, s in enumerate(sizes)]

    def _bounded(self, q: int, n: int) -> int:
        if not 0 <= n <= self.max_frame_bytes:
            raise WireError(f"rank {q}: announced a frame of {n} bytes (allowed: 0..{self.max_frame_bytes})")
        return n

    def _exchange(self, blob: bytes) -> list[torch.Tensor | None]:
        """Send ``blob`` to every other rank and receive theirs, directly (one
        hop, no padding); returns every rank's bytes, own slot None."""
        sizes = self._sizes(len(blob))
        mine = _as_tensor(blob)
        bufs: list[torch.Tensor | None] = [None] * self.size
        works = []
        for q in range(self.size):
            if q == self.rank:
                continue
            bufs[q] = torch.empty(sizes[q], dtype=torch.uint8)
            works.append(dist.isend(mine, q))
            works.append(dist.irecv(bufs[q], q))
        self._wait(*works)
        self.wire_bytes += len(blob) * (self.size - 1)
        return bufs

    def all_gather(self, tensors: dict, wire_dtype: str = "fp32") -> Gathered:
        """Send ``tensors`` to every device, receive every device's (own included)."""
        return self.all_gather_start(tensors, wire_dtype).wait()

    def all_gather_start(self, tensors: dict, wire_dtype: str = "fp32") -> Pending:
        """Encode now and move the bytes on this transport's background
        thread, so the caller computes while they travel; ``wait()`` decodes."""
        check_wire_dtype(wire_dtype)
        t0 = time.perf_counter()
        blob, sizes = encode(tensors, wire_dtype)
        encoded = time.perf_counter() - t0
        box, done = self._background.submit(lambda: self._exchange(blob))

        def finish() -> Gathered:
            done.wait()
            if "error" in box:
                raise box["error"]
            t = time.perf_counter()
            items = [decode(blob, sender=q) if b is None else decode(b.numpy(), sender=q)
                     for q, b in enumerate(box["result"])]
            return Gathered(items=items, bytes_sent=len(blob), tensor_bytes=sizes,
                            seconds=encoded + time.perf_counter() - t)

        return Pending(finish)

    def exchange_meta(self, meta: dict) -> list[dict]:
        """Every rank's ``meta`` (a small JSON object), own included."""
        blob = encode({}, "fp32", meta=meta)[0]
        bufs = self._exchange(blob)
        return [meta if b is None else decode_message(b.numpy(), sender=q)[0] for q, b in enumerate(bufs)]

    def send(self, tensors: dict, meta: dict, dst: int) -> int:
        """Send one frame (``tensors`` at fp32 and ``meta``) to rank ``dst``
        alone; returns its size in bytes."""
        return self._send_frame(encode(tensors, "fp32", meta=meta)[0], dst)

    def _send_frame(self, blob: bytes, dst: int) -> int:
        self._wait(dist.isend(torch.tensor([len(blob)], dtype=_SIZE), dst))
        self._wait(dist.isend(_as_tensor(blob), dst))
        self.wire_bytes += 8 + len(blob)
        return len(blob)

    def _receive_frame(self, src: int) -> torch.Tensor:
        size = torch.empty(1, dtype=_SIZE)
        self._wait(dist.irecv(size, src))
        buf = torch.empty(self._bounded(src, int(size[0])), dtype=torch.uint8)
        self._wait(dist.irecv(buf, src))
        return buf

    def send_control(self, blob: bytes, dst: int, *, wait: bool = True) -> list:
        """Send one control frame to ``dst`` on :data:`CONTROL_TAG`. With
        ``wait=False`` the sends are only started: returns them (each holds
        its tensor until it completes), for the caller to check later."""
        works = [dist.isend(torch.tensor([len(blob)], dtype=_SIZE), dst, tag=CONTROL_TAG),
                 dist.isend(_as_tensor(blob), dst, tag=CONTROL_TAG)]
        self.control_bytes += 8 + len(blob)
        if wait:
            self._wait(*works)
        return works

    def receive_control(self, src: int, limit: int, timeout: float) -> bytes:
        """The next control frame from ``src``: at most ``limit`` bytes,
        checked before anything is allocated; waits up to ``timeout`` seconds
        for each part (gloo then closes the pair: a timeout ends the link)."""
        delta = datetime.timedelta(seconds=timeout)
        size = torch.empty(1, dtype=_SIZE)
        dist.irecv(size, src, tag=CONTROL_TAG).wait(delta)
        n = int(size[0])
        if not 0 <= n <= limit:
            raise WireError(f"rank {src}: announced a control frame of {n} bytes (allowed: 0..{limit})")
        buf = torch.empty(n, dtype=torch.uint8)
        dist.irecv(buf, src, tag=CONTROL_TAG).wait(delta)
        return buf.numpy().tobytes()

    def recv(self, src: int) -> tuple[dict, dict, int]:
        """The next frame rank ``src`` sent with :meth:`send`: (meta, tensors, bytes)."""
        buf = self._receive_frame(src)
        meta, tensors = decode_message(buf.numpy(), sender=src)
        return meta, tensors, buf.numel()

    def gather(self, tensors: dict, meta: dict, dst: int = 0) -> GatheredTo:
        """Send ``tensors`` (fp32) and ``meta`` to rank ``dst``; there, every
        rank's (meta, tensors) in rank order (its own as given)."""
        t0 = time.perf_counter()
        if self.rank != dst:
            blob = encode(tensors, "fp32", meta=meta)[0]
            t1 = time.perf_counter()
            self._send_frame(blob, dst)
            return GatheredTo(None, len(blob), t1 - t0)
        items, received, seconds = [], [], 0.0
        for q in range(self.size):
            if q == dst:
                items.append((meta, tensors))
                received.append(0)
                continue
            buf = self._receive_frame(q)
            t = time.perf_counter()
            items.append(decode_message(buf.numpy(), sender=q))
            seconds += time.perf_counter() - t
            received.append(buf.numel())
        return GatheredTo(items, 0, seconds, received)

    def all_reduce(self, tensor: torch.Tensor) -> Reduced:
        """Sum ``tensor`` (fp32) over every rank with gloo's all-reduce.
        ``bytes_sent`` is what a ring all-reduce puts on the wire per rank,
        2 (P - 1) / P of the tensor's bytes (gloo picks its algorithm by size;
        the ring is the bandwidth-optimal one it uses for large tensors)."""
        out = tensor.detach().to(torch.float32).contiguous().clone()
        self._wait(dist.all_reduce(out, async_op=True))
        nbytes = 2 * (self.size - 1) * out.numel() * 4 // self.size
        self.wire_bytes += nbytes
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
            raise WireError("all_reduce: a peer contributed non-finite values")
        return Reduced(out, nbytes, 0.0)
