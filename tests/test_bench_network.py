"""bench/bench_network.py --quick runs to the end, writes its JSON and cleans up.

A smoke test of the benchmark's plumbing (namespaces, the coordinator inside
rank 0's namespace, workers, counters, output files), not a measurement:
nothing about the numbers is checked. Needs root and iproute2 (skips
otherwise) and the source tree's bench/ folder (skips when the tests run
from a copy without it, as in the wheel tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if not (BENCH / "bench_network.py").is_file() or not (BENCH / "netlab.py").is_file():
    pytest.skip(f"no bench/bench_network.py next to the tests ({BENCH}): not a source tree", allow_module_level=True)
sys.path.insert(0, str(BENCH))
import netlab  # noqa: E402
from netlab import NetLab  # noqa: E402

_ok, _why = NetLab.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"network lab unavailable: {_why}")


def test_quick_run_completes_writes_json_and_leaves_no_namespace(tmp_path):
    proc = subprocess.Popen([sys.executable, str(BENCH / "bench_network.py"), "--quick", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # timed out: SIGTERM lets the lab clean up
            proc.terminate()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    files = list(tmp_path.glob("network-*.json"))
    assert len(files) == 1, sorted(p.name for p in tmp_path.iterdir())
    report = json.loads(files[0].read_text())
    assert report["records"] and report["runs"]
    from PIL import Image

    with Image.open(files[0].with_suffix(".png")) as plot:  # matplotlib is in the test extra: the plot is drawn
        assert plot.format == "PNG" and plot.size[0] >= 400 and plot.size[1] >= 300
    # Its namespaces are named prism-<its pid>-...: none is left.
    prefix = f"{netlab.DEFAULT_PREFIX}{proc.pid}-"
    assert [n for n in netlab.list_netns() if n.startswith(prefix)] == []
