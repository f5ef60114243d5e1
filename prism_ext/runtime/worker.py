"""Ranks 1..P-1: ``prism worker`` (:func:`worker_main`) joins rank 0, passes
the handshake and serves request after request until rank 0 closes the cluster."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from .._version import __version__
from ..api import load
from ..options import RunOptions
from ..executor.request import decode_request, run
from .session import (CONTROL_FROM_RANK0, ClusterError, DEFAULT_JOIN_TIMEOUT, DEFAULT_TIMEOUT, Group, HEARTBEAT,
                      HandshakeError, Link, NotFormed, Rendezvous, calibration_exchange, check_timeout, check_world,
                      claims_of, first_line, frame_bound, link_failure, mismatches, parse_master, pinned_meta,
                      read_world, set_threads, token_bytes)


def _join(host: str, port: int, rank: int, world: int, join_timeout: float, ifname: str | None) -> Group:
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
                raise NotFormed(f"no coordinator (rank 0) at {host}:{port} formed a cluster with this worker "
                                 f"within {join_timeout:g} s (--join-timeout); last attempt: "
                                 f"{first_line(exc)}") from None
            time.sleep(1.0)  # nothing to wait on: rank 0 is not there yet


def _join_once(host: str, port: int, rank: int, world: int, timeout: float, ifname: str | None) -> Group:
    # A plain connection first: while rank 0 is not listening, c10d's client would log every retry.
    socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    store = Rendezvous(dist.TCPStore(host, port, world, is_master=False,
                                      timeout=datetime.timedelta(seconds=timeout)), timeout)
    try:
        # Say which world this worker was started for (rank 0 names a mismatch at once), and
        # check rank 0's: gloo itself would wait for a rank that never comes, then time out.
        store.set(f"prism/hello/{rank}", str(world).encode())
        store.wait(["prism/world"])
        theirs = read_world(store, "prism/world")
        if theirs != world:
            raise HandshakeError(f"world: this worker was started with --world {world}; rank 0's cluster has "
                                 f"{theirs} devices")
        return Group(rank, world, store, timeout, ifname=ifname)
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
                model: str | None = None, pinned: RunOptions | None = None, quiet: bool = False) -> int:
    """Run rank ``rank`` until rank 0 closes the cluster (exit status 0),
    fails (1), or the handshake refuses this rank (2). ``join_timeout``:
    seconds to keep trying to form the cluster with rank 0; ``timeout``: any
    exchange, and the longest rank 0 may stay silent once formed (the worker
    then exits: rank 0 hung or cut off). ``model`` overrides the path rank 0
    announces (the checkpoint lives elsewhere on this board); ``pinned``:
    this rank's own run options, checked against rank 0's (torchrun, where
    every rank has its own command line). ``quiet``: no "ready" line (errors
    are still printed)."""
    host, port = parse_master(master)
    world, rank = check_world(world, rank)
    if rank == 0:
        raise ValueError("rank: rank 0 is the coordinator (prism run / prism_ext.cluster), not a worker")
    timeout = check_timeout(timeout)
    join_timeout = check_timeout(join_timeout, "join_timeout")
    token_b = token_bytes(token)
    set_threads(threads)
    closing = threading.Event()
    g = link = None
    try:
        g = _join(host, port, rank, world, join_timeout, ifname)
        bad = g.authenticate(token_b)
        if bad:
            who = "this rank's token differs from rank 0's" if 0 in bad or rank in bad else f"ranks {bad} failed"
            raise HandshakeError(f"authentication failed: {who} (--token / PRISM_TOKEN)")
        link = Link(g, 0)
        op, payload = link.recv(1 << 16, join_timeout)
        if op != "session":
            raise HandshakeError(f"rank 0 sent {op!r} where the session belongs")
        session = json.loads(payload)
        path = model or (session.get("model") if isinstance(session, dict) else None)
        if not isinstance(path, str):
            raise HandshakeError("rank 0 announced no model")
        try:
            # rank 0's weight dtype: every device quantizes the same checkpoint the same way
            m = load(path, weight_dtype=session.get("weight_dtype", "fp32"))
        except (OSError, ValueError) as exc:
            m = None
            load_error = first_line(exc)
        claims = claims_of(m, pinned_meta(pinned)) if m is not None else {"version": __version__, "model_type": None,
                                                             "config": f"unloadable: {load_error}", "weights": None}
        wrong = mismatches(g.transport.exchange_meta(claims))
        if m is None:
            raise HandshakeError(f"cannot load model {path!r}: {load_error}")
        if wrong:
            raise HandshakeError("; ".join(wrong))
        g.serve(timeout)
        ops: queue.SimpleQueue = queue.SimpleQueue()
        interval = min(HEARTBEAT, timeout / 4)
        threading.Thread(target=_worker_listen, args=(link, rank, timeout, ops, closing), daemon=True).start()
        threading.Thread(target=_worker_beat, args=(link, rank, interval, closing), daemon=True).start()
        if not quiet:
            print(f"prism worker (rank {rank}): ready ({m.model_type}, {world} devices)", file=sys.stderr, flush=True)
        while True:
            op, payload = ops.get()
            if op == "close":
                link.send("closed")
                return 0
            if op == "calibrate":
                calibration_exchange(m, g)
                continue
            req, local = decode_request(payload, m.net, rank, world)
            g.transport.max_frame_bytes = frame_bound(m, req)
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


def _worker_listen(link: Link, rank: int, timeout: float, ops: queue.SimpleQueue, closing: threading.Event) -> None:
    """A worker's control frames from rank 0, received as they come (also
    while a request runs): pings prove rank 0 alive, abort ends the worker
    at once, the rest go to the main thread in order. Nothing from rank 0
    for ``timeout`` seconds (it pings twice a second): it is hung or cut
    off, and this worker exits."""
    last = time.monotonic()
    while True:
        try:
            op, payload = link.recv(CONTROL_FROM_RANK0, timeout)
        except BaseException as exc:  # noqa: BLE001 - the coordinator is gone
            if not closing.is_set():
                why = link_failure(exc, time.monotonic() - last).replace("no heartbeat", "nothing")
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


def _worker_beat(link: Link, rank: int, interval: float, closing: threading.Event) -> None:
    """A worker's heartbeat to rank 0, every ``interval`` seconds."""
    try:
        while not closing.wait(interval):
            link.send("alive")
    except Exception as exc:  # noqa: BLE001 - rank 0 is gone (or hung: the send timed out)
        if not closing.is_set():
            worker_exit(rank, 1, f"lost the coordinator (rank 0): {first_line(exc)}")


