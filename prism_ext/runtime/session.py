"""What both ends of a cluster share: the errors, the rendezvous store and
the gloo group, the handshake (token, claims) and the signed control frames,
the calibration exchange. See :mod:`prism_ext.runtime`."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import kernels
from ..checks import check_count, check_number
from .._version import __version__
from ..api import PrismModel
from ..comm.dist import DistTransport
from ..options import RunOptions
from ..executor.request import Request


DEFAULT_TIMEOUT = 60.0


# Seconds a formation may take (workers start, load the model, connect): separate from the exchange
# timeout, so a short exchange timeout does not fail a start on a loaded machine.
DEFAULT_START_TIMEOUT = 120.0


DEFAULT_JOIN_TIMEOUT = 300.0  # seconds a `prism worker` keeps trying to join a coordinator


_TAG = 32  # bytes of an HMAC-SHA256 tag


HEARTBEAT = 0.5  # seconds between pings (rank 0) and heartbeats (workers)


STALE = 5.0  # seconds without a heartbeat after which lost_ranks() calls a worker lost (a loaded board can lag)


REPORTS = 2.0  # seconds rank 0 waits, after a failure, for the workers' error reports
EXIT_SETTLE = 2.0  # seconds rank 0 waits for a local worker whose link ended to show its exit status


# Rank 0's memory may grow this much while its rendezvous store is up (anyone who can reach the port
# can write to it); more ends the formation, and the store with what was written.
STORE_GROWTH = 256 << 20


CONTROL_FROM_WORKER = 4096  # largest control frame a worker sends (heartbeats, error reports)


CONTROL_FROM_RANK0 = (1 << 30) + 4096  # a request's inputs for one device, plus the frame's head


PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding prism_ext/


# The run options a rank may pin (torchrun: every rank has its own command line); what comes back is rank 0's affair.
_PINNED = tuple(name for name in RunOptions.fields() if name != "outputs")


# Control-plane operations (one byte on the wire, covered by the frame's MAC).
_OPS = ("session", "ping", "run", "calibrate", "close", "abort", "alive", "error", "closed")


_HEAD = struct.Struct("<BQ")  # op, sequence number


class ClusterError(RuntimeError):
    """The cluster failed; the message names the rank (lost, failed or refused)."""


class HandshakeError(ClusterError):
    """A rank failed authentication or does not match rank 0 (version, model, settings, world)."""


class NotFormed(ClusterError):
    """A formation attempt failed before any peer was authenticated (a worker may try again)."""


# A source location in a library's message ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "): of no
# use to a user, and it tells an outsider (an HTTP client shown a 503) what runs here.
_EXT = r"\.(?:c|cc|cpp|cxx|h|hpp|py)(?::\d+)?"
_SOURCE = re.compile(rf"\[[^\]\s]*{_EXT}\]\s*|[^\s()\[\]]*/[^\s()\[\]]*{_EXT}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = re.sub(r"\s{2,}", " ", _SOURCE.sub("", text[0])).replace("()", "").strip() if text else ""
    return f"{type(exc).__name__}: {line}"


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:  # length-prefixed: no two part lists give the same bytes
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


def token_bytes(token: str | None) -> bytes:
    token = token if token is not None else os.environ.get("PRISM_TOKEN")
    if not token:
        raise ValueError("token: a cluster needs a shared token (--token or the PRISM_TOKEN environment variable)")
    return token.encode()


def parse_master(master: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port)."""
    if not isinstance(master, str) or ":" not in master:
        raise ValueError(f"master: expected HOST:PORT, got {master!r}")
    host, _, port = master.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"master: expected HOST:PORT with a port in 1..65535, got {master!r}")
    return host, int(port)


def check_world(world, rank=None) -> tuple[int, int | None]:
    """(world, rank) as plain ints: any integer ``operator.index`` takes (never a bool)."""
    world = check_count(world, "world", 1, 1024)
    return world, None if rank is None else check_count(rank, "rank", 0, world - 1)


def check_timeout(timeout, name: str = "timeout") -> float:
    """Seconds in [1, 86400] (a day), finite."""
    return check_number(timeout, name, 1, 86400)


