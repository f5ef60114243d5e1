"""bench/bench_serve.py --quick runs to the end and accounts for every request.

A smoke test of the benchmark's plumbing, not a measurement. Needs the
source tree's bench/ folder (skips when the tests run from a copy without
it; the wheel tests leave this module out).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_serve.py"
if not BENCH.is_file():
    pytest.skip(f"no {BENCH}: not a source tree", allow_module_level=True)

def test_bench_serve_quick_answers_every_request(tmp_path):
    """bench/bench_serve.py --quick runs to the end and accounts for every
    request (nothing about the numbers is checked: they belong in bench/)."""
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"no batching", "batching (max 8)"}
    for name, [run] in runs.items():
        assert run["sent"] > 0 and run["lost"] == 0 and run["statuses"] == {"200": run["sent"]}, run
    assert runs["no batching"][0]["mean_batch"] == 1.0
