"""The multi-process runtime: devices as processes talking over TCP
(torch.distributed, gloo), on this machine or across boards.

Rank 0 is the coordinator (it also computes); ranks 1..P-1 are workers
(``prism worker``, or processes :class:`Cluster` starts on this machine).
Two channels, both from torch.distributed:

- the TCPStore that rank 0 hosts (the rendezvous) carries the control plane:
  the session, each request (a device's own inputs, tagged with an HMAC of the
  session key), worker heartbeats and error reports, and the abort signal;
- gloo carries the data plane: the per-layer exchanges, the results, the
  all-reduces (:class:`prism_ext.comm.dist.DistTransport`).

Before any activation moves, every rank proves it holds the shared token
(HMAC over every rank's fresh nonce; the token never travels) and shows its
package version, model (config and weight digests) and pinned settings; any
mismatch stops every rank with one line naming the rank and the field.
Nothing is pickled; everything received is parsed with bounds checks.
Threat model: gloo and the store are not encrypted; the token stops
misconfigured and casual joins, not an attacker on the path (use a VPN).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import hmac
import json
import os
import secrets
import signal
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
from .api import PrismModel, PrismOutput, load
from .comm.dist import DistTransport, TaskThread
from .method.engine import Collected, GenerateOptions
from .options import RunOptions, run_options
from .executor.local import simulate
from .executor.request import Request, count_inputs, decode_request, encode_request, local_inputs, plan, run, run_stats

__all__ = ["Cluster", "ClusterError", "HandshakeError", "cluster", "worker_main", "worker_exit", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 60.0
_TAG = 32  # bytes of an HMAC-SHA256 tag
_HEARTBEAT = 0.5  # seconds between worker heartbeats
_STALE = 5.0  # seconds without a heartbeat after which lost_ranks() calls a worker lost (a loaded board can lag)
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# The run options a rank may pin (torchrun: every rank has its own command line); what comes back is rank 0's affair.
_PINNED = tuple(name for name in RunOptions.fields() if name != "outputs")


class ClusterError(RuntimeError):
    """The cluster failed; the message names the rank (lost, failed or refused)."""


class HandshakeError(ClusterError):
    """A rank failed authentication or does not match rank 0 (version, model, settings)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


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


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 86400:
        raise ValueError(f"timeout: expected seconds in [1, 86400], got {timeout!r}")
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