def set_threads(threads: int | None) -> None:
    """This process's torch and kernel threads (None: leave them)."""
    if threads is not None:
        # Checked before torch sees it: torch.set_num_threads(100000) succeeds,
        # and the process then dies at exit (SIGSEGV).
        threads = check_count(threads, "threads", 1, kernels._C.max_threads())
        torch.set_num_threads(threads)
        kernels.set_num_threads(threads)


def _config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pinned_meta(pinned: RunOptions | None) -> dict:
    return {} if pinned is None else {k: v for k, v in pinned.to_meta().items() if k in _PINNED}


def claims_of(model: PrismModel, settings: dict | None) -> dict:
    return {"version": __version__, "model_type": model.model_type,
            "config": _config_digest(model.config), "weight_dtype": model.net.weight_dtype,
            "weights": model.net.weights_digest(), "settings": settings or {}}


# In the order they are checked: a different weight_dtype is named before the digest it changes.
_CLAIM_NAMES = {"version": "package version", "model_type": "model type", "config": "model config (digest)",
                "weight_dtype": "weight dtype", "weights": "model weights (digest)"}


def mismatches(claims: list) -> list[str]:
    """One line per rank whose claims differ from rank 0's (settings: only
    those both ranks pinned)."""
    ref = claims[0]
    out = []
    for q, c in enumerate(claims[1:], start=1):
        if not isinstance(c, dict):
            out.append(f"rank {q}: sent no claims")
            continue
        for key, name in _CLAIM_NAMES.items():
            if c.get(key) != ref.get(key):
                out.append(f"rank {q}: {name} {str(c.get(key))[:16]} differs from rank 0's {str(ref.get(key))[:16]}")
                break
        else:
            mine, theirs = ref.get("settings") or {}, c.get("settings")
            if not isinstance(theirs, dict):
                out.append(f"rank {q}: malformed settings")
                continue
            for key in _PINNED:
                if key in theirs and key in mine and theirs[key] != mine[key]:
                    out.append(f"rank {q}: {key} {theirs[key]} differs from rank 0's {mine[key]}")
                    break
    return out


def seal(key: bytes, sender: int, receiver: int, op: str, seq: int, payload: bytes) -> bytes:
    head = _HEAD.pack(_OPS.index(op), seq)
    return head + payload + _mac(key, b"prism-control", f"{sender}>{receiver}".encode(), head, payload)


def unseal(key: bytes, sender: int, receiver: int, frame: bytes, seq: int) -> tuple[str, bytes]:
    """A control frame from ``sender``, checked: its MAC first (nothing in it
    is looked at before), then that it is frame number ``seq`` (an old frame
    played again is refused) and a known operation."""
    if len(frame) < _HEAD.size + _TAG:
        raise ClusterError(f"rank {sender}: control frame of {len(frame)} bytes, shorter than its head and tag")
    head, payload, tag = frame[:_HEAD.size], frame[_HEAD.size:-_TAG], frame[-_TAG:]
    if not hmac.compare_digest(tag, _mac(key, b"prism-control", f"{sender}>{receiver}".encode(), head, payload)):
        raise ClusterError(f"rank {sender}: control frame not signed with this session's key (tampered or stale)")
    op, got = _HEAD.unpack(head)
    if got != seq:
        raise ClusterError(f"rank {sender}: control frame number {got}, expected {seq} (replayed or lost)")
    if op >= len(_OPS):
        raise ClusterError(f"rank {sender}: unknown control operation {op}")
    return _OPS[op], payload


class Link:
    """The control plane between this rank and ``peer`` over gloo (its own
    tag): signed frames, numbered in each direction. One sender at a time."""

    def __init__(self, g: "Group", peer: int):
        self.g, self.peer = g, peer
        self.sent = self.received = 0
        self.lock = threading.Lock()
        self._pending: list = []  # sends started and not waited for (they hold their tensors)

    def busy(self) -> bool:
        return any(not w.is_completed() for w in self._pending)

    def send(self, op: str, payload: bytes = b"", *, wait: bool = True, lock_timeout: float = -1) -> bool:
        """Send one frame; ``wait=False`` only starts it. False if the lock
        was not free within ``lock_timeout`` (nothing sent)."""
        if not self.lock.acquire(timeout=lock_timeout):
            return False
        try:
            self.sent += 1
            frame = seal(self.g.key, self.g.rank, self.peer, op, self.sent, payload)
            works = self.g.transport.send_control(frame, self.peer, wait=wait)
            self._pending = [w for w in self._pending if not w.is_completed()] + ([] if wait else works)
            return True
        finally:
            self.lock.release()

    def recv(self, limit: int, timeout: float) -> tuple[str, bytes]:
        frame = self.g.transport.receive_control(self.peer, limit + _HEAD.size + _TAG, timeout)
        self.received += 1
        return unseal(self.g.key, self.peer, self.g.rank, frame, self.received)


