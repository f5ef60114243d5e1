"""In-process transport: P simulated devices in one process.

Each device runs its own straight-line program on its own thread, but only
one device runs at a time: a device holds the baton until it calls
``all_gather`` or ``all_reduce`` (or returns), then passes it to the next
rank. Point-to-point frames hand the baton directly: a device waiting in
``recv`` gives it to the sender, and a ``send`` to a device waiting for it
lets that device run (a token stream is consumed as it is produced). The devices' work is therefore serial, so the wall time each one
measures is its own, and the program a device runs is the one it would run
over a real network. Everything exchanged goes through :mod:`.wire`, so the
bytes are real (an all-reduce counts those of a ring, see its docstring).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Sequence

import torch

from .wire import (Gathered, GatheredTo, Pending, Reduced, check_wire_dtype, decode, decode_message, encode,
                   ring_all_reduce_bytes)

__all__ = ["LocalGroup", "LocalTransport", "GroupAborted"]


class GroupAborted(RuntimeError):
    """Raised in the other devices when one device of the group failed."""


class LocalGroup:
    """A group of ``size`` in-process devices; ``run`` executes one function per device."""

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected an int >= 1, got {size!r}")
        self.size = size
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False] * size
        self._round = [0] * size  # next all-gather round of each rank
        self._slots: dict[int, list[bytes | None]] = {}
        self._readers: dict[int, int] = {}
        self._mail: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)
        self._awaiting: dict[int, int] = {}  # rank -> the rank whose frame it waits for in recv
        self._error: BaseException | None = None

    def run(self, fns: Sequence[Callable[["LocalTransport"], Any]]) -> list[Any]:
        """Run ``fns[rank](transport)`` for every rank; returns their results in rank order."""
        if len(fns) != self.size:
            raise ValueError(f"fns: expected {self.size} functions (one per rank), got {len(fns)}")
        results: list[Any] = [None] * self.size
        threads = [threading.Thread(target=self._worker, args=(r, fns[r], results), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._error is not None:
            raise self._error
        return results

    def _worker(self, rank: int, fn, results: list) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == rank or self._error is not None)
            if self._error is not None:
                self._done[rank] = True
                return
        try:
            results[rank] = fn(LocalTransport(self, rank))
        except GroupAborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by run()
            with self._cond:
                if self._error is None:
                    self._error = exc
        finally:
            with self._cond:
                self._done[rank] = True
                self._pass_baton(rank)
                self._cond.notify_all()

    def _pass_baton(self, rank: int) -> None:
        for step in range(1, self.size + 1):
            nxt = (rank + step) % self.size
            if not self._done[nxt]:
                self._turn = nxt
                return

    def _exchange(self, rank: int, blob: bytes) -> list[bytes]:
        with self._cond:
            rnd = self._round[rank]
            self._round[rank] += 1
            slots = self._slots.setdefault(rnd, [None] * self.size)
            slots[rank] = blob
            self._pass_baton(rank)
            self._cond.notify_all()

            def ready() -> bool:
                if self._error is not None:
                    return True
                if any(self._done[r] and slots[r] is None for r in range(self.size)):
                    self._error = RuntimeError(f"all_gather round {rnd}: a device returned without joining it")
                    self._cond.notify_all()
                    return True
                return all(s is not None for s in slots) and self._turn == rank

            self._cond.wait_for(ready)
            if self._error is not None:
                raise GroupAborted("another device failed") from None
            self._readers[rnd] = self._readers.get(rnd, 0) + 1
            if self._readers[rnd] == self.size:
                del self._slots[rnd], self._readers[rnd]
            return list(slots)  # type: ignore[arg-type]


    def _post(self, src: int, dst: int, blob: bytes) -> None:
        """Queue a frame from ``src`` to ``dst``; if ``dst`` is waiting for
        it, let ``dst`` run now and go on once it hands the baton back."""
        with self._cond:
            self._mail[(src, dst)].append(blob)
            if self._awaiting.get(dst) != src:
                return
            self._turn = dst
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == src or self._error is not None)
            if self._error is not None:
                raise GroupAborted("another device failed") from None

    def _take(self, rank: int, src: int) -> bytes:
        """The next frame ``src`` sent to ``rank``; while there is none,
        ``src`` runs (it holds the baton until it sends)."""
        with self._cond:
            box = self._mail[(src, rank)]
            if not box:
                self._awaiting[rank] = src
                if not self._done[src]:
                    self._turn = src
                self._cond.notify_all()
                self._cond.wait_for(lambda: (box and self._turn == rank) or self._error is not None
                                    or (self._done[src] and not box))
                del self._awaiting[rank]
                if self._error is not None:
                    raise GroupAborted("another device failed") from None
                if not box:
                    raise RuntimeError(f"recv: rank {src} returned without sending what rank {rank} waits for")
            return box.popleft()


class LocalTransport:
    """Device ``rank``'s end of a :class:`LocalGroup`."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group = group
        self.rank = rank
        self.size = group.size

    def all_gather(self, tensors: dict, wire_dtype: str = "fp32") -> Gathered:
        """Send ``tensors`` to every device, receive every device's (own included)."""
        check_wire_dtype(wire_dtype)
        t0 = time.perf_counter()
        blob, sizes = encode(tensors, wire_dtype)
        t1 = time.perf_counter()
        blobs = self.group._exchange(self.rank, blob)
        t2 = time.perf_counter()
        items = [decode(b, sender=q) for q, b in enumerate(blobs)]  # errors name the sending rank
        t3 = time.perf_counter()
        return Gathered(items=items, bytes_sent=len(blob), tensor_bytes=sizes, seconds=(t1 - t0) + (t3 - t2))

    def all_gather_start(self, tensors: dict, wire_dtype: str = "fp32") -> "Pending":
        """:meth:`all_gather` in two halves (the real transport overlaps the
        transfer with the caller's compute). Simulated devices take turns, so
        here the whole exchange happens in ``wait()``."""
        check_wire_dtype(wire_dtype)
        return Pending(lambda: self.all_gather(tensors, wire_dtype))

    def gather(self, tensors: dict, meta: dict, dst: int = 0) -> GatheredTo:
        """Send ``tensors`` (fp32) and ``meta`` to rank ``dst``; there, every
        rank's (meta, tensors) in rank order (its own as given, not encoded)."""
        t0 = time.perf_counter()
        blob = b"" if self.rank == dst else encode(tensors, "fp32", meta=meta)[0]
        t1 = time.perf_counter()
        blobs = self.group._exchange(self.rank, blob)
        t2 = time.perf_counter()
        if self.rank != dst:
            return GatheredTo(None, len(blob), t1 - t0)
        items = [(meta, tensors) if q == dst else decode_message(b, sender=q) for q, b in enumerate(blobs)]
        return GatheredTo(items, 0, (t1 - t0) + (time.perf_counter() - t2), [len(b) for b in blobs])

    def send(self, tensors: dict, meta: dict, dst: int) -> int:
        """Send one frame (``tensors`` at fp32 and ``meta``) to rank ``dst``
        alone; returns its size in bytes."""
        blob = encode(tensors, "fp32", meta=meta)[0]
        self.group._post(self.rank, dst, blob)
        return len(blob)

    def recv(self, src: int) -> tuple[dict, dict, int]:
        """The next frame rank ``src`` sent with :meth:`send`: (meta, tensors, bytes)."""
        blob = self.group._take(self.rank, src)
        meta, tensors = decode_message(blob, sender=src)
        return meta, tensors, len(blob)

    def all_reduce(self, tensor: torch.Tensor) -> Reduced:
        """Sum an fp32 ``tensor`` over all devices; every device gets the sum.

        Built on the all-gather exchange: each device sends its tensor (fp32
        on the wire) and adds all of them up in rank order, so the result is
        bit-identical on every device. ``bytes_sent`` is a ring all-reduce's,
        what the real (gloo) transport sends, not the in-process blob's."""
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"tensor: expected a float32 torch.Tensor, got {kind}")
        got = self.all_gather({"t": tensor}, "fp32")
        t0 = time.perf_counter()
        parts = [item["t"] for item in got.items]
        for q, part in enumerate(parts):
            if part.shape != tensor.shape:
                raise ValueError(f"tensor: shape {tuple(tensor.shape)} on rank {self.rank}, "
                                 f"{tuple(part.shape)} on rank {q}")
        total = parts[0]  # a fresh decoded copy: safe to add into
        for part in parts[1:]:
            total += part
        seconds = got.seconds + time.perf_counter() - t0
        return Reduced(total, ring_all_reduce_bytes(got.tensor_bytes["t"], self.size), seconds)
