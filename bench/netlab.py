"""A shaped-network lab: one Linux network namespace per simulated device.

    with NetLab(ranks=3, rate_mbit=20) as lab:
        p = lab.popen(1, [sys.executable, "-m", "http.server", "--bind", lab.addr(1)])
        ...  # rank 0 reaches rank 1 at lab.addr(1) through a 20 Mbit/s link

What it makes (names carry a per-process prefix, default ``prism-<pid>-<n>-``):

- ``<prefix>hub``: a namespace holding only the bridge ``br0``. The bridge lives
  in its own namespace rather than in the root one so the lab never adds a link,
  address or route to the root namespace (the host's routing and firewall are
  untouched, and a host with br_netfilter + a DROP forward policy, e.g. Docker's,
  cannot eat the bridged traffic); deleting the namespaces removes everything.
- ``<prefix>r<k>``: one namespace per rank with ``lo`` up and ``eth0`` at
  10.77.0.(10+k)/24 (from ``subnet``), one end of a veth pair whose other end,
  ``r<k>``, is a port of ``br0``. The pair is created straight into the two
  namespaces, so even a crash mid-setup leaves nothing in the root namespace.
- a tbf qdisc on both ends of every veth (rank -> bridge on ``eth0``, bridge ->
  rank on ``r<k>``), so each device's link is limited in both directions.

Needs root, ``ip`` and ``tc`` (iproute2). ``python bench/netlab.py --selftest``
checks that the shaping works. Stdlib only: the benchmark and the tests import it
without torch or prism_ext.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

IFNAME = "eth0"  # the rank's interface, inside its namespace
BRIDGE = "br0"
DEFAULT_PREFIX = "prism-"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_seq = itertools.count()


class NetLabError(RuntimeError):
    """The lab cannot be built or used; the message says why and how to fix it."""


def _run(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NetLabError(f"{argv[0]!r} not found: install iproute2 (apt-get install iproute2)") from None
    if check and r.returncode != 0:
        raise NetLabError(f"`{' '.join(argv)}` failed (exit {r.returncode}): {r.stderr.strip()}")
    return r


def tbf_params(rate_mbit: float) -> dict:
    """Token-bucket parameters for a link of ``rate_mbit`` Mbit/s.

    burst (bucket size): the bytes that may leave back to back at line rate. It
    must hold at least one full-size frame, and enough tokens for the time
    between two qdisc wakeups, or the achieved rate falls below the configured
    one (the timer fires late on a loaded 2-core machine). It should also stay
    small, since everything within the burst crosses the link unshaped: a 20 KB
    activation under a 64 KB burst would see no 20 Mbit/s at all. So: 1 ms worth
    of tokens, at least 4 frames (6 KB). That gives 6 KB at 20 Mbit/s (2.4 ms of
    line time), 12.5 KB at 100 Mbit/s, 125 KB at 1 Gbit/s. Larger GSO packets
    than the burst are split by tbf, which costs CPU but no accuracy.

    latency: the longest a packet may wait in the qdisc before it is dropped
    (tc turns it into a byte limit, rate * latency + burst). Like a small switch
    buffer: enough for a TCP flow to keep the link busy (the lab's RTT is tens of
    microseconds) without hiding request latency behind a deep queue; 20 ms is
    50 KB at 20 Mbit/s, 250 KB at 100 Mbit/s, 2.5 MB at 1 Gbit/s.

    Measured here (2 cores, also with 3 busy loops): TCP goodput 0.95-0.96 of
    the rate at 20 and 100 Mbit/s, 0.93-0.98 at 1 Gbit/s; the shortfall is the
    66 header bytes per 1514-byte frame, which tbf counts. A 0.25 ms burst lost
    15% at 1 Gbit/s under load; 4 ms gained little. A 20 KB message takes 8.4 ms
    at 20 Mbit/s, its full serialisation time: the small burst does not leak.
    """
    if rate_mbit <= 0:
        raise ValueError(f"rate_mbit must be > 0 (or None for an unshaped link), got {rate_mbit}")
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(4 * 1514, int(rate_bytes * 1e-3))
    return {"rate_bit": int(rate_mbit * 1e6), "burst_bytes": burst, "latency_ms": 20.0}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    r = _run(["ip", "netns", "list"], check=False)
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    r = _run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _kill_pids(pids: list[int], grace: float = 1.0) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
        if pids:
            time.sleep(0.02)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _delete_netns(names: list[str]) -> None:
    """Kills every process in the namespaces, then deletes them (missing ones are fine)."""
    existing = set(list_netns())
    names = [n for n in names if n in existing]
    pids = [p for n in names for p in _netns_pids(n)]
    if pids:
        _kill_pids(pids)
    for n in names:
        # Deleting a namespace destroys its veth ends, and so their peers.
        _run(["ip", "netns", "del", n], check=False)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Deletes namespaces ``<prefix><pid>-...`` whose pid no longer runs; returns their names.

    Leftovers of a run killed with SIGKILL (or a crashed interpreter): a lab
    always cleans up after itself otherwise. Namespaces of live processes are
    left alone, so this is safe while other labs run.
    """
    pat = re.compile(re.escape(prefix) + r"(\d+)-")
    stale = []
    for name in list_netns():
        m = pat.match(name)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(name)
    _delete_netns(stale)
    return stale