class _Group:
    """This process's end of the gloo group and the store: the pieces the
    coordinator and a worker share."""

    def __init__(self, rank: int, world: int, host: str, port: int, timeout: float, *, ifname: str | None,
                 store: dist.TCPStore | None = None):
        if dist.is_initialized():
            raise ClusterError("cluster: this process already belongs to a torch.distributed group "
                               "(one cluster per process; close the other first)")
        self.rank, self.world = rank, world
        delta = datetime.timedelta(seconds=timeout)
        self.store = store or dist.TCPStore(host, port, world, is_master=False, timeout=delta)
        saved = os.environ.get("GLOO_SOCKET_IFNAME")
        if ifname:  # gloo reads its interface at init time only
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("gloo", self.store), rank=rank, world_size=world,
                                    timeout=delta)
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
        as this rank sees them; sets the session key."""
        nonce = torch.tensor(list(secrets.token_bytes(32)), dtype=torch.uint8)
        nonces = [torch.empty(32, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(nonces, nonce)
        transcript = b"".join(bytes(n.tolist()) for n in nonces)
        mine = torch.tensor(list(_mac(token, b"prism-auth", str(self.rank).encode(), transcript)), dtype=torch.uint8)
        macs = [torch.empty(32, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(macs, mine)
        bad = [q for q in range(self.world)
               if not hmac.compare_digest(bytes(macs[q].tolist()), _mac(token, b"prism-auth", str(q).encode(), transcript))]
        self.key = _mac(token, b"prism-session", transcript)
        return bad

    def put(self, key: str, payload: bytes) -> None:
        self.store.set(key, _mac(self.key, key.encode(), payload) + payload)

    def take(self, key: str, limit: int) -> bytes:
        """A tagged value rank 0 put in the store: checked before it is parsed."""
        raw = self.store.get(key)
        if len(raw) < _TAG or len(raw) > _TAG + limit:
            raise ClusterError(f"rank 0: {key} has {len(raw)} bytes (allowed {_TAG}..{_TAG + limit})")
        tag, payload = bytes(raw[:_TAG]), bytes(raw[_TAG:])
        if not hmac.compare_digest(tag, _mac(self.key, key.encode(), payload)):
            raise ClusterError(f"rank 0: {key} is not signed with this session's key (tampered or stale)")
        return payload

    def close(self) -> None:
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
    request. ``c(inputs, cr=...)`` and ``c.generate(...)`` take the arguments
    of :class:`prism_ext.PrismModel` (``devices`` is the cluster's size, or 1
    for the single-device peer run on rank 0 alone). Use as a context manager,
    or call :meth:`close`. See :func:`cluster`."""

    def __init__(self, model, devices: int | None = None, *, master: str | None = None, world: int | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT, threads: int | None = None,
                 worker_threads: int | None = None, device_weights=None, auto_weights: bool = False,
                 ifname: str | None = None, pinned: RunOptions | None = None, quiet: bool = True):
        self.model = model if isinstance(model, PrismModel) else load(model)
        if self.model.directory is None:
            raise ValueError("model: a cluster needs a model loaded from a directory or a bundled name "
                             "(workers load it themselves)")
        self.timeout = _check_timeout(timeout)
        self.closed: str | None = "starting"
        self._procs: dict[int, subprocess.Popen] = {}
        self._group: _Group | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._address: tuple[str, int] | None = None
        self._watch: dist.TCPStore | None = None  # the health check's own store client (any thread)
        self._watch_lock = threading.Lock()
        self._beats: dict[int, tuple[int, float]] = {}
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
        self._runner = TaskThread("prism-rank0")  # rank 0's part of each request
        try:
            set_threads(threads)
            # Under torchrun its agent already serves the rendezvous store at MASTER_PORT: join it as a client.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            # A previous cluster's store listens until its last reference goes, and a failed
            # exchange's traceback holds it (through gloo's pending work and the process group)
            # in a reference cycle: collect it, so this one can listen at the same address.
            gc.collect()
            store = dist.TCPStore(host, port, world, is_master=not agent_store,
                                  timeout=datetime.timedelta(seconds=self.timeout), wait_for_workers=False)
            self._address = (host, store.port)
            if master is None:
                self._spawn(store.port, world, token, worker_threads or max(1, (os.cpu_count() or 1) // world))
            self._say(f"rank 0 waiting for {world - 1} worker(s) at {host}:{store.port}")
            self._group = self._rendezvous(host, store, ifname)
            self._handshake(token_b)
            self.closed = None
            if auto_weights:
                self.calibrate()
        except BaseException as exc:
            self._teardown(f"start failed: {_first_line(exc)}")
            if isinstance(exc, (ClusterError, ValueError, TypeError, KeyboardInterrupt)):
                raise
            raise ClusterError(f"cluster: could not start: {self._diagnose(exc)}") from exc

    # ------------------------------------------------------------ start-up

    def _spawn(self, port: int, world: int, token: str, threads: int) -> None:
        env = dict(os.environ, PRISM_TOKEN=token, OMP_NUM_THREADS=str(threads))
        for r in range(1, world):
            argv = [sys.executable, "-m", "prism_ext", "worker", "--master", f"127.0.0.1:{port}", "--rank", str(r),
                    "--world", str(world), "--threads", str(threads), "--timeout", str(self.timeout),
                    "--ifname", "lo"]
            # cwd: `-m` searches the working directory first; start where this very package lies.
            # A session of their own: Ctrl-C in a terminal reaches rank 0 only, which decides
            # when the workers stop (a server drains its requests first); a lost rank 0 still
            # ends them (their heartbeat loses its store).
            self._procs[r] = subprocess.Popen(argv, env=env, cwd=_PACKAGE_PARENT, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, start_new_session=True)

    def _rendezvous(self, host: str, store, ifname) -> _Group:
        """Join the gloo group; meanwhile watch the local workers, so one that
        dies at start-up is reported at once instead of after the timeout."""
        box: dict = {}

        def join():
            try:
                box["group"] = _Group(0, self.world, host, store.port, self.timeout, ifname=ifname, store=store)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                box["error"] = exc

        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            for r, p in self._procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"rank {r} exited during start-up ({_exit_status(p.returncode)}); "
                                       f"its error is above")
        if "error" in box:
            raise box["error"]
        return box["group"]

    def _handshake(self, token: bytes) -> None:
        g = self._group
        bad = g.authenticate(token)
        if bad:
            raise HandshakeError("; ".join(f"rank {q}: authentication failed: it does not hold this cluster's "
                                           f"token (--token / PRISM_TOKEN)" for q in bad))
        m = self.model
        session = {"model": str(m.directory.resolve()), "model_type": m.model_type}
        g.put("session", json.dumps(session).encode())
        claims = g.transport.exchange_meta(_claims(m, self.settings))
        wrong = _mismatches(claims)
        if wrong:
            raise HandshakeError("; ".join(wrong))
        self._say(f"{self.world} devices ready (prism-ext {__version__}, {m.model_type}, "
                  f"weights {m.net.weights_digest()[:12]})")

    # ------------------------------------------------------------ requests

    def __call__(self, inputs=None, *, devices: int | None = None, options: RunOptions | None = None,
                 **kwargs) -> PrismOutput:
        """Run one forward pass on the cluster (see :meth:`PrismModel.__call__`)."""
        self._check_open()
        m = self.model
        inputs, options = m.split_arguments(inputs, options, kwargs)
        options = self._defaults(devices, options)
        request = plan(m.net, inputs, options, devices=self._devices(devices, options.mode),
                       special_ids=m.special_ids)
        collected = self._submit(inputs, request)
        return PrismOutput(collected.fields, run_stats(request, collected))

    def generate(self, input_ids, *, devices: int | None = None, options: RunOptions | None = None,
                 max_new_tokens: int = 20, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, eos_token_id: int | None = None, return_stats: bool = False,
                 on_token=None, **kwargs):
        """GPT-2 generation on the cluster (see :meth:`PrismModel.generate`):
        the prefill on every process, decoding on the last one, tokens back to rank 0.
        ``on_token``: called on rank 0 with each step's new tokens [B] as
        soon as the last device picks them (the last device streams them);
        it runs on the cluster's request thread and must not block for long."""
        self._check_open()
        options = self._defaults(devices, run_options(options, **kwargs))
        sampling = GenerateOptions(max_new_tokens, temperature, top_k, seed, eos_token_id, on_token is not None)
        inputs, request = self.model.generate_request(input_ids, self._devices(devices, options.mode), options,
                                                      sampling)
        collected = self._submit(inputs, request, on_token)
        ids = torch.cat([inputs["input_ids"].long(), collected.tokens], dim=1)
        return (ids, run_stats(request, collected), collected.decode) if return_stats else ids

    def _devices(self, devices, mode) -> int:
        if devices is None or devices == self.world or (devices == 1 and mode in ("single", "prism")):
            return self.world if devices is None else devices
        raise ValueError(f"devices: this cluster has {self.world} devices (or 1 for the single-device run), "
                         f"got {devices!r}")

    def _defaults(self, devices, options: RunOptions) -> RunOptions:
        """``devices=1`` is the single-device run on rank 0; device weights
        not given are the cluster's (set, or measured by :meth:`calibrate`)."""
        if devices == 1 and options.mode == "prism":
            options = options.replace(mode="single")
        if options.device_weights is None and self.device_weights is not None:
            options = options.replace(device_weights=self.device_weights)
        return options

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
            seq = self._seq
            for r in range(1, self.world):
                g.put(f"req/{seq}/{r}", blobs[r])
            g.store.set(f"req/{seq}", b"run")
            if seq > 1:  # every worker read its previous request before answering it
                for r in range(1, self.world):
                    g.store.delete_key(f"req/{seq - 1}/{r}")
            g.transport.max_frame_bytes = _frame_bound(m, request)
            collected = self._guarded(lambda: run(m.net, req, local, 0, g.transport, on_token), f"request {seq}")
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
        speed from now on; returns the weights (relative speeds)."""
        self._check_open()
        with self._lock:
            g = self._group
            self._seq += 1
            g.store.set(f"req/{self._seq}", b"calibrate")
            seconds = self._guarded(lambda: _calibration_exchange(self.model, g), "calibration")
        fastest = min(seconds)
        self.device_weights = [round(fastest / s, 3) for s in seconds]
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
        time.sleep(0.3)  # let dying peers' error reports land
        for r, p in self._procs.items():
            if p.poll() is not None and p.returncode < 0:
                return f"rank {r} lost: its process {_exit_status(p.returncode)} ({_first_line(exc)})"
        g = self._group
        if g is None:
            return _first_line(exc)
        try:
            beats = {r: g.store.add(f"alive/{r}", 0) for r in range(1, self.world)}
            time.sleep(4 * _HEARTBEAT)
            stale = [r for r in beats if g.store.add(f"alive/{r}", 0) == beats[r]]
            errors = {r: bytes(g.store.get(f"error/{r}")).decode(errors="replace")[:500]
                      for r in range(1, self.world) if g.store.check([f"error/{r}"])}
        except Exception:  # noqa: BLE001 - the store is ours; if it fails, say what we know
            return _first_line(exc)
        silent = [r for r in stale if r not in errors]
        if silent:
            return (f"rank {silent[0]} lost: no heartbeat for {4 * _HEARTBEAT:.0f} s and no error report (process "
                    f"killed, hung, or network down) ({_first_line(exc)})")
        own = [r for r, e in errors.items() if not _peer_loss(e)]
        if own:
            return f"rank {own[0]} failed: {errors[own[0]]}"
        for r, p in self._procs.items():
            if p.poll() is not None and p.returncode != 0 and r not in errors:
                return f"rank {r} lost: its process {_exit_status(p.returncode)} ({_first_line(exc)})"
        if errors:
            r = min(errors)
            return f"rank {r} failed: {errors[r]}"
        return _first_line(exc)

    def lost_ranks(self) -> dict[int, str]:
        """The ranks that look lost now, each with why: a local worker whose
        process ended, or a worker whose heartbeat has not moved for 5 s
        (between calls of this method). Safe from any thread and while a
        request runs (its own store client); {} for a closed cluster."""
        if self.closed is not None:
            return {}
        with self._watch_lock:
            lost = {r: f"rank {r} lost: its process {_exit_status(p.returncode)}"
                    for r, p in self._procs.items() if p.poll() is not None}
            try:
                if self._watch is None:
                    self._watch = dist.TCPStore(*self._address, is_master=False,
                                                timeout=datetime.timedelta(seconds=5))
                now = time.monotonic()
                for r in range(1, self.world):
                    beats = self._watch.add(f"alive/{r}", 0)
                    seen, since = self._beats.get(r, (-1, now))
                    if beats != seen:
                        self._beats[r] = (beats, now)
                    elif now - since > _STALE and r not in lost:
                        lost[r] = f"rank {r} lost: no heartbeat for {now - since:.1f} s"
            except Exception as exc:  # noqa: BLE001 - rank 0's own store failing is a loss too
                if self.closed is None:
                    lost[0] = f"rank 0: its store does not answer ({_first_line(exc)})"
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
        self.closed = reason
        g = self._group
        if g is not None:
            with contextlib.suppress(Exception):
                g.store.set("abort", reason.encode()[:1000])
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
        with self._watch_lock:
            self._watch = None

    def close(self) -> None:
        """Stop every worker (they exit cleanly) and leave the group."""
        if self.closed is not None:
            return
        with self._lock:
            g = self._group
            self._seq += 1
            with contextlib.suppress(Exception):
                g.store.set(f"req/{self._seq}", b"close")
                deadline = time.monotonic() + 10
                while (g.store.add("closed", 0) < self.world - 1 and time.monotonic() < deadline
                       and not (self._procs and all(p.poll() is not None for p in self._procs.values()))):
                    time.sleep(0.05)
            self._teardown("closed")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        state = "open" if self.closed is None else f"closed: {self.closed}"
        return f"Cluster({self.model.model_type}, devices={self.world}, {state})"


def cluster(model, devices: int | None = None, **kwargs) -> Cluster:
    """Start a live cluster for ``model`` (a :class:`PrismModel`, a checkpoint
    directory or a bundled name).

    ``devices=P`` starts P - 1 worker processes on this machine over loopback
    (this process is rank 0 and computes too). ``master="HOST:PORT",
    world=P`` instead waits for ``prism worker`` processes started on other
    boards (``token`` or PRISM_TOKEN is then required). Other options:
    ``timeout`` (seconds for every exchange, default 60), ``threads`` (this
    process), ``worker_threads`` (local workers; default cores // P),
    ``device_weights`` or ``auto_weights=True`` (time every rank, split by
    speed), ``ifname`` (gloo's network interface), ``quiet``."""
    return Cluster(model, devices, **kwargs)


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


# ---------------------------------------------------------------- worker


def _liveness(host: str, port: int, rank: int, timeout: float, closing: threading.Event) -> None:
    """Worker heartbeat: bump ``alive/<rank>`` in rank 0's store; exit when
    rank 0 aborts or its store disappears (the coordinator is gone)."""
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        while True:
            store.add(f"alive/{rank}", 1)
            if store.check(["abort"]) and not closing.is_set():
                reason = bytes(store.get("abort")).decode(errors="replace")
                worker_exit(rank, 1, f"rank 0 aborted the cluster: {reason}")
            time.sleep(_HEARTBEAT)
    except Exception as exc:  # noqa: BLE001 - any store failure means rank 0 is gone
        if not closing.is_set():
            worker_exit(rank, 1, f"lost the coordinator (rank 0): {_first_line(exc)}")


def worker_exit(rank: int, code: int, message: str | None) -> None:
    """End a worker process now, with ``code`` (and ``message`` on stderr)."""
    if message:
        print(f"prism worker (rank {rank}): {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)  # gloo threads may still be blocked on dead peers: do not wait for them


def worker_main(master: str, rank: int, world: int, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                threads: int | None = None, ifname: str | None = None, model: str | None = None,
                pinned: RunOptions | None = None) -> int:
    """Run rank ``rank`` until rank 0 closes the cluster (exit status 0),
    fails (1), or the handshake refuses this rank (2). ``model`` overrides
    the path rank 0 announces (the checkpoint lives elsewhere on this board);
    ``pinned``: this rank's own run options, checked against rank
    0's (torchrun, where every rank has its own command line)."""
    host, port = parse_master(master)
    _check_world(world, rank)
    if rank == 0:
        raise ValueError("rank: rank 0 is the coordinator (prism run / prism_ext.cluster), not a worker")
    timeout = _check_timeout(timeout)
    token_b = _token_bytes(token)
    set_threads(threads)
    closing = threading.Event()
    g = None
    try:
        g = _Group(rank, world, host, port, timeout, ifname=ifname)
        bad = g.authenticate(token_b)
        if bad:
            who = "this rank's token differs from rank 0's" if 0 in bad or rank in bad else f"ranks {bad} failed"
            raise HandshakeError(f"authentication failed: {who} (--token / PRISM_TOKEN)")
        g.store.wait(["session"])
        session = json.loads(g.take("session", 1 << 16))
        path = model or session.get("model")
        if not isinstance(path, str):
            raise HandshakeError("rank 0 announced no model")
        try:
            m = load(path)
        except (OSError, ValueError) as exc:
            m = None
            load_error = _first_line(exc)
        claims = _claims(m, _pinned_meta(pinned)) if m is not None else {"version": __version__, "model_type": None,
                                                             "config": f"unloadable: {load_error}", "weights": None}
        wrong = _mismatches(g.transport.exchange_meta(claims))
        if m is None:
            raise HandshakeError(f"cannot load model {path!r}: {load_error}")
        if wrong:
            raise HandshakeError("; ".join(wrong))
        threading.Thread(target=_liveness, args=(host, port, rank, timeout, closing), daemon=True).start()
        print(f"prism worker (rank {rank}): ready ({m.model_type}, {world} devices)", file=sys.stderr, flush=True)
        seq = 0
        while True:
            seq += 1
            op = _wait_for(g, f"req/{seq}")
            if op == b"close":
                closing.set()
                g.store.add("closed", 1)
                return 0
            if op == b"calibrate":
                _calibration_exchange(m, g)
                continue
            if op != b"run":
                raise ClusterError(f"rank 0: unknown operation {op[:20]!r}")
            req, local = decode_request(g.take(f"req/{seq}/{rank}", 1 << 30), m.net, rank, world)
            g.transport.max_frame_bytes = _frame_bound(m, req)
            with torch.no_grad():
                run(m.net, req, local, rank, g.transport)
    except HandshakeError as exc:
        print(f"prism worker (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 and on stderr
        message = _first_line(exc)
        if g is not None:
            with contextlib.suppress(Exception):
                g.store.set(f"error/{rank}", message.encode()[:1000])
        print(f"prism worker (rank {rank}): {message}", file=sys.stderr, flush=True)
        return 1


def _wait_for(g: _Group, key: str) -> bytes:
    """Wait (idle, for ever) until rank 0 signals ``key``. A lost store ends
    the wait at once (connection closed); a hung rank 0 is caught by the
    heartbeat thread, whose store calls then time out."""
    while True:
        try:
            g.store.wait([key], datetime.timedelta(hours=1))
            return bytes(g.store.get(key))
        except dist.DistStoreError as exc:
            if "timeout" not in str(exc).lower():
                raise
