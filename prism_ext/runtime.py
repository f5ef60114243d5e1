"""The multi-process runtime: devices as processes talking over TCP
(torch.distributed, gloo), on this machine or across boards.

Rank 0 is the coordinator (it also computes); ranks 1..P-1 are workers
(``prism worker``, or processes :class:`Cluster` starts on this machine).

- Formation: rank 0 opens a TCPStore (the rendezvous) on the address it was
  given (loopback for a local cluster), fresh for every formation; workers
  say which world they were started for, and gloo's ranks find each other
  through it. Then every rank proves it holds the shared token (HMAC over
  every rank's fresh nonce; the token never travels) and rank 0 closes the
  store: its listening socket goes, and what was written to it is freed.
  While it is up, its life is bounded by the start-up timeout and its size
  by a cap on rank 0's memory growth.
- After that, everything travels over gloo's connections between the ranks
  that formed the group. The control plane (the session, each request, the
  heartbeats both ways, error reports, close and abort) is frames on a tag
  of its own, each ``op | seq | payload`` tagged with an HMAC of the session
  key; a frame with a wrong tag or out of sequence (replayed) is refused
  and ends the link. The data plane (the per-layer exchanges, the results,
  the all-reduces) is :class:`prism_ext.comm.dist.DistTransport`.
- Liveness: rank 0 pings every worker and every worker sends rank 0 a
  heartbeat, every half second; a side that hears nothing for the exchange
  timeout calls the other lost (a worker then exits; rank 0 names the rank).

Before any activation moves every rank shows its package version, model
(config and weight digests) and pinned settings; any mismatch stops every
rank with one line naming the rank and the field. Nothing is pickled;
everything received is parsed with bounds checks. Threat model: README.md
("Threat model") and docs/design.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import os
import queue
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import kernels
from .checks import check_count
from ._version import __version__
from .api import PrismModel, load
from .comm.dist import DistTransport, TaskThread
from .method.engine import Collected
from .options import RunOptions
from .executor.local import simulate
from .executor.request import Request, count_inputs, decode_request, encode_request, local_inputs, run

__all__ = ["Cluster", "ClusterError", "HandshakeError", "cluster", "worker_main", "worker_exit", "speed_weights",
           "DEFAULT_TIMEOUT", "DEFAULT_START_TIMEOUT"]

DEFAULT_TIMEOUT = 60.0
# Seconds a formation may take (workers start, load the model, connect): separate from the exchange
# timeout, so a short exchange timeout does not fail a start on a loaded machine.
DEFAULT_START_TIMEOUT = 120.0
DEFAULT_JOIN_TIMEOUT = 300.0  # seconds a `prism worker` keeps trying to join a coordinator
_TAG = 32  # bytes of an HMAC-SHA256 tag
_HEARTBEAT = 0.5  # seconds between pings (rank 0) and heartbeats (workers)
_STALE = 5.0  # seconds without a heartbeat after which lost_ranks() calls a worker lost (a loaded board can lag)
_REPORTS = 2.0  # seconds rank 0 waits, after a failure, for the workers' error reports
# Rank 0's memory may grow this much while its rendezvous store is up (anyone who can reach the port
# can write to it); more ends the formation, and the store with what was written.
_STORE_GROWTH = 256 << 20
_CONTROL_FROM_WORKER = 4096  # largest control frame a worker sends (heartbeats, error reports)
_CONTROL_FROM_RANK0 = (1 << 30) + 4096  # a request's inputs for one device, plus the frame's head
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# The run options a rank may pin (torchrun: every rank has its own command line); what comes back is rank 0's affair.
_PINNED = tuple(name for name in RunOptions.fields() if name != "outputs")
# Control-plane operations (one byte on the wire, covered by the frame's MAC).
_OPS = ("session", "ping", "run", "calibrate", "close", "abort", "alive", "error", "closed")
_HEAD = struct.Struct("<BQ")  # op, sequence number


class ClusterError(RuntimeError):
    """The cluster failed; the message names the rank (lost, failed or refused)."""


class HandshakeError(ClusterError):
    """A rank failed authentication or does not match rank 0 (version, model, settings, world)."""


class _NotFormed(ClusterError):
    """A formation attempt failed before any peer was authenticated (a worker may try again)."""


_GLOO_SOURCE = re.compile(r"^\s*\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = _GLOO_SOURCE.sub("", text[0]) if text else ""  # gloo prefixes its source path: not for users
    return f"{type(exc).__name__}: {line}"


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:  # length-prefixed: no two part lists give the same bytes
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


def _token_bytes(token: str | None) -> bytes:
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


def _check_world(world, rank=None) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= 1024:
        raise ValueError(f"world: expected an int in 1..1024, got {world!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world):
        raise ValueError(f"rank: expected an int in 0..{world - 1}, got {rank!r}")


def _check_timeout(timeout, name: str = "timeout") -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 86400:
        raise ValueError(f"{name}: expected seconds in [1, 86400], got {timeout!r}")
    return float(timeout)


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


def _pinned_meta(pinned: RunOptions | None) -> dict:
    return {} if pinned is None else {k: v for k, v in pinned.to_meta().items() if k in _PINNED}


def _claims(model: PrismModel, settings: dict | None) -> dict:
    return {"version": __version__, "model_type": model.model_type,
            "config": _config_digest(model.config), "weights": model.net.weights_digest(),
            "settings": settings or {}}


_CLAIM_NAMES = {"version": "package version", "model_type": "model type", "config": "model config (digest)",
                "weights": "model weights (digest)"}


def _mismatches(claims: list) -> list[str]:
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


# ------------------------------------------------------------ control plane


def _seal(key: bytes, sender: int, receiver: int, op: str, seq: int, payload: bytes) -> bytes:
    head = _HEAD.pack(_OPS.index(op), seq)
    return head + payload + _mac(key, b"prism-control", f"{sender}>{receiver}".encode(), head, payload)


def _unseal(key: bytes, sender: int, receiver: int, frame: bytes, seq: int) -> tuple[str, bytes]:
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


class _Link:
    """The control plane between this rank and ``peer`` over gloo (its own
    tag): signed frames, numbered in each direction. One sender at a time."""

    def __init__(self, g: "_Group", peer: int):
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
            frame = _seal(self.g.key, self.g.rank, self.peer, op, self.sent, payload)
            works = self.g.transport.send_control(frame, self.peer, wait=wait)
            self._pending = [w for w in self._pending if not w.is_completed()] + ([] if wait else works)
            return True
        finally:
            self.lock.release()

    def recv(self, limit: int, timeout: float) -> tuple[str, bytes]:
        frame = self.g.transport.receive_control(self.peer, limit + _HEAD.size + _TAG, timeout)
        self.received += 1
        return _unseal(self.g.key, self.peer, self.g.rank, frame, self.received)


def _link_failure(exc: BaseException, silent_for: float) -> str:
    """Why a link failed, in words: gloo says "Timed out" when nothing came."""
    if "timed out" in str(exc).lower():
        return f"no heartbeat for {silent_for:.1f} s"
    return f"its link failed ({first_line(exc)})"


class _Rendezvous(dist.Store):
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


def _listen(host: str, port: int) -> socket.socket:
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


def _rss() -> int:
    """Resident memory of this process now, bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _read_world(store: dist.Store, key: str) -> int | None:
    """A world size another process wrote into the store (untrusted: None if not a plain small int)."""
    raw = bytes(store.get(key))
    return int(raw) if 0 < len(raw) <= 5 and raw.isdigit() else None


