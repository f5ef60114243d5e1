"""bench/netlab.py: the shaped-network lab comes up, shapes, counts and cleans up.

Needs root and iproute2 (skips otherwise). No torch, no prism_ext: the module is
stdlib only and found through the source tree's bench/ folder (skips when the
tests run from a copy without it, as in the wheel tests).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if not (BENCH / "netlab.py").is_file():
    pytest.skip(f"no bench/netlab.py next to the tests ({BENCH}): not a source tree", allow_module_level=True)
sys.path.insert(0, str(BENCH))
import netlab  # noqa: E402
from netlab import NetLab, NetLabError  # noqa: E402

_ok, _why = NetLab.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"network lab unavailable: {_why}")


def gone(pid: int) -> bool:
    """No such process, or only a zombie awaiting its parent's reaping."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def leftovers(prefix: str) -> list[str]:
    """Namespaces, and links of the root namespace, whose name carries ``prefix``."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [n for n in netlab.list_netns() if n.startswith(prefix)] + [
        line for line in links.splitlines() if prefix in line
    ]


def test_shaped_link_reaches_counts_and_cleans_up():
    nbytes = 2_000_000
    with NetLab(2, 20) as lab:
        prefix = lab.prefix
        assert leftovers(prefix) and lab.addr(1) == "10.77.0.11" and lab.ifname(0) == "eth0"
        assert lab.exec_prefix(1) == ["ip", "netns", "exec", lab.netns(1)]
        # Children of popen'd processes go too (the sleep is the shell's child).
        sh = lab.popen(0, ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        grandchild = int(sh.stdout.readline())
        # A process started without popen, straight into the namespace.
        stranger = subprocess.Popen(lab.exec_prefix(1) + ["sleep", "60"])
        before = [lab.counters(0), lab.counters(1)]
        res = netlab.measure_tcp(lab, 0, 1, nbytes)
        after = [lab.counters(0), lab.counters(1)]
    assert res["bytes"] == nbytes
    # A check that shaping is on, not a benchmark: TCP goodput is ~0.96 of the
    # configured rate (headers), the band leaves room for a noisy machine.
    assert 0.5 * 20 <= res["mbit"] <= 1.3 * 20, res
    assert after[0]["tx_bytes"] - before[0]["tx_bytes"] >= nbytes
    assert after[1]["rx_bytes"] - before[1]["rx_bytes"] >= nbytes
    assert after[0]["tx_packets"] - before[0]["tx_packets"] >= nbytes // 65536
    assert leftovers(prefix) == []
    assert sh.poll() is not None and gone(sh.pid) and gone(grandchild)
    stranger.wait(5)


def test_cleanup_when_the_body_raises():
    with pytest.raises(ZeroDivisionError):
        with NetLab(3, None) as lab:
            prefix = lab.prefix
            p = lab.popen(2, ["sleep", "60"])
            # Unshaped, 3 ranks: rank 0 reaches rank 2.
            assert netlab.measure_tcp(lab, 0, 2, 100_000, port=5202)["bytes"] == 100_000
            1 / 0
    assert leftovers(prefix) == []
    assert p.poll() is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cleanup_on_signal(sig):
    # a foreground program's SIGINT (this suite may run as a background job, whose children inherit it ignored)
    proc = _lab_script("signal.signal(signal.SIGINT, signal.default_int_handler)")
    try:
        prefix, pid = proc.stdout.readline().split()
        assert leftovers(prefix)
        proc.send_signal(sig)
        rc = proc.wait(15)
    finally:
        proc.kill()
    # Cleans up, then dies of the signal as without the lab (SIGINT: by way of
    # KeyboardInterrupt, which Python turns back into death by SIGINT).
    assert rc == -sig
    assert leftovers(prefix) == []
    assert gone(int(pid))


def test_an_ignored_signal_leaves_the_lab_up():
    """A program that ignores SIGINT (a background job) keeps ignoring it with
    a lab open; SIGTERM still cleans up."""
    proc = _lab_script("signal.signal(signal.SIGINT, signal.SIG_IGN)")
    try:
        prefix, pid = proc.stdout.readline().split()
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert proc.poll() is None and leftovers(prefix) and not gone(int(pid))
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    finally:
        proc.kill()
    assert rc == -signal.SIGTERM
    assert leftovers(prefix) == []
    assert gone(int(pid))


def _lab_script(first_line: str) -> subprocess.Popen:
    """A Python process that runs ``first_line``, opens a 2-rank lab with a
    sleeping process in it, prints the lab's prefix and that pid, and sleeps."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        {first_line}
        sys.path.insert(0, {str(BENCH)!r})
        from netlab import NetLab
        with NetLab(2, 100) as lab:
            p = lab.popen(1, ["sleep", "60"])
            print(lab.prefix, p.pid, flush=True)
            time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_cleanup_stale_removes_only_dead_owners():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"prism-{dead.pid}-0-r0", f"prism-{os.getpid()}-999-r0"
    for n in (stale, live):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        removed = netlab.cleanup_stale()
        names = netlab.list_netns()
        assert stale in removed and stale not in names
        assert live in names and live not in removed
    finally:
        for n in (stale, live):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_existing_names_and_bad_arguments_are_refused():
    with NetLab(1, 20) as lab:
        with pytest.raises(NetLabError, match="already exist"):
            NetLab(1, 20, prefix=lab.prefix).open()
        with pytest.raises(IndexError):
            lab.addr(1)
    assert leftovers(lab.prefix) == []
    with pytest.raises(ValueError):
        NetLab(0, 20)
    with pytest.raises(ValueError):
        NetLab(2, 0)
    if not NetLab.netem_available():
        with pytest.raises(NetLabError, match="netem"):
            NetLab(2, 20, delay_ms=5).open()
    with pytest.raises(NetLabError, match="not open"):
        NetLab(1, None).popen(0, ["true"])


def test_lab_stays_out_of_the_root_namespace():
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    with NetLab(2, 20):
        assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n") == before.count("\n")
        assert subprocess.run(["ip", "route"], capture_output=True, text=True).stdout == routes