_available: tuple[bool, str] | None = None
_netem: bool | None = None


def _probe(qdisc: list[str]) -> tuple[bool, str]:
    """Builds a throwaway namespace with a veth pair and the given qdisc on it."""
    ns = f"{DEFAULT_PREFIX}{os.getpid()}-probe{next(_seq)}"
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"])
        _run(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root"] + qdisc)
        return True, ""
    except NetLabError as e:
        return False, str(e)
    finally:
        _run(["ip", "netns", "del", ns], check=False)


class NetLab:
    """Namespaces, veth pairs, a bridge and tbf rate limits for ``ranks`` devices.

    ``rate_mbit``: each device's link rate in Mbit/s (both directions), None for
    unshaped. ``prefix``: name prefix of everything made (default
    ``prism-<pid>-<n>-``; keep the ``prism-<pid>-`` form so cleanup_stale can
    recognise leftovers). ``subnet``: rank k gets host 10+k of it.

    ``delay_ms``: one-way delay from any rank to any other, added with netem on
    each rank's outgoing side. netem is missing from many minimal kernels (this
    project's CI VM has none); there a delay raises NetLabError, and the caller
    must add latency in user space instead (e.g. sleep delay_ms before handing
    each message to the socket). ``NetLab.netem_available()`` tells beforehand.

    Everything is removed, and every process started with ``popen`` (and any
    other process left inside the namespaces) is killed, when the ``with`` block
    ends, on an exception, on SIGINT/SIGTERM/SIGHUP (cleanup, then the previous
    handler or the default action), and at interpreter exit.
    """

    def __init__(
        self,
        ranks: int,
        rate_mbit: float | None,
        *,
        prefix: str | None = None,
        subnet: str = "10.77.0.0/24",
        delay_ms: float | None = None,
    ):
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        self.ranks = ranks
        self.rate_mbit = rate_mbit
        self.tbf = tbf_params(rate_mbit) if rate_mbit is not None else None
        self.delay_ms = delay_ms or None
        self.prefix = prefix if prefix is not None else f"{DEFAULT_PREFIX}{os.getpid()}-{next(_seq)}-"
        net = ipaddress.ip_network(subnet)
        if net.version != 4 or net.num_addresses < 10 + ranks + 2:
            raise ValueError(f"subnet {subnet} must be IPv4 with room for hosts 10..{9 + ranks}; use e.g. 10.77.0.0/24")
        self._net = net
        self.hub = f"{self.prefix}hub"
        self._made: list[str] = []  # namespaces created so far, in order
        self._procs: list[subprocess.Popen] = []
        self._prev_handlers: dict[int, object] = {}
        self._open = False
        self._closing = False

    # --- checks -------------------------------------------------------------

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") when a lab can be built here, else (False, why and how to fix)."""
        global _available
        if _available is None:
            _available = NetLab._check()
        return _available

    @staticmethod
    def _check() -> tuple[bool, str]:
        if sys.platform != "linux":
            return False, f"needs Linux network namespaces; this is {sys.platform}"
        if os.geteuid() != 0:
            return False, "needs root to create network namespaces and qdiscs: run as root (e.g. sudo)"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return False, f"`{tool}` not found on PATH: install iproute2 (apt-get install iproute2)"
        ok, why = _probe(["tbf", "rate", "1mbit", "burst", "8k", "latency", "20ms"])
        if not ok:
            return False, f"cannot build a namespace with a shaped veth pair (no CAP_SYS_ADMIN/CAP_NET_ADMIN, or no veth/tbf in the kernel?): {why}"
        return True, ""

    @staticmethod
    def netem_available() -> bool:
        """Whether the kernel has netem (needed for ``delay_ms``)."""
        global _netem
        if _netem is None:
            _netem = NetLab.available()[0] and _probe(["netem", "delay", "1ms"])[0]
        return _netem

    # --- names and addresses ------------------------------------------------

    def netns(self, rank: int) -> str:
        self._check_rank(rank)
        return f"{self.prefix}r{rank}"

    def addr(self, rank: int) -> str:
        self._check_rank(rank)
        return str(self._net.network_address + 10 + rank)

    def ifname(self, rank: int) -> str:
        self._check_rank(rank)
        return IFNAME

    def namespaces(self) -> list[str]:
        """Every namespace the lab makes: the ranks', then the hub."""
        return [self.netns(r) for r in range(self.ranks)] + [self.hub]

    def exec_prefix(self, rank: int) -> list[str]:
        """argv prefix running a command inside the rank's namespace."""
        return ["ip", "netns", "exec", self.netns(rank)]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.ranks:
            raise IndexError(f"rank {rank} out of range: this lab has ranks 0..{self.ranks - 1}")

    # --- lifecycle ----------------------------------------------------------

    def __enter__(self) -> "NetLab":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "NetLab":
        """Builds the lab (``with NetLab(...)`` calls this); raises NetLabError if it cannot."""
        if self._open:
            return self
        ok, why = NetLab.available()
        if not ok:
            raise NetLabError(f"network lab unavailable: {why}")
        if self.delay_ms and not NetLab.netem_available():
            raise NetLabError(
                f"delay_ms={self.delay_ms}: this kernel has no netem (sch_netem), so the lab cannot add "
                "latency; pass delay_ms=None and add the delay in user space (e.g. sleep before each send)"
            )
        taken = set(list_netns()) & set(self.namespaces())
        if taken:
            raise NetLabError(f"namespaces {sorted(taken)} already exist: pick another prefix, or remove them (ip netns del NAME)")
        self._open = True
        self._install_handlers()
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        hub = self.hub
        self._made.append(hub)
        _run(["ip", "netns", "add", hub])
        # addrgenmode none: no IPv6 link-local addresses, so no ND/MLD chatter in the counters.
        _run(["ip", "-n", hub, "link", "add", "name", BRIDGE, "type", "bridge", "stp_state", "0"])
        _run(["ip", "-n", hub, "link", "set", BRIDGE, "addrgenmode", "none", "up"])
        for r in range(self.ranks):
            ns, port = self.netns(r), f"r{r}"
            self._made.append(ns)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", hub, "link", "add", "name", port, "type", "veth", "peer", "name", IFNAME, "netns", ns])
            _run(["ip", "-n", hub, "link", "set", port, "addrgenmode", "none", "master", BRIDGE, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "addrgenmode", "none"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(r)}/{self._net.prefixlen}", "dev", IFNAME])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
            self._shape(ns, IFNAME, delay=True)
            self._shape(hub, port, delay=False)

    def _shape(self, ns: str, dev: str, *, delay: bool) -> None:
        tc = ["tc", "-n", ns, "qdisc", "replace", "dev", dev]
        netem = ["netem", "delay", f"{self.delay_ms}ms", "limit", "100000"] if delay and self.delay_ms else None
        if self.tbf is not None:
            t = self.tbf
            _run(tc + ["root", "handle", "1:", "tbf", "rate", f"{t['rate_bit']}bit",
                       "burst", str(t["burst_bytes"]), "latency", f"{t['latency_ms']}ms"])
            if netem:
                _run(tc + ["parent", "1:1", "handle", "10:"] + netem)
        elif netem:
            _run(tc + ["root", "handle", "10:"] + netem)

    def close(self) -> None:
        """Kills the lab's processes and deletes its namespaces (and so its links). Idempotent."""
        if not self._open or self._closing:
            return
        self._closing = True
        # A second Ctrl-C must not cut the cleanup short: hold the signals until done.
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            live = [p for p in self._procs if p.poll() is None]
            for p in live:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # its own session: children go too
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2.0
            for p in live:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
            _delete_netns(self._made)  # also kills what was started there by other means
            self._made.clear()
            atexit.unregister(self.close)
            self._restore_handlers()
            self._open = False
        finally:
            self._closing = False
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit/__exit__ still clean up
        for s in _SIGNALS:
            # an ignored signal stays ignored (a background job's SIGINT): it neither ends the process nor the lab
            if signal.getsignal(s) != signal.SIG_IGN:
                self._prev_handlers[s] = signal.signal(s, self._on_signal)

    def _restore_handlers(self) -> None:
        for s, h in self._prev_handlers.items():
            if signal.getsignal(s) == self._on_signal:
                signal.signal(s, h)
        self._prev_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        self.close()
        if callable(prev):
            prev(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # die of the signal, as without the lab

    # --- processes and counters ---------------------------------------------

    def popen(self, rank: int, argv: list[str], **kw) -> subprocess.Popen:
        """Starts ``argv`` inside the rank's namespace; it is killed when the lab closes.

        Keyword arguments go to subprocess.Popen. The process gets its own
        session (so its children are killed with it, and a terminal's Ctrl-C
        reaches the lab's handler rather than the device processes first).
        """
        if not self._open:
            raise NetLabError("the lab is not open: use `with NetLab(...) as lab:` before popen")
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.exec_prefix(rank) + list(argv), **kw)
        self._procs.append(p)
        return p

    def counters(self, rank: int) -> dict:
        """tx/rx bytes and packets (and drops) of the rank's interface, from the kernel's link stats."""
        r = _run(["ip", "-n", self.netns(rank), "-s", "-j", "link", "show", "dev", IFNAME])
        st = json.loads(r.stdout)[0]["stats64"]
        return {
            "tx_bytes": st["tx"]["bytes"], "tx_packets": st["tx"]["packets"], "tx_dropped": st["tx"]["dropped"],
            "rx_bytes": st["rx"]["bytes"], "rx_packets": st["rx"]["packets"], "rx_dropped": st["rx"]["dropped"],
        }

    def qdisc_stats(self, rank: int) -> dict:
        """Bytes sent and packets dropped/overlimit by the tbf on both ends of the rank's link."""
        out = {}
        for side, ns, dev in (("up", self.netns(rank), IFNAME), ("down", self.hub, f"r{rank}")):
            r = _run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev, "root"])
            q = (json.loads(r.stdout) or [{}])[0]
            out[side] = {k: q.get(k) for k in ("kind", "bytes", "packets", "drops", "overlimits")}
        return out


