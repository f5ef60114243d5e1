"""Processes and ports for the tests that start real ones (runtime, serve)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pids, seconds: float) -> list[int]:
    """Wait up to ``seconds`` for every process to end; returns those still alive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class Reaper:
    """What a test started, ended in its finalizer whatever happened: the
    processes it started and the clusters it formed, each with every process
    below them (listed before anything is killed: a killed parent's children
    are re-parented and drop out of view). Stopped processes die too."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.clusters: list = []

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kwargs)
        self.procs.append(p)
        return p

    def cluster(self, c):
        self.clusters.append(c)
        return c

    def reap(self) -> None:
        for c in self.clusters:
            with contextlib.suppress(Exception):
                c.abort("the test ended")
        pids = set()
        for p in self.procs:
            if p.poll() is None:  # never signal a pid already reaped: it may belong to someone else now
                pids.add(p.pid)
                pids.update(descendants(p.pid))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=30)
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        wait_gone(list(pids), 30)
