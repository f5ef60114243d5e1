"""Rank 0: :class:`Cluster`, the executor whose devices are processes, and
:func:`cluster`, which starts one and returns the model bound to it."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import torch.distributed as dist

from .._version import __version__
from ..api import PrismModel, load
from ..comm.dist import TaskThread
from ..method.engine import Collected
from ..options import RunOptions
from ..executor.local import simulate
from ..executor.request import Request, count_inputs, decode_request, encode_request, local_inputs, run
from .session import (CONTROL_FROM_WORKER, ClusterError, DEFAULT_START_TIMEOUT, DEFAULT_TIMEOUT, Group, HEARTBEAT,
                      EXIT_SETTLE, HandshakeError, Link, MemoryWatch, PACKAGE_PARENT, REPORTS, Rendezvous, STALE,
                      STORE_GROWTH, calibration_exchange, check_timeout, check_world, claims_of, exit_status, first_line,
                      frame_bound, link_failure, listen, mismatches, parse_master, peer_loss, pinned_meta,
                      read_world, set_threads, timed_out, token_bytes)


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
        self.timeout = check_timeout(timeout)
        self.start_timeout = check_timeout(DEFAULT_START_TIMEOUT if start_timeout is None else start_timeout,
                                            "start_timeout")
        self.closed: str | None = "starting"
        self._procs: dict[int, subprocess.Popen] = {}
        self._group: Group | None = None
        self._links: dict[int, Link] = {}
        self._seq = 0
        self._lock = threading.Lock()  # one request at a time
        self._news = threading.Condition()  # the control threads' findings, below
        self._seen: dict[int, float] = {}  # rank -> when its last control frame came
        self._gone: dict[int, str] = {}  # rank -> why its link ended
        self._reset: set[int] = set()  # ranks whose link ended (not merely went quiet): their process may be dying
        self._errors: dict[int, str] = {}  # rank -> the error it reported
        self._closed_ranks: set[int] = set()  # ranks that acknowledged close()
        self._control_error: str | None = None  # rank 0's own control thread failed
        self._stop = threading.Event()  # ends the control threads
        self._threads: list[threading.Thread] = []
        self._say = (lambda msg: None) if quiet else (lambda msg: print(f"prism: {msg}", file=sys.stderr, flush=True))
        if master is None:  # P processes on this machine, over loopback
            world, _ = check_world(devices if world is None else world)
            if devices is not None and devices != world:
                raise ValueError(f"devices: {devices} differs from world {world}")
            host, port, ifname = "127.0.0.1", 0, ifname or "lo"
            token = token or os.environ.get("PRISM_TOKEN") or secrets.token_hex(16)
            # P processes share this machine's cores: each gets its share, rank 0 too
            # (with torch's default, all cores, rank 0 and the workers oversubscribe them).
            share = max(1, (os.cpu_count() or 1) // world)
            threads, worker_threads = threads or share, worker_threads or share
            self._say(f"threads per device: rank 0 {threads}, workers {worker_threads} "
                      f"({os.cpu_count()} cores, {world} devices; --threads sets rank 0's)")
        else:
            host, port = parse_master(master)
            world, _ = check_world(world if world is not None else devices)
        self.world = world
        token_b = token_bytes(token)
        self.device_weights = device_weights
        self.settings = pinned_meta(pinned)
        if device_weights is not None:
            self.settings["device_weights"] = RunOptions(device_weights=device_weights).to_meta()["device_weights"]
        set_threads(threads)
        self._runner = TaskThread("prism-rank0")  # rank 0's part of each request
        rendezvous = None
        try:
            # From before the store listens: whatever an outsider writes into it counts.
            memory = MemoryWatch()
            rendezvous, port = self._open_store(host, port)
            if master is None:
                self._spawn(port, world, token, worker_threads, quiet)
            self._say(f"rank 0 waiting for {world - 1} worker(s) at {host}:{port}")
            self._group = self._rendezvous(rendezvous, ifname, memory)
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

    def _open_store(self, host: str, port: int) -> tuple[Rendezvous, int]:
        """This formation's rendezvous store, on ``host`` only (a socket we
        bind, handed to the TCPStore), with this cluster's world in it."""
        delta = datetime.timedelta(seconds=self.start_timeout)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            # Under torchrun its agent already serves the rendezvous store at MASTER_PORT: join it as a client.
            store = dist.TCPStore(host, port, self.world, is_master=False, timeout=delta)
        else:
            sock = listen(host, port)
            port = sock.getsockname()[1]
            store = dist.TCPStore(host, port, self.world, is_master=True, timeout=delta, wait_for_workers=False,
                                  master_listen_fd=sock.detach())
        store.set("prism/world", str(self.world).encode())
        return Rendezvous(store, self.start_timeout), port

    def _spawn(self, port: int, world: int, token: str, threads: int, quiet: bool) -> None:
        env = dict(os.environ, PRISM_TOKEN=token, OMP_NUM_THREADS=str(threads))
        for r in range(1, world):
            argv = [sys.executable, "-m", "prism_ext", "worker", "--master", f"127.0.0.1:{port}", "--rank", str(r),
                    "--world", str(world), "--threads", str(threads), "--timeout", str(self.timeout),
                    "--join-timeout", str(self.start_timeout), "--ifname", "lo"] + (["--quiet"] if quiet else [])
            # cwd: `-m` searches the working directory first; start where this very package lies.
            # A session of their own: Ctrl-C in a terminal reaches rank 0 only, which decides
            # when the workers stop (a server drains its requests first); a lost rank 0 still
            # ends them (their link to it closes, or stays silent past the timeout).
            self._procs[r] = subprocess.Popen(argv, env=env, cwd=PACKAGE_PARENT, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, start_new_session=True)

    def _rendezvous(self, store: Rendezvous, ifname, memory: MemoryWatch) -> Group:
        """Join the gloo group; meanwhile watch what can end the formation
        early: a local worker that dies, a worker started for another world
        (each writes its own), and the store growing rank 0's memory."""
        box: dict = {}

        def join():
            try:
                box["group"] = Group(0, self.world, store, self.start_timeout, ifname=ifname)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                box["error"] = exc

        checked: set[int] = set()
        t = threading.Thread(target=join, name="prism-rendezvous", daemon=True)
        t.start()
        try:
            while t.is_alive():
                t.join(0.05)
                for r, p in self._procs.items():
                    if p.poll() is not None:
                        raise ClusterError(f"rank {r} exited during start-up ({exit_status(p.returncode)}); "
                                           f"its error is above")
                grown = memory.grown()
                if grown > STORE_GROWTH:
                    raise ClusterError(f"rendezvous: rank 0 grew by {grown >> 20} MiB while its store was open "
                                       f"(someone is writing to it); formation stopped")
                for r in range(1, self.world):
                    if r not in checked and store.check([f"prism/hello/{r}"]):
                        checked.add(r)
                        theirs = read_world(store, f"prism/hello/{r}")
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
        self._links = {r: Link(g, r) for r in range(1, self.world)}
        session = json.dumps({"model": str(m.directory.resolve()), "model_type": m.model_type,
                              "weight_dtype": m.net.weight_dtype}).encode()
        for link in self._links.values():
            link.send("session", session)
        claims = g.transport.exchange_meta(claims_of(m, self.settings))
        wrong = mismatches(claims)
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
        return min(HEARTBEAT, self.timeout / 4)

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

    def _read(self, link: Link) -> None:
        """What a worker sends rank 0: heartbeats, its error report, its
        acknowledgement of close. Nothing for the timeout ends the link."""
        r = link.peer
        while not self._stop.is_set():
            try:
                op, payload = link.recv(CONTROL_FROM_WORKER, self.timeout)
            except BaseException as exc:  # noqa: BLE001 - a lost link is a lost rank
                with self._news:
                    if not self._stop.is_set():
                        self._gone[r] = link_failure(exc, time.monotonic() - self._seen.get(r, time.monotonic()))
                        if not timed_out(exc):
                            self._reset.add(r)
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
            g.transport.max_frame_bytes = frame_bound(m, request)

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
        gone: dict[int, str] = {}
        try:
            while not done.wait(0.1) and not gone:
                gone = self.lost_ranks(quiet=False)
        except KeyboardInterrupt:
            self._teardown("interrupted (Ctrl-C)")
            done.wait(5)
            raise
        if not done.is_set():
            # A rank is certainly gone (its process ended or its link did) and the request is
            # still waiting on it: gloo can miss a peer's death and wait out the whole timeout.
            reason = self._diagnose(ClusterError("rank 0 stopped waiting for the request"))
            self._teardown(reason, abandon=True)
            raise ClusterError(f"cluster: {what} failed: {reason}")
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
                return calibration_exchange(self.model, g)

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
            self._news.wait_for(lambda: all(r in self._errors or r in self._gone for r in workers), REPORTS)
            errors, gone, seen, reset = dict(self._errors), dict(self._gone), dict(self._seen), set(self._reset)
        for r in reset:  # a killed process's sockets reset before its exit status exists: wait for it
            if r in self._procs and r not in errors:
                try:
                    self._procs[r].wait(EXIT_SETTLE)
                except subprocess.TimeoutExpired:
                    pass
        for r, p in self._procs.items():
            if p.poll() is not None and p.returncode < 0:
                return f"rank {r} lost: its process {exit_status(p.returncode)} ({first_line(exc)})"
        if not workers:  # failed while forming: the exception says it (errors from peers name the rank)
            return first_line(exc)
        now = time.monotonic()
        silent = [r for r in workers if r not in errors]
        if silent:
            r = silent[0]
            why = gone.get(r) or f"no heartbeat for {now - seen.get(r, now):.1f} s"
            return (f"rank {r} lost: {why} and no error report (process killed, hung, or network down) "
                    f"({first_line(exc)})")
        own = [r for r, e in errors.items() if not peer_loss(e)]
        if own:
            return f"rank {own[0]} failed: {errors[own[0]]}"
        for r, p in self._procs.items():
            if p.poll() is not None and p.returncode != 0 and r not in errors:
                return f"rank {r} lost: its process {exit_status(p.returncode)} ({first_line(exc)})"
        if errors:
            r = min(errors)
            return f"rank {r} failed: {errors[r]}"
        return first_line(exc)

    def lost_ranks(self, quiet: bool = True) -> dict[int, str]:
        """The ranks that look lost now, each with why: a local worker whose
        process ended, a worker whose link to rank 0 ended, or (``quiet``) one
        not heard from for 5 s; rank 0 itself if its control thread failed.
        Never blocks (the control threads keep the state); safe from any
        thread and while a request runs; {} for a closed cluster."""
        if self.closed is not None:
            return {}
        lost = {r: f"rank {r} lost: its process {exit_status(p.returncode)}"
                for r, p in self._procs.items() if p.poll() is not None}
        now = time.monotonic()
        with self._news:
            for r in self._links:
                if r in lost:
                    continue
                if r in self._gone:
                    lost[r] = f"rank {r} lost: {self._gone[r]}"
                elif quiet and now - self._seen.get(r, now) > max(STALE, 2 * self._interval()):
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

    def _teardown(self, reason: str, abandon: bool = False) -> None:
        """Stop every process and leave the group. ``abandon``: rank 0's
        part of a request is stuck in gloo waiting on a lost rank; it is not
        waited for (it fails by the exchange timeout; a group destroyed
        under it stays alive until then, and a new one can form meanwhile)."""
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
        # With its peers gone a request in flight fails at once (unless gloo missed
        # their death: abandon); let it end before the group goes away under it.
        self._runner.stop(0 if abandon else 10)
        if g is not None:
            g.close(0 if abandon else 10)
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
    process) and ``worker_threads`` (local workers; both default to
    cores // P for a local cluster, so that P processes do not oversubscribe
    the cores),
    ``device_weights`` or ``auto_weights=True`` (time every rank, split by
    speed), ``ifname`` (gloo's network interface), ``quiet``."""
    return Cluster(model, devices, **kwargs).model


def speed_weights(seconds: list[float]) -> list[float]:
    """Device weights from each rank's calibration time: relative speeds,
    the fastest rank 1.0 (a rank twice as slow gets 0.5, so half the
    positions of the fastest)."""
    fastest = min(seconds)
    return [round(fastest / s, 3) for s in seconds]