# --- throughput measurement (self-test and tests) -----------------------------

_RECV = r"""
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1); s.settimeout(timeout)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(timeout)
buf = bytearray(1 << 20); n = first = 0; t0 = None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    if t0 is None:
        t0, first = time.perf_counter(), k
    n += k
t1 = time.perf_counter()
print(json.dumps({"bytes": n, "first": first, "seconds": t1 - (t0 or t1)}), flush=True)
"""

_SEND = r"""
import socket, sys
host, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((host, port), timeout=timeout)
chunk = memoryview(bytes(1 << 16))
while nbytes > 0:
    k = min(nbytes, len(chunk)); c.sendall(chunk[:k]); nbytes -= k
c.close()
"""


def measure_tcp(lab: NetLab, src: int, dst: int, nbytes: int, *, port: int = 5201, timeout: float = 60.0) -> dict:
    """Sends ``nbytes`` over TCP from rank ``src`` to rank ``dst``; returns bytes, seconds, mbit.

    Timed at the receiver, from the first byte to the end of the stream, so
    connection setup and interpreter start-up are not counted and the sender's
    socket buffer does not flatter the result.
    """
    recv = lab.popen(dst, [sys.executable, "-c", _RECV, lab.addr(dst), str(port), str(timeout)],
                     stdout=subprocess.PIPE, text=True)
    line = recv.stdout.readline()
    if line.strip() != "ready":
        recv.kill()
        raise NetLabError(f"receiver in {lab.netns(dst)} did not start (said {line!r})")
    send = lab.popen(src, [sys.executable, "-c", _SEND, lab.addr(dst), str(port), str(nbytes), str(timeout)],
                     stderr=subprocess.PIPE, text=True)
    try:
        out, _ = recv.communicate(timeout=timeout)
        _, err = send.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NetLabError(f"TCP transfer rank {src} -> {dst} did not finish in {timeout} s") from None
    if send.returncode != 0:
        raise NetLabError(f"sender in {lab.netns(src)} failed: {err.strip()}")
    res = json.loads(out.strip().splitlines()[-1])
    if res["bytes"] != nbytes:
        raise NetLabError(f"receiver got {res['bytes']} of {nbytes} bytes")
    # The first read arrived at t0: rate over what came after it.
    secs = res["seconds"]
    mbit = (res["bytes"] - res["first"]) * 8 / secs / 1e6 if secs > 0 else float("inf")
    return {"bytes": res["bytes"], "seconds": secs, "mbit": mbit}