def keep_serving(argv: list[str], rank: int, master: str, quiet: bool = False) -> int:
    """``prism worker --serve``: run ``argv`` (a one-cluster ``prism worker``
    command line) again each time it ends, so that this device joins the next
    cluster at ``master`` after a run ends, rank 0 dies or a handshake is
    refused. Each cluster runs in a process of its own: gloo's state and
    threads blocked on a dead peer go with it. SIGINT or SIGTERM stops the
    current one and returns 0."""
    import signal
    import subprocess

    stop = threading.Event()
    child: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        stop.set()
        for p in child:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    say = (lambda msg: None) if quiet else (lambda msg: print(f"prism worker (rank {rank}): {msg}", file=sys.stderr,
                                                                  flush=True))
    try:
        joins = 0
        while not stop.is_set():
            joins += 1
            say(f"joining rank 0 at {master} (cluster {joins})")
            # A session of its own: Ctrl-C reaches this process, which decides how the cluster's process ends.
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            child[:] = [p]
            code = p.wait()
            child.clear()
            if stop.is_set():
                break
            why = {0: "rank 0 closed the cluster", 1: "the cluster failed or rank 0 was lost",
                   2: "the handshake refused this device"}.get(code, f"exit status {code}")
            say(f"cluster {joins} ended ({why}); joining the next one")
            if code != 0:
                stop.wait(1.0)  # a refused or failed join is not retried in a tight loop
        say("stopped")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in child:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()
                p.wait()