def timed_out(exc: BaseException) -> bool:
    """Whether a link's failure is that nothing came (gloo says "Timed out"),
    rather than the link ending (a reset or an end of file)."""
    return "timed out" in str(exc).lower()


def link_failure(exc: BaseException, silent_for: float) -> str:
    """Why a link failed, in words."""
    if timed_out(exc):
        return f"no heartbeat for {silent_for:.1f} s"
    return f"its link failed ({first_line(exc)})"


class Rendezvous(dist.Store):
    """The rendezvous store as c10d sees it: forwards to a TCPStore until
    :meth:`close`. c10d keeps the store a group was formed with for the
    group's whole life; through this, rank 0 ends its TCPStore once every
    rank has formed (the listening socket closes, whatever was written is
    freed) and a worker drops its connection. Waits go in short slices, so
    closing also ends a formation that is waiting on it."""

    def __init__(self, store: dist.Store, timeout: float):
        super().__init__()
        self._store: dist.Store | None = store
        self._timeout = timeout

    def _live(self) -> dist.Store:
        s = self._store
        if s is None:
            raise ClusterError("rendezvous: the store is closed (the formation ended)")
        return s

    def close(self) -> None:
        self._store = None

    def set(self, key, value):
        self._live().set(key, value)

    def get(self, key):
        self.wait([key])
        return self._live().get(key)

    def add(self, key, value):
        return self._live().add(key, value)

    def check(self, keys):
        return self._live().check(keys)

    def delete_key(self, key):
        return self._live().delete_key(key)

    def compare_set(self, key, expected, desired):
        return self._live().compare_set(key, expected, desired)

    def num_keys(self):
        return self._live().num_keys()

    def set_timeout(self, timeout):
        self._timeout = timeout.total_seconds()

    def wait(self, keys, timeout=None):
        # Polled (c10d's own timed wait logs a warning each time it times out): a closed
        # store ends the wait at the next look.
        seconds = self._timeout if timeout is None else timeout.total_seconds()
        deadline = time.monotonic() + seconds
        while not self._live().check(keys):
            if time.monotonic() > deadline:
                raise ClusterError(f"rendezvous: not every rank joined within {seconds:g} s (waiting for "
                                   f"{', '.join(keys)[:200]})")
            time.sleep(0.02)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (one address, never every interface)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ClusterError(f"master: cannot listen on {host}:{port} ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a re-formation reuses the port at once
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ClusterError(f"master: cannot listen on {host}:{port} ({exc.strerror or exc}); it must be an "
                           f"address of this machine and a free port") from None
    return sock


def rss() -> int:
    """Resident memory of this process now, bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33; musl and macOS have none
    except (AttributeError, OSError, TypeError):
        return None
    fn.restype, fn.argtypes = _MallInfo2, []
    return fn


_MALLINFO2 = _glibc_mallinfo2()


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back, every arena and mmapped
    block included (0 without glibc's mallinfo2)."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class MemoryWatch:
    """How much this process grew since it was made. Resident pages alone
    miss growth that lands in memory freed earlier and still resident (a
    long-lived process, a test suite, reuses hundreds of MiB that way), so
    the larger of the resident and the malloc'd growth counts."""

    def __init__(self):
        self._rss, self._heap = rss(), heap_in_use()

    def grown(self) -> int:
        return max(rss() - self._rss if self._rss else 0, heap_in_use() - self._heap if self._heap else 0)


def read_world(store: dist.Store, key: str) -> int | None:
    """A world size another process wrote into the store (untrusted: None if not a plain small int)."""
    raw = bytes(store.get(key))
    return int(raw) if 0 < len(raw) <= 5 and raw.isdigit() else None


class Group:
    """This process's end of the gloo group: the pieces the coordinator and
    a worker share. ``store`` is the formation's rendezvous (a
    :class:`Rendezvous`); ``timeout`` bounds the formation, and
    :meth:`serve` switches to the exchange timeout."""

    def __init__(self, rank: int, world: int, store: Rendezvous, timeout: float, *, ifname: str | None):
        if dist.is_initialized():
            raise ClusterError("cluster: this process already belongs to a torch.distributed group "
                               "(one cluster per process; close the other first)")
        self.rank, self.world, self.store = rank, world, store
        saved = os.environ.get("GLOO_SOCKET_IFNAME")
        if ifname:  # gloo reads its interface at init time only
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        # c10d names the default group after a per-process counter that a failed
        # init_process_group leaves incremented (destroy_process_group resets it, but a
        # failed init has nothing to destroy). Every formation starts from 0, as a fresh
        # process does, or rank 0 would wait on "gloo/1/..." keys that new workers never write.
        dist.distributed_c10d._world.group_count = 0
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout))
        finally:
            if ifname:
                if saved is None:
                    os.environ.pop("GLOO_SOCKET_IFNAME", None)
                else:
                    os.environ["GLOO_SOCKET_IFNAME"] = saved
        self.transport = DistTransport(rank, world, max_frame_bytes=1 << 20, timeout=timeout)
        self.key = b""

    def authenticate(self, token: bytes) -> list[int]:
        """Every rank proves it holds ``token``: HMAC over all ranks' fresh
        nonces (replaying an old answer fails). Returns the ranks that failed,
        as this rank sees them; sets the session key. After the first
        all-gather every rank has formed: the rendezvous store is closed."""
        nonce = torch.tensor(list(secrets.token_bytes(32)), dtype=torch.uint8)
        nonces = [torch.empty(32, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(nonces, nonce)
        self.store.close()
        transcript = b"".join(bytes(n.tolist()) for n in nonces)
        mine = torch.tensor(list(_mac(token, b"prism-auth", str(self.rank).encode(), transcript)), dtype=torch.uint8)
        macs = [torch.empty(32, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(macs, mine)
        bad = [q for q in range(self.world)
               if not hmac.compare_digest(bytes(macs[q].tolist()), _mac(token, b"prism-auth", str(q).encode(), transcript))]
        self.key = _mac(token, b"prism-session", transcript)
        return bad

    def serve(self, timeout: float) -> None:
        """Formed: from now on every exchange may take ``timeout`` seconds."""
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout))
        self.transport.timeout = timeout  # gloo's point-to-point waits keep the formation's limit otherwise

    def close(self, wait: float = 10.0) -> None:
        """Leave the group; ``wait``: seconds to let the exchange thread end
        (a wait blocked in gloo is not ended by destroying the group: it
        holds its own reference and fails at its timeout)."""
        self.store.close()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        self.transport.close(wait)


def frame_bound(model: PrismModel, request: Request) -> int:
    """The largest frame a peer may announce for ``request``: every row's
    outputs at fp32 (logits included) plus headers."""
    net = model.net
    width = net.d + int(net.config.get("vocab_size") or 0) + 2 * net.d
    return request.batch * request.ranges[-1][1] * width * 4 + (1 << 20)


def _calibration_time(model: PrismModel) -> float:
    """Median seconds of a single-device forward of a fixed input (up to 128
    positions), after one warm-up run (first calls pay one-off costs)."""
    net = model.net
    if net.model_type == "vit":
        inputs = {"pixel_values": torch.zeros(1, net.channels, net.image, net.image)}
    else:
        inputs = {"input_ids": torch.zeros(1, min(net.n_positions, 128), dtype=torch.long)}
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        model(inputs, devices=1, outputs=("last",))
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[2]


def calibration_exchange(model: PrismModel, g: Group) -> list[float]:
    seconds = g.transport.exchange_meta({"seconds": _calibration_time(model)})
    out = []
    for q, meta in enumerate(seconds):
        s = meta.get("seconds")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 1e-6 <= s <= 3600:
            raise ClusterError(f"rank {q}: calibration sent {s!r}, expected seconds")
        out.append(float(s))
    return out


def peer_loss(message: str) -> bool:
    """An error that only reports another rank's loss (gloo's wording)."""
    m = message.lower()
    return "closed by peer" in m or "connection reset" in m or "broken pipe" in m or "timed out" in m


def exit_status(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