def _root_bytes() -> int:
    """rx+tx bytes over every interface of the namespace this process runs in."""
    total = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            fields = line.split(":", 1)[1].split()
            total += int(fields[0]) + int(fields[8])
    return total


def selftest(rates: list[float | None], mbytes: float | None = None, band: tuple[float, float] = (0.8, 1.1)) -> bool:
    """Measures TCP throughput rank 0 -> rank 1 at each rate; prints a table; True if all pass."""
    ok = True
    print(f"{'configured':>12} {'achieved':>10} {'ratio':>6} {'MB':>5} {'s':>6} {'root ns delta':>14}  result")
    for rate in rates:
        if mbytes is not None:
            nbytes = int(mbytes * 1e6)
        else:
            # About 2 s of traffic, 5..20 MB; unshaped runs at the 1 Gbit/s size.
            nbytes = int(min(20e6, max(5e6, (rate or 1000) * 1e6 / 8 * 2)))
        with NetLab(2, rate) as lab:
            before, c0, c1 = _root_bytes(), lab.counters(0), lab.counters(1)
            res = measure_tcp(lab, 0, 1, nbytes)
            leaked = _root_bytes() - before
            d0 = lab.counters(0)["tx_bytes"] - c0["tx_bytes"]
            d1 = lab.counters(1)["rx_bytes"] - c1["rx_bytes"]
            names = lab.namespaces()
        left = set(names) & set(list_netns())
        problems = []
        if rate is not None:
            ratio = res["mbit"] / rate
            if not band[0] <= ratio <= band[1]:
                problems.append(f"ratio outside {band[0]}..{band[1]}")
        else:
            ratio = float("nan")
        if d0 < nbytes or d1 < nbytes:
            problems.append(f"link counters grew less than the transfer (tx {d0}, rx {d1})")
        if leaked >= nbytes / 2:
            problems.append("traffic showed up in the root namespace")
        if left:
            problems.append(f"namespaces left behind: {sorted(left)}")
        ok &= not problems
        conf = f"{rate:g} Mbit/s" if rate is not None else "unshaped"
        print(f"{conf:>12} {res['mbit']:>10.1f} {ratio:>6.2f} {nbytes / 1e6:>5.0f} {res['seconds']:>6.2f} "
              f"{leaked:>12} B  {'; '.join(problems) or 'ok'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--selftest", action="store_true", help="measure TCP throughput through a 2-rank lab")
    ap.add_argument("--rate", action="append", metavar="MBIT",
                    help="rate(s) to test, Mbit/s or 'none' for unshaped (default: 1000, 100, 20, none)")
    ap.add_argument("--mbytes", type=float, help="MB per transfer (default: about 2 s of traffic, 5..20 MB)")
    ap.add_argument("--cleanup-stale", action="store_true", help="delete leftovers of dead runs (prism-<pid>-*)")
    a = ap.parse_args(argv)
    if not (a.selftest or a.cleanup_stale):
        ap.print_help()
        return 2
    ok, why = NetLab.available()
    if not ok:
        print(f"netlab: {why}", file=sys.stderr)
        return 2
    if a.cleanup_stale:
        print("removed:", " ".join(cleanup_stale()) or "nothing")
    if a.selftest:
        rates = [None if r.lower() in ("none", "0", "unshaped") else float(r) for r in a.rate] if a.rate else [1000, 100, 20, None]
        return 0 if selftest(rates, a.mbytes) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