class _Group:
    """This process's end of the gloo group: the pieces the coordinator and
    a worker share. ``store`` is the formation's rendezvous (a
    :class:`_Rendezvous`); ``timeout`` bounds the formation, and
    :meth:`serve` switches to the exchange timeout."""

    def __init__(self, rank: int, world: int, store: _Rendezvous, timeout: float, *, ifname: str | None):
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
        self.transport = DistTransport(rank, world, max_frame_bytes=1 << 20)
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

    def close(self) -> None:
        self.store.close()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()  # first: a blocked exchange then fails and its thread can end
        self.transport.close()


def _frame_bound(model: PrismModel, request: Request) -> int:
    """The largest frame a peer may announce for ``request``: every row's
    outputs at fp32 (logits included) plus headers."""
    net = model.net
    width = net.d + int(net.config.get("vocab_size") or 0) + 2 * net.d
    return request.batch * request.ranges[-1][1] * width * 4 + (1 << 20)


class Cluster:
    """A live cluster: P processes holding the model, serving request after
    request; the executor behind a :class:`prism_ext.PrismModel` bound to it
    (``.model``, what :func:`cluster` returns), whose calls then run here
    (``devices`` is the cluster's size, or 1 for the single-device peer run
    on rank 0 alone). Lifecycle: :meth:`close`, :meth:`abort`,
    :meth:`lost_ranks`, :meth:`calibrate`."""

    def __init__(self, model, devices: int | None = None, *, master: str | None = None, world: int | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT, start_timeout: float | None = None,
                 threads: int | None = None, worker_threads: int | None = None, device_weights=None,
                 auto_weights: bool = False, ifname: str | None = None, pinned: RunOptions | None = None,
                 quiet: bool = True):
        model = model if isinstance(model, PrismModel) else load(model)
        self.model = model.with_executor(self)  # the model face whose calls run on this cluster
        if self.model.directory is None:
            raise ValueError("model: a cluster needs a model loaded from a directory or a bundled name "
                             "(workers load it themselves)")
        self.timeout = _check_timeout(timeout)
        self.start_timeout = _check_timeout(DEFAULT_START_TIMEOUT if start_timeout is None else start_timeout,
                                            "start_timeout")
        self.closed: str | None = "starting"
        self._procs: dict[int, subprocess.Popen] = {}
        self._group: _Group | None = None
        self._links: dict[int, _Link] = {}
        self._seq = 0
        self._lock = threading.Lock()  # one request at a time
        self._news = threading.Condition()  # the control threads' findings, below
        self._seen: dict[int, float] = {}  # rank -> when its last control frame came
        self._gone: dict[int, str] = {}  # rank -> why its link ended
        self._errors: dict[int, str] = {}  # rank -> the error it reported
        self._closed_ranks: set[int] = set()  # ranks that acknowledged close()
        self._control_error: str | None = None  # rank 0's own control thread failed
        self._stop = threading.Event()  # ends the control threads
        self._threads: list[threading.Thread] = []
        self._say = (lambda msg: None) if quiet else (lambda msg: print(f"prism: {msg}", file=sys.stderr, flush=True))
        if master is None:  # P processes on this machine, over loopback
            world = devices if world is None else world
            _check_world(world)
            if devices is not None and devices != world:
                raise ValueError(f"devices: {devices} differs from world {world}")
            host, port, ifname = "127.0.0.1", 0, ifname or "lo"
            token = token or os.environ.get("PRISM_TOKEN") or secrets.token_hex(16)
        else:
            host, port = parse_master(master)
            world = world if world is not None else devices
            _check_world(world)
        self.world = world
        token_b = _token_bytes(token)
        self.device_weights = device_weights
        self.settings = _pinned_meta(pinned)
        if device_weights is not None:
            self.settings["device_weights"] = RunOptions(device_weights=device_weights).to_meta()["device_weights"]
        set_threads(threads)
        self._runner = TaskThread("prism-rank0")  # rank 0's part of each request
        rendezvous = None
        try:
            rendezvous, port = self._open_store(host, port)
            if master is None:
                self._spawn(port, world, token, worker_threads or max(1, (os.cpu_count() or 1) // world))
            self._say(f"rank 0 waiting for {world - 1} worker(s) at {host}:{port}")
            self._group = self._rendezvous(rendezvous, ifname)
            self._handshake(token_b)
            self.closed = None
            if auto_weights:
                self.calibrate()
        except BaseException as exc:
            if rendezvous is not None:
                rendezvous.close()
            self._teardown(f"start failed: {first_line(exc)}")
            if isinstance(exc, (ClusterError, KeyboardInterrupt)):
                raise
            # Anything else (a peer's malformed frame, gloo's errors, a store flooded out of
            # memory) is a failed start too, named, never a bare exception from the depths.
            raise ClusterError(f"cluster: could not start: {self._diagnose(exc)}") from exc

    # ------------------------------------------------------------ start-up

    def _open_store(self, host: str, port: int) -> tuple[_Rendezvous, int]:
        """This formation's rendezvous store, on ``host`` only (a socket we
        bind, handed to the TCPStore), with this cluster's world in it."""
        delta = datetime.timedelta(seconds=self.start_timeout)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            # Under torchrun its agent already serves the rendezvous store at MASTER_PORT: join it as a client.
            store = dist.TCPStore(host, port, self.world, is_master=False, timeout=delta)
        else:
            sock = _listen(host, port)
            port = sock.getsockname()[1]
            store = dist.TCPStore(host, port, self.world, is_master=True, timeout=delta, wait_for_workers=False,
                                  master_listen_fd=sock.detach())
        store.set("prism/world", str(self.world).encode())
        return _Rendezvous(store, self.start_timeout), port

    def _spawn(self, port: int, world: int, token: str, threads: int) -> None:
        env = dict(os.environ, PRISM_TOKEN=token, OMP_NUM_THREADS=str(threads))
        for r in range(1, world):
            argv = [sys.executable, "-m", "prism_ext", "worker", "--master", f"127.0.0.1:{port}", "--rank", str(r),
                    "--world", str(world), "--threads", str(threads), "--timeout", str(self.timeout),
                    "--join-timeout", str(self.start_timeout), "--ifname", "lo"]
            # cwd: `-m` searches the working directory first; start where this very package lies.
            # A session of their own: Ctrl-C in a terminal reaches rank 0 only, which decides
            # when the workers stop (a server drains its requests first); a lost rank 0 still
            # ends them (their link to it closes, or stays silent past the timeout).
            self._procs[r] = subprocess.Popen(argv, env=env, cwd=_PACKAGE_PARENT, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, start_new_session=True)

    def _rendezvous(self, store: _Rendezvous, ifname) -> _Group:
        """Join the gloo group; meanwhile watch what can end the formation
        early: a local worker that dies, a worker started for another world
        (each writes its own), and the store growing rank 0's memory."""
        box: dict = {}

        def join():
            try:
                box["group"] = _Group(0, self.world, store, self.start_timeout, ifname=ifname)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                box["error"] = exc

        base = _rss()
        checked: set[int] = set()
        t = threading.Thread(target=join, name="prism-rendezvous", daemon=True)
        t.start()
        try:
            while t.is_alive():
                t.join(0.05)
                for r, p in self._procs.items():
                    if p.poll() is not None:
                        raise ClusterError(f"rank {r} exited during start-up ({_exit_status(p.returncode)}); "
                                           f"its error is above")
                grown = _rss() - base if base else 0
                if grown > _STORE_GROWTH:
                    raise ClusterError(f"rendezvous: rank 0 grew by {grown >> 20} MiB while its store was open "
                                       f"(someone is writing to it); formation stopped")
                for r in range(1, self.world):
                    if r not in checked and store.check([f"prism/hello/{r}"]):
                        checked.add(r)
                        theirs = _read_world(store, f"prism/hello/{r}")
                        if theirs != self.world:
                            raise HandshakeError(f"rank {r}: started with --world {theirs}; this cluster has "
                                                 f"{self.world} devices")
        except BaseException:
            store.close()  # ends the join's waits, and with it the store
            t.join(5)
            if "group" in box:
                box["group"].close()
            raise
        if "error" in box:
            exc = box["error"]
            text = str(exc).splitlines()[0] if isinstance(exc, ClusterError) else f"rendezvous: {first_line(exc)}"
            raise ClusterError(f"{text}; rank 0 waited up to {self.start_timeout:g} s for {self.world - 1} "
                               f"worker(s)") from exc
        return box["group"]

    def _handshake(self, token: bytes) -> None:
        g = self._group
        bad = g.authenticate(token)
        if bad:
            raise HandshakeError("; ".join(f"rank {q}: authentication failed: it does not hold this cluster's "
                                           f"token (--token / PRISM_TOKEN)" for q in bad))
        m = self.model
        self._links = {r: _Link(g, r) for r in range(1, self.world)}
        session = json.dumps({"model": str(m.directory.resolve()), "model_type": m.model_type}).encode()
        for link in self._links.values():
            link.send("session", session)
        claims = g.transport.exchange_meta(_claims(m, self.settings))
        wrong = _mismatches(claims)
        if wrong:
            raise HandshakeError("; ".join(wrong))
        g.serve(self.timeout)
        now = time.monotonic()
        self._seen = {r: now for r in self._links}
        self._threads = [threading.Thread(target=self._read, args=(link,), name=f"prism-control-{link.peer}",
                                          daemon=True) for link in self._links.values()]
        self._threads.append(threading.Thread(target=self._ping, name="prism-ping", daemon=True))
        for t in self._threads:
            t.start()
        self._say(f"{self.world} devices ready (prism-ext {__version__}, {m.model_type}, "
                  f"weights {m.net.weights_digest()[:12]})")

    # ------------------------------------------------------------ control threads

    def _interval(self) -> float:
        return min(_HEARTBEAT, self.timeout / 4)

    def _ping(self) -> None:
        """Every worker hears from rank 0 at least every interval (a worker
        that hears nothing for the timeout exits: rank 0 hung or cut off)."""
        try:
            while not self._stop.wait(self._interval()):
                for link in self._links.values():
                    if not link.busy():  # a ping still in flight: the worker is slow, do not pile up
                        link.send("ping", wait=False, lock_timeout=0)
        except BaseException as exc:  # noqa: BLE001 - reported by lost_ranks(), which ends the cluster
            if not self._stop.is_set():
                with self._news:
                    self._control_error = f"its control thread failed ({first_line(exc)})"
                    self._news.notify_all()

    def _read(self, link: _Link) -> None:
        """What a worker sends rank 0: heartbeats, its error report, its
        acknowledgement of close. Nothing for the timeout ends the link."""
        r = link.peer
        while not self._stop.is_set():
            try:
                op, payload = link.recv(_CONTROL_FROM_WORKER, self.timeout)
            except BaseException as exc:  # noqa: BLE001 - a lost link is a lost rank
                with self._news:
                    if not self._stop.is_set():
                        self._gone[r] = _link_failure(exc, time.monotonic() - self._seen.get(r, time.monotonic()))
                    self._news.notify_all()
                return
            with self._news:
                self._seen[r] = time.monotonic()
                if op == "error":
                    self._errors[r] = payload.decode(errors="replace")[:1000]
                elif op == "closed":
                    self._closed_ranks.add(r)
                elif op != "alive":
                    self._gone[r] = f"it sent rank 0 a {op!r} frame, which workers never send"
                    self._news.notify_all()
                    return
                self._news.notify_all()

    # ------------------------------------------------------------ requests

    def resolve(self, devices: int | None, options: RunOptions) -> tuple[int, RunOptions]:
        """Executor: ``devices`` None is every process, 1 the single-device
        run on rank 0 alone; device weights not given are the cluster's (set,
        or measured by :meth:`calibrate`)."""
        self._check_open()
        if devices == 1 and options.mode == "prism":
            options = options.replace(mode="single")
        if options.device_weights is None and self.device_weights is not None:
            options = options.replace(device_weights=self.device_weights)
        return self._devices(devices, options.mode), options

    def execute(self, net, inputs: dict, request: Request, on_token=None) -> Collected:
        """Executor: run a planned request on every process (``on_token``:
        rank 0's callback for each streamed step, on the cluster's request thread)."""
        if net is not self.model.net:
            raise ValueError("net: a cluster runs the model its workers loaded, not another network")
        return self._submit(inputs, request, on_token)

    def _devices(self, devices, mode) -> int:
        if devices is None or devices == self.world or (devices == 1 and mode in ("single", "prism")):
            return self.world if devices is None else devices
        raise ValueError(f"devices: this cluster has {self.world} devices (or 1 for the single-device run), "
                         f"got {devices!r}")

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the workers this cluster started on this machine (none for ``master=``)."""
        return [p.pid for p in self._procs.values()]

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ClusterError(f"cluster: closed ({self.closed})")

    def _submit(self, inputs: dict, request: Request, on_token=None) -> Collected:
        m = self.model
        if request.mode == "single":  # rank 0 alone: nothing to send
            return simulate(m.net, inputs, request, on_token)
        blobs = [encode_request(request, local_inputs(m.net, inputs, request, r)) for r in range(self.world)]
        req, local = decode_request(blobs[0], m.net, 0, self.world)  # rank 0 runs what the others receive
        with self._lock:
            self._check_open()
            g = self._group
            self._seq += 1
            g.transport.max_frame_bytes = _frame_bound(m, request)

            def work():
                for r, link in self._links.items():  # each device's own inputs, signed, over its link
                    link.send("run", blobs[r])
                return run(m.net, req, local, 0, g.transport, on_token)

            collected = self._guarded(work, f"request {self._seq}")
        return count_inputs(collected, blobs)

    def _guarded(self, fn, what: str):
        """Run ``fn`` on a helper thread so Ctrl-C reaches this one at once;
        any failure becomes a ClusterError naming the rank, and the cluster is
        torn down (its processes exit)."""
        box, done = self._runner.submit(fn)
        try:
            while not done.wait(0.1):
                pass
        except KeyboardInterrupt:
            self._teardown("interrupted (Ctrl-C)")
            done.wait(5)
            raise
        if "error" in box:
            exc = box["error"]
            reason = self._diagnose(exc)
            self._teardown(reason)
            raise ClusterError(f"cluster: {what} failed: {reason}") from exc
        return box["result"]

    def calibrate(self) -> list[float]:
        """Time a short forward on every rank and split positions by measured
        speed from now on; returns the weights (relative speeds, see
        :func:`speed_weights`)."""
        self._check_open()
        with self._lock:
            g = self._group
            self._seq += 1

            def work():
                for link in self._links.values():
                    link.send("calibrate")
                return _calibration_exchange(self.model, g)

            seconds = self._guarded(work, "calibration")
        self.device_weights = speed_weights(seconds)
        plan_text = ", ".join(f"rank {r}: {1e3 * s:.1f} ms -> weight {w}"
                              for r, (s, w) in enumerate(zip(seconds, self.device_weights)))
        print(f"prism: auto weights: {plan_text}", file=sys.stderr, flush=True)
        return self.device_weights

    # ------------------------------------------------------------ failures

    def _diagnose(self, exc: BaseException) -> str:
        """Name the rank behind a failure. A peer's death makes the others
        fail too ("connection closed by peer"), so the root cause is, in
        order: a local process killed by a signal, a worker that went silent
        without reporting an error (killed, hung, or cut off), a worker that
        reported an error of its own, a local process that exited."""
        workers = list(self._links) if self._seen else []  # reports come once the control threads run
        with self._news:  # let the workers' reports land: each reports, or its link ends
            self._news.wait_for(lambda: all(r in self._errors or r in self._gone for r in workers), _REPORTS)
            errors, gone, seen = dict(self._errors), dict(self._gone), dict(self._seen)
        for r, p in self._procs.items():
            if p.poll() is not None and p.returncode < 0:
                return f"rank {r} lost: its process {_exit_status(p.returncode)} ({first_line(exc)})"
        if not workers:  # failed while forming: the exception says it (errors from peers name the rank)
            return first_line(exc)
        now = time.monotonic()
        silent = [r for r in workers if r not in errors]
        if silent:
            r = silent[0]
            why = gone.get(r) or f"no heartbeat for {now - seen.get(r, now):.1f} s"
            return (f"rank {r} lost: {why} and no error report (process killed, hung, or network down) "
                    f"({first_line(exc)})")
        own = [r for r, e in errors.items() if not _peer_loss(e)]
        if own:
            return f"rank {own[0]} failed: {errors[own[0]]}"
        for r, p in self._procs.items():
            if p.poll() is not None and p.returncode != 0 and r not in errors:
                return f"rank {r} lost: its process {_exit_status(p.returncode)} ({first_line(exc)})"
        if errors:
            r = min(errors)
            return f"rank {r} failed: {errors[r]}"
        return first_line(exc)

    def lost_ranks(self) -> dict[int, str]:
        """The ranks that look lost now, each with why: a local worker whose
        process ended, a worker whose link to rank 0 ended, or one not heard
        from for 5 s; rank 0 itself if its control thread failed. Never
        blocks (the control threads keep the state); safe from any thread and
        while a request runs; {} for a closed cluster."""
        if self.closed is not None:
            return {}
        lost = {r: f"rank {r} lost: its process {_exit_status(p.returncode)}"
                for r, p in self._procs.items() if p.poll() is not None}
        now = time.monotonic()
        with self._news:
            for r in self._links:
                if r in lost:
                    continue
                if r in self._gone:
                    lost[r] = f"rank {r} lost: {self._gone[r]}"
                elif now - self._seen.get(r, now) > max(_STALE, 2 * self._interval()):
                    lost[r] = f"rank {r} lost: no heartbeat for {now - self._seen[r]:.1f} s"
            if self._control_error is not None:
                lost[0] = f"rank 0: {self._control_error}"
        return lost

    def abort(self, reason: str) -> None:
        """Stop every process now (workers exit, reporting ``reason``); the
        cluster is closed. For a coordinator that found a rank lost between
        requests (:meth:`lost_ranks`); a new cluster can then be formed in
        this process."""
        if self.closed is None:
            with self._lock:
                self._teardown(reason)

    def _teardown(self, reason: str) -> None:
        clean = self.closed is None and reason == "closed"
        self.closed = reason
        self._stop.set()
        g = self._group
        if not clean:  # a worker that hears this exits at once, naming the reason
            for link in self._links.values():
                with contextlib.suppress(Exception):
                    link.send("abort", reason.encode()[:1000], wait=False, lock_timeout=0.5)
        for p in self._procs.values():
            if p.poll() is None:
                with contextlib.suppress(Exception):
                    p.wait(timeout=2 if g is not None else 0.1)
        for p in self._procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        # With its peers gone a request in flight fails at once; let it end
        # before the group goes away under it.
        self._runner.stop()
        if g is not None:
            g.close()
            self._group = None
        # The control threads end as their links close (the workers are gone). Waited for: a
        # thread still inside gloo when the interpreter exits aborts the process.
        deadline = time.monotonic() + self.timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop every worker (they exit cleanly) and leave the group."""
        if self.closed is not None:
            return
        with self._lock:
            for link in self._links.values():
                with contextlib.suppress(Exception):
                    link.send("close")
            with self._news:  # every worker acknowledges, or its link or process ends
                self._news.wait_for(lambda: all(r in self._closed_ranks or r in self._gone
                                                or (r in self._procs and self._procs[r].poll() is not None)
                                                for r in self._links), 10)
            self._teardown("closed")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        state = "open" if self.closed is None else f"closed: {self.closed}"
        return f"Cluster({self.model.model_type}, devices={self.world}, {state})"


def cluster(model, devices: int | None = None, **kwargs) -> PrismModel:
    """Start a live cluster for ``model`` (a :class:`PrismModel`, a checkpoint
    directory or a bundled name) and return the model bound to it: its calls
    and ``generate`` run on the cluster's processes, ``close()`` (or a
    ``with`` block) stops them, and ``.executor`` is the :class:`Cluster`.

    ``devices=P`` starts P - 1 worker processes on this machine over loopback
    (this process is rank 0 and computes too). ``master="HOST:PORT",
    world=P`` instead waits for ``prism worker`` processes started on other
    boards (``token`` or PRISM_TOKEN is then required). Other options:
    ``timeout`` (seconds for every exchange, default 60), ``start_timeout``
    (seconds the formation may take, default 120), ``threads`` (this
    process), ``worker_threads`` (local workers; default cores // P),
    ``device_weights`` or ``auto_weights=True`` (time every rank, split by
    speed), ``ifname`` (gloo's network interface), ``quiet``."""
    return Cluster(model, devices, **kwargs).model


def _peer_loss(message: str) -> bool:
    """An error that only reports another rank's loss (gloo's wording)."""
    m = message.lower()
    return "closed by peer" in m or "connection reset" in m or "broken pipe" in m or "timed out" in m


def _exit_status(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


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


def _calibration_exchange(model: PrismModel, g: _Group) -> list[float]:
    seconds = g.transport.exchange_meta({"seconds": _calibration_time(model)})
    out = []
    for q, meta in enumerate(seconds):
        s = meta.get("seconds")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 1e-6 <= s <= 3600:
            raise ClusterError(f"rank {q}: calibration sent {s!r}, expected seconds")
        out.append(float(s))
    return out


def speed_weights(seconds: list[float]) -> list[float]:
    """Device weights from each rank's calibration time: relative speeds,
    the fastest rank 1.0 (a rank twice as slow gets 0.5, so half the
    positions of the fastest)."""
    fastest = min(seconds)
    return [round(fastest / s, 3) for s in seconds]


# ---------------------------------------------------------------- worker


def _join(host: str, port: int, rank: int, world: int, join_timeout: float, ifname: str | None) -> _Group:
    """Form the group with rank 0, trying again (a fresh connection each
    time) until ``join_timeout``: rank 0 may not be up yet, or be between
    two formations (a server re-forming)."""
    deadline = time.monotonic() + join_timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return _join_once(host, port, rank, world, max(left, 1.0), ifname)
        except HandshakeError:
            raise
        except Exception as exc:  # noqa: BLE001 - this attempt failed before any peer was trusted
            if time.monotonic() + 1.0 >= deadline:
                raise _NotFormed(f"no coordinator (rank 0) at {host}:{port} formed a cluster with this worker "
                                 f"within {join_timeout:g} s (--join-timeout); last attempt: "
                                 f"{first_line(exc)}") from None
            time.sleep(1.0)  # nothing to wait on: rank 0 is not there yet


def _join_once(host: str, port: int, rank: int, world: int, timeout: float, ifname: str | None) -> _Group:
    # A plain connection first: while rank 0 is not listening, c10d's client would log every retry.
    socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    store = _Rendezvous(dist.TCPStore(host, port, world, is_master=False,
                                      timeout=datetime.timedelta(seconds=timeout)), timeout)
    try:
        # Say which world this worker was started for (rank 0 names a mismatch at once), and
        # check rank 0's: gloo itself would wait for a rank that never comes, then time out.
        store.set(f"prism/hello/{rank}", str(world).encode())
        store.wait(["prism/world"])
        theirs = _read_world(store, "prism/world")
        if theirs != world:
            raise HandshakeError(f"world: this worker was started with --world {world}; rank 0's cluster has "
                                 f"{theirs} devices")
        return _Group(rank, world, store, timeout, ifname=ifname)
    except BaseException:
        store.close()
        raise


def worker_exit(rank: int, code: int, message: str | None) -> None:
    """End a worker process now, with ``code`` (and ``message`` on stderr)."""
    if message:
        print(f"prism worker (rank {rank}): {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)  # gloo threads may still be blocked on dead peers: do not wait for them


def worker_main(master: str, rank: int, world: int, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                join_timeout: float = DEFAULT_JOIN_TIMEOUT, threads: int | None = None, ifname: str | None = None,
                model: str | None = None, pinned: RunOptions | None = None) -> int:
    """Run rank ``rank`` until rank 0 closes the cluster (exit status 0),
    fails (1), or the handshake refuses this rank (2). ``join_timeout``:
    seconds to keep trying to form the cluster with rank 0; ``timeout``: any
    exchange, and the longest rank 0 may stay silent once formed (the worker
    then exits: rank 0 hung or cut off). ``model`` overrides the path rank 0
    announces (the checkpoint lives elsewhere on this board); ``pinned``:
    this rank's own run options, checked against rank 0's (torchrun, where
    every rank has its own command line)."""
    host, port = parse_master(master)
    _check_world(world, rank)
    if rank == 0:
        raise ValueError("rank: rank 0 is the coordinator (prism run / prism_ext.cluster), not a worker")
    timeout = _check_timeout(timeout)
    join_timeout = _check_timeout(join_timeout, "join_timeout")
    token_b = _token_bytes(token)
    set_threads(threads)
    closing = threading.Event()
    g = link = None
    try:
        g = _join(host, port, rank, world, join_timeout, ifname)
        bad = g.authenticate(token_b)
        if bad:
            who = "this rank's token differs from rank 0's" if 0 in bad or rank in bad else f"ranks {bad} failed"
            raise HandshakeError(f"authentication failed: {who} (--token / PRISM_TOKEN)")
        link = _Link(g, 0)
        op, payload = link.recv(1 << 16, join_timeout)
        if op != "session":
            raise HandshakeError(f"rank 0 sent {op!r} where the session belongs")
        session = json.loads(payload)
        path = model or (session.get("model") if isinstance(session, dict) else None)
        if not isinstance(path, str):
            raise HandshakeError("rank 0 announced no model")
        try:
            m = load(path)
        except (OSError, ValueError) as exc:
            m = None
            load_error = first_line(exc)
        claims = _claims(m, _pinned_meta(pinned)) if m is not None else {"version": __version__, "model_type": None,
                                                             "config": f"unloadable: {load_error}", "weights": None}
        wrong = _mismatches(g.transport.exchange_meta(claims))
        if m is None:
            raise HandshakeError(f"cannot load model {path!r}: {load_error}")
        if wrong:
            raise HandshakeError("; ".join(wrong))
        g.serve(timeout)
        ops: queue.SimpleQueue = queue.SimpleQueue()
        interval = min(_HEARTBEAT, timeout / 4)
        threading.Thread(target=_worker_listen, args=(link, rank, timeout, ops, closing), daemon=True).start()
        threading.Thread(target=_worker_beat, args=(link, rank, interval, closing), daemon=True).start()
        print(f"prism worker (rank {rank}): ready ({m.model_type}, {world} devices)", file=sys.stderr, flush=True)
        while True:
            op, payload = ops.get()
            if op == "close":
                link.send("closed")
                return 0
            if op == "calibrate":
                _calibration_exchange(m, g)
                continue
            req, local = decode_request(payload, m.net, rank, world)
            g.transport.max_frame_bytes = _frame_bound(m, req)
            with torch.no_grad():
                run(m.net, req, local, rank, g.transport)
    except HandshakeError as exc:
        print(f"prism worker (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 and on stderr
        message = str(exc).splitlines()[0] if isinstance(exc, ClusterError) else first_line(exc)
        if link is not None and not closing.is_set():
            closing.set()  # the heartbeat stops: this report is the last frame
            with contextlib.suppress(Exception):
                link.send("error", message.encode()[:1000])
        print(f"prism worker (rank {rank}): {message}", file=sys.stderr, flush=True)
        return 1


def _worker_listen(link: _Link, rank: int, timeout: float, ops: queue.SimpleQueue, closing: threading.Event) -> None:
    """A worker's control frames from rank 0, received as they come (also
    while a request runs): pings prove rank 0 alive, abort ends the worker
    at once, the rest go to the main thread in order. Nothing from rank 0
    for ``timeout`` seconds (it pings twice a second): it is hung or cut
    off, and this worker exits."""
    last = time.monotonic()
    while True:
        try:
            op, payload = link.recv(_CONTROL_FROM_RANK0, timeout)
        except BaseException as exc:  # noqa: BLE001 - the coordinator is gone
            if not closing.is_set():
                why = _link_failure(exc, time.monotonic() - last).replace("no heartbeat", "nothing")
                worker_exit(rank, 1, f"lost the coordinator (rank 0): {why}")
            return
        last = time.monotonic()
        if op == "ping":
            continue
        if op == "abort":
            closing.set()
            worker_exit(rank, 1, f"rank 0 aborted the cluster: {payload.decode(errors='replace')}")
        if op not in ("run", "calibrate", "close"):
            worker_exit(rank, 1, f"rank 0 sent a {op!r} frame, which a formed cluster never sends")
        ops.put((op, payload))
        if op == "close":
            closing.set()
            return


def _worker_beat(link: _Link, rank: int, interval: float, closing: threading.Event) -> None:
    """A worker's heartbeat to rank 0, every ``interval`` seconds."""
    try:
        while not closing.wait(interval):
            link.send("alive")
    except Exception as exc:  # noqa: BLE001 - rank 0 is gone (or hung: the send timed out)
        if not closing.is_set():
            worker_exit(rank, 1, f"lost the coordinator (rank 0): {first_line(exc)}")
