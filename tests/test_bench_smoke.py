"""Smoke test of the kernel benchmarks: they run and report a finite positive
time for every kernel, ISA and peer. No timing is asserted (the numbers belong
in bench results); the peers are checked to compute what the kernels do."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from prism_ext import bench, kernels


def test_layout_matches_prism_keys():
    for nq in bench.QUERY_LENS:
        for cr in bench.COMPRESSION_RATES:
            lay = bench.Layout(nq, bench.SEQ_LEN, cr)
            counts, q_pos, k_pos = lay.tensors()
            assert counts.shape == k_pos.shape == (lay.nk,)
            assert counts.sum().item() == bench.SEQ_LEN  # every position stands in exactly one key
            visible = k_pos[None, :] <= q_pos[:, None]
            own = visible[:, :nq]
            assert torch.equal(own, torch.ones(nq, nq, dtype=torch.bool).tril())  # own keys causal
            means = visible[:, nq:]
            earlier = k_pos[nq:] < q_pos[0]
            assert means[:, earlier].all() and not means[:, ~earlier].any()  # earlier visible, later hidden


@pytest.mark.parametrize("case", bench.cases(quick=True), ids=lambda c: c.name)
def test_torch_peer_computes_the_kernel(case):
    prism_call, torch_call = case.setup()
    got, want = prism_call(), torch_call()
    if case.kernel == "segment_means":
        means, _ = got
        want = torch.cat([w.reshape(-1, means.shape[-1]) for w in want if w is not None])
        got = means
    # SDPA and the online softmax sum in different orders: fp32 with a
    # tolerance of a few ulps of the unit-scale outputs.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prism_bench_kernels_quick(tmp_path):
    import google_benchmark  # noqa: F401 - a test dependency: `prism bench kernels` needs it
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "prism_ext.cli", "bench", "kernels", "--quick", "--threads", "1", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,  # away from the source tree's prism_ext
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table_rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    for kernel in bench.KERNELS:
        assert any(row.split("|")[1].strip() == kernel for row in table_rows), f"no table row for {kernel}"

    report = json.loads(out.read_text())
    isas = kernels.available_isas()
    assert report["isas"] == isas
    seen = {(r["kernel"], r["impl"], r["isa"]) for r in report["records"]}
    for kernel in bench.KERNELS:
        assert (kernel, "torch", None) in seen
        assert {(kernel, "prism", isa) for isa in isas} <= seen
    for rec in report["records"]:
        assert rec["seconds"] is not None, f"{rec['case']} {rec['impl']} {rec['isa']}: {rec.get('error')}"
        assert math.isfinite(rec["seconds"]) and rec["seconds"] > 0
    for row in report["summary"]["rows"]:
        assert set(row["speedup"]) == set(isas)
        assert all(math.isfinite(s) and s > 0 for s in row["speedup"].values())
    assert report["summary"]["sgemm"]["flops_per_s"] > 0


def test_bench_rejects_bad_threads():
    with pytest.raises(ValueError, match="threads"):
        bench.parse_threads("1,0")
    with pytest.raises(ValueError, match="threads"):
        bench.parse_threads("two")


def test_bench_kernels_filter(tmp_path):
    """--kernels runs only the kernels named (here the quantized linear
    layers, both peers each); an unknown name is refused before anything runs."""
    import google_benchmark  # noqa: F401
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "prism_ext.cli", "bench", "kernels", "--quick", "--threads", "1"]
    proc = subprocess.run(cmd + ["--kernels", "int8_linear,int4_linear", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {c["kernel"] for c in report["cases"].values()} == {"int8_linear", "int4_linear"}
    assert {c["params"]["peer"] for c in report["cases"].values()} == set(bench.LINEAR_PEERS)
    bad = subprocess.run(cmd + ["--kernels", "int8_linear,nope"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "kernels: expected names from" in bad.stderr
