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
        """Abort ``c`` (a model bound to a cluster, or the Cluster) when the test ends."""
        self.clusters.append(getattr(c, "executor", c))
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


def rss(pid: int | str = "self") -> int:
    """Resident memory of a process now, bytes."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pid: int | str = "self") -> set[tuple[str, int]]:
    """(address, port) of every TCP socket of a process in the LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:
                    host, port = f[1].split(":")
                    out.add((_address(host), int(port, 16)))
    return out


def refused(host: str, port: int) -> bool:
    """Whether a TCP connection to (host, port) is refused (nothing listens there)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# `python -c` this with rank 0's HOST:PORT and the token: a worker of a 2-device cluster that passes
# authentication, then announces a 2**40-byte frame in the handshake's first exchange.
HUGE_FRAME_WORKER = """
import sys, time, torch, torch.distributed as dist
import prism_ext.comm.dist as d
from prism_ext.runtime import worker_main

def announce_a_huge_frame(self, blob):  # the handshake's first exchange: say 2**40 bytes are coming
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(self.size)]
    dist.all_gather(sizes, torch.tensor([1 << 40]))
    time.sleep(60)

d.DistTransport._exchange = announce_a_huge_frame
worker_main(sys.argv[1], 1, 2, token=sys.argv[2], timeout=20, ifname="lo")
"""
