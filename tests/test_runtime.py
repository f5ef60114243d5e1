"""The multi-process runtime: real processes over loopback (gloo) against the
in-process simulation, the handshake, failures, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import prism_ext
from prism_ext.runtime import ClusterError, HandshakeError, cluster

from engine_helpers import bert_inputs, hf_bert, hf_gpt2, save
from process_helpers import HUGE_FRAME_WORKER, alive, free_port, wait_gone

PRISM = [sys.executable, "-m", "prism_ext"]
TOKEN = "test-token"


@pytest.fixture(autouse=True)
def away_from_the_source_tree(tmp_path, monkeypatch):
    """Subprocesses (`python -m prism_ext`, `python -c`) put their working
    directory first on sys.path: run them where no uncompiled prism_ext lies."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def live(gpt):
    """One live cluster for the tests that use it; they come first in this
    file (pytest keeps file order), and the fixture is finalised explicitly
    by test_live_cluster_closes, so the later tests can start their own (one
    cluster per process)."""
    c = cluster(gpt, devices=3, timeout=30)
    yield c
    c.close()


def ids_of(m, text="The for statement is used to iterate over the elements"):
    return torch.tensor([m.tokenizer.encode(text)])


def assert_same_stats(real, sim):
    for a, b in zip(real.devices, sim.devices):
        assert [s.bytes_sent for s in a.layers] == [s.bytes_sent for s in b.layers]
        assert [s.flops for s in a.layers] == [s.flops for s in b.layers]
        assert a.input_bytes == b.input_bytes
        # results carry the sender's stats in their header, timings included: a few digits may differ
        assert abs(a.result_bytes - b.result_bytes) < 160
        assert a.peak_rss > 0


@pytest.mark.parametrize("mode,cr,exact", [("prism", 2, "none"), ("prism", 7, "none"), ("prism", 4, "first+top1"),
                                            ("voltage", 4, "none"), ("tp", 1, "none"), ("single", 1, "none")])
def test_processes_equal_the_simulation(live, gpt, mode, cr, exact):
    ids = ids_of(gpt)
    devices = 1 if mode == "single" else 3
    real = live(ids, devices=devices, cr=cr, mode=mode, exact_rows=exact)
    sim = gpt(ids, devices=devices, cr=cr, mode=mode, exact_rows=exact)
    # tp: gloo's all-reduce sums in its own order; the others are the same arithmetic
    torch.testing.assert_close(real.logits, sim.logits, rtol=0, atol=1e-4 if mode == "tp" else 1e-6)
    assert_same_stats(real.stats, sim.stats)
    if mode != "single":
        assert all(d.result_bytes > 0 and d.input_bytes > 0 for d in real.stats.devices[1:])


def test_transport_counts_what_it_sends(live, gpt):
    """Rank 0's gloo transport: per layer, its frame to each of the P - 1
    peers plus the 8-byte size word; it receives the results only."""
    tr = live.executor._group.transport
    before = tr.wire_bytes
    out = live(ids_of(gpt), cr=4, outputs=("last",))
    sent = [s.bytes_sent for s in out.stats.devices[0].layers]
    assert tr.wire_bytes - before == sum(2 * (b + 8) for b in sent)
    assert out.stats.devices[0].result_bytes == 0


def test_outputs_come_back_only_where_needed(live, gpt):
    ids = ids_of(gpt)
    rows = live(ids, cr=2)
    last = live(ids, cr=2, outputs=("last",))
    assert set(last.keys()) == {"logits", "last_hidden_state"} and last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits, rows.logits[:, -1:], rtol=0, atol=1e-5)  # a one-row GEMM
    # only the last device sends its last row: far fewer result bytes than every row
    assert last.stats.result_bytes < rows.stats.result_bytes / 5
    assert last.stats.devices[1].result_bytes < last.stats.devices[2].result_bytes


def test_generate_across_processes(live, gpt):
    ids = ids_of(gpt)
    real, stats, decode = live.generate(ids, cr=2, max_new_tokens=10, return_stats=True)
    assert torch.equal(real, gpt.generate(ids, devices=3, cr=2, max_new_tokens=10))
    assert decode.bytes_sent == [0] * 9 and all(f > 0 for f in decode.flops)
    exact = live.generate(ids, cr=4, max_new_tokens=6, exact_rows="first+top2")
    assert torch.equal(exact, gpt.generate(ids, devices=3, cr=4, max_new_tokens=6, exact_rows="first+top2"))
    sampled = live.generate(ids, cr=2, max_new_tokens=8, temperature=0.8, top_k=5, seed=3)
    assert torch.equal(sampled, gpt.generate(ids, devices=3, cr=2, max_new_tokens=8, temperature=0.8, top_k=5, seed=3))


@pytest.mark.parametrize("devices", [3, 1])
def test_generate_streams_each_token_to_rank_0(live, gpt, devices):
    """on_token: the last device sends every token to rank 0 as it decodes
    (devices=1: rank 0 decodes itself); the same tokens as without streaming."""
    ids = ids_of(gpt)
    got = []
    out, stats, _ = live.generate(ids, devices=devices, cr=2, max_new_tokens=6, return_stats=True,
                                  on_token=lambda t: got.append(t.tolist()))
    plain, plain_stats, _ = live.generate(ids, devices=devices, cr=2, max_new_tokens=6, return_stats=True)
    assert torch.equal(out, plain) and [t[0] for t in got] == out[0, ids.shape[1]:].tolist()
    if devices > 1:  # one frame per token, counted in the last device's result bytes
        assert stats.devices[-1].result_bytes > plain_stats.devices[-1].result_bytes + 6 * 4
        # the others' results as before (their headers carry timings: a few digits may differ)
        assert all(abs(a.result_bytes - b.result_bytes) < 160 for a, b in zip(stats.devices[:-1], plain_stats.devices))


@pytest.mark.parametrize("bad,match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 129, dtype=torch.long)), "input_ids: 129 positions exceed"),
    (dict(input_ids=torch.zeros(1, 2, dtype=torch.long)), "devices: 3 devices need at least 3 positions"),
    (dict(input_ids=torch.zeros(1, 9, dtype=torch.long), devices=2), "devices: this cluster has 3"),
    (dict(input_ids=torch.zeros(1, 9, dtype=torch.long), cr=0), "cr"),
    (dict(pixel_values=torch.zeros(1, 1, 32, 32)), "pixel_values"),
])
def test_bad_requests_are_refused_on_rank_0_and_the_cluster_keeps_serving(live, gpt, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        live(**bad)
    assert live.executor.closed is None
    torch.testing.assert_close(live(ids_of(gpt), cr=2).logits, gpt(ids_of(gpt), devices=3, cr=2).logits)


def test_live_cluster_closes(live):
    pids = live.executor.worker_pids
    live.close()
    assert wait_gone(pids, 10) == [] and live.executor.closed == "closed"
    with pytest.raises(ClusterError, match="closed"):
        live(torch.zeros(1, 4, dtype=torch.long))


def test_bert_with_padding_and_pooled_outputs(tmp_path):
    m = prism_ext.load(save(hf_bert(), tmp_path / "bert"))
    inputs = bert_inputs()
    sim = m(inputs, devices=2, cr=3, outputs=("rows", "cls", "pooled"))
    with cluster(m, devices=2, timeout=30) as c:
        real = c(inputs, cr=3, outputs=("rows", "cls", "pooled"))
        pooled_only = c(inputs, cr=3, outputs=("pooled",))
    for key in ("last_hidden_state", "logits", "mean_pooled"):
        torch.testing.assert_close(real[key], sim[key], rtol=0, atol=1e-6)
    valid = inputs["attention_mask"].float()
    want = (sim.last_hidden_state * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    torch.testing.assert_close(real.mean_pooled, want, rtol=1e-5, atol=1e-5)
    assert pooled_only.stats.result_bytes < real.stats.result_bytes / 3


def test_vit_devices_receive_only_their_patches():
    m = prism_ext.load("vit-tiny-digits")
    px = torch.rand(2, 1, 32, 32)
    sim = m(px, devices=2, cr=4, outputs=("cls",))
    with cluster(m, devices=2, timeout=30, auto_weights=True) as c:
        assert len(c.executor.device_weights) == 2 and all(0 < w <= 1 for w in c.executor.device_weights)
        real = c(px, cr=4, outputs=("cls",), device_weights=[1, 1])
    torch.testing.assert_close(real.logits, sim.logits, rtol=0, atol=1e-6)
    # rank 1 got its own 32 of the 64 patches (16 values each) as fp32, plus a small header
    assert 2 * 32 * 16 * 4 < real.stats.devices[1].input_bytes < 2 * 32 * 16 * 4 + 2048


def test_llama_tiny_across_processes(llama):
    """RoPE and grouped-query attention over real processes: prism at the
    family's defaults (the kv point, position 0 exact), tp (each rank one
    key/value head) and decoding, as the simulation runs them."""
    ids = ids_of(llama, "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return")
    with cluster(llama, devices=2, timeout=30) as c:
        for mode, atol in (("prism", 1e-6), ("tp", 1e-4)):  # tp: gloo's all-reduce sums in its own order
            real = c(ids, cr=4, mode=mode)
            sim = llama(ids, devices=2, cr=4, mode=mode)
            torch.testing.assert_close(real.logits, sim.logits, rtol=0, atol=atol)
            assert_same_stats(real.stats, sim.stats)
        tokens = c.generate(ids, cr=4, max_new_tokens=6)
    assert torch.equal(tokens, llama.generate(ids, devices=2, cr=4, max_new_tokens=6))


# ------------------------------------------------------------- handshake

def start_worker(reaper, port, rank, world, token=TOKEN, env=None, extra=(), prism=PRISM):
    e = dict(os.environ, **(env or {}))
    return reaper.popen(prism + ["worker", "--master", f"127.0.0.1:{port}", "--rank", str(rank), "--world",
                                 str(world), "--token", token, "--timeout", "20", "--ifname", "lo", *extra],
                        env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def refused(gpt, reaper, worker_kw, match):
    port = free_port()
    w = start_worker(reaper, port, 1, 2, **worker_kw)
    with pytest.raises(HandshakeError, match=match):  # a cluster formed after all is ended by the reaper
        reaper.cluster(cluster(gpt, master=f"127.0.0.1:{port}", world=2, token=TOKEN, timeout=20, ifname="lo"))
    assert w.wait(timeout=30) == 2
    return w.stderr.read()


def test_wrong_token_is_refused_before_anything_runs(gpt, reaper):
    err = refused(gpt, reaper, dict(token="not-the-token"), r"rank 1: authentication failed")
    assert "authentication failed" in err and "not-the-token" not in err


def test_different_weights_are_refused(gpt, reaper, tmp_path):
    other = save(hf_gpt2(seed=5), tmp_path / "other")
    err = refused(gpt, reaper, dict(extra=("--model", str(other))), r"rank 1: model (config|weights)")
    assert "differs from rank 0's" in err


def test_different_version_is_refused(gpt, reaper):
    """A worker whose package reports another version (patched before the
    CLI runs: a copy of the package on PYTHONPATH would lose to an editable
    install's import hook)."""
    other = [sys.executable, "-c", "import sys, prism_ext.runtime.session as r; r.__version__ = '9.9.9'; "
                                   "from prism_ext.cli import main; sys.exit(main())"]
    err = refused(gpt, reaper, dict(prism=other), r"rank 1: package version 9\.9\.9")
    assert "9.9.9" in err


def run_pair(reaper, rank0_args, rank1_args, port):
    base = ["run", "--model", "gpt2-tiny", "--text", "The for statement", "--max-new-tokens", "3", "--no-compare",
            "--master", f"127.0.0.1:{port}", "--world", "2", "--token", TOKEN, "--timeout", "20", "--ifname", "lo",
            "--json", "-q"]
    p0 = reaper.popen(PRISM + base + rank0_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p1 = reaper.popen(PRISM + base + ["--rank", "1"] + rank1_args, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    out0, err0 = p0.communicate(timeout=90)
    out1, err1 = p1.communicate(timeout=30)
    return (p0.returncode, out0, err0), (p1.returncode, out1, err1)


def test_torchrun_style_ranks_run_and_must_agree_on_cr(reaper):
    (c0, out0, err0), (c1, _, _) = run_pair(reaper, ["--cr", "2"], ["--cr", "2"], free_port())
    assert (c0, c1) == (0, 0), err0
    result = json.loads(out0)
    assert "rank 0 at 127.0.0.1" in result["runtime"] and result["devices"] == 2
    assert len(result["output"]["token_ids"]) == 3
    (c0, _, err0), (c1, _, err1) = run_pair(reaper, ["--cr", "2"], ["--cr", "8"], free_port())
    assert c0 != 0 and c1 == 2
    assert "rank 1: cr 8 differs from rank 0's 2" in err0 and len(err0.strip().splitlines()) == 1


def test_under_torchrun_as_the_readme_writes_it(reaper, tmp_path):
    """README's command line (torchrun comes with torch; `prism` is the
    console script next to this interpreter), on one host with no token:
    the ranks share one through a file only this user reads, gone after."""
    from prism_ext.runtime.torchrun import _token_dir

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "PRISM_TOKEN"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    p = reaper.popen(["torchrun", "--standalone", "--nproc-per-node", "2", "--no-python", "prism", "run",
                      "--model", "gpt2-tiny", "--text", "The for statement", "--cr", "2", "--max-new-tokens", "3",
                      "--no-compare", "--json", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env=env)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    result = json.loads(stdout)
    assert "rank 0 at" in result["runtime"] and len(result["stats"]["devices"]) == 2
    assert len(result["output"]["token_ids"]) == 3
    assert "ready" not in stderr  # -q reaches the torchrun worker too
    assert not list(_token_dir().glob("torchrun-*")), "the shared token file outlived the formation"
    assert oct(_token_dir().stat().st_mode & 0o777) == "0o700"


def test_torchrun_across_hosts_needs_a_token(monkeypatch, capsys):
    from prism_ext.cli import main

    monkeypatch.delenv("PRISM_TOKEN", raising=False)
    for name, value in dict(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", WORLD_SIZE="4", RANK="0",
                            LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    assert main(["run", "--model", "gpt2-tiny", "--text", "x", "--no-compare"]) == 2
    err = capsys.readouterr().err
    assert "--token: torchrun across hosts needs a shared token" in err and len(err.strip().splitlines()) == 1


def test_a_serving_worker_joins_one_cluster_after_another(reaper):
    """`prism worker --serve`: two `prism run --master` in a row against the
    same worker, then SIGTERM stops it (and its cluster process) cleanly."""
    port = free_port()
    w = reaper.popen(PRISM + ["worker", "--serve", "--master", f"127.0.0.1:{port}", "--rank", "1", "--world", "2",
                              "--token", TOKEN, "--timeout", "20", "--ifname", "lo"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rank0 = PRISM + ["run", "--model", "gpt2-tiny", "--text", "The for statement", "--max-new-tokens", "2",
                     "--no-compare", "--master", f"127.0.0.1:{port}", "--world", "2", "--token", TOKEN,
                     "--timeout", "20", "--ifname", "lo", "--json", "-q"]
    outputs = []
    for _ in range(2):
        r = subprocess.run(rank0, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        outputs.append(json.loads(r.stdout)["output"])
    assert outputs[0] == outputs[1]
    assert w.poll() is None, "the serving worker exited after a run"
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=30) == 0
    err = w.stderr.read()
    assert err.count("ready (gpt2, 2 devices)") == 2, err
    assert "cluster 1 ended (rank 0 closed the cluster)" in err and err.rstrip().endswith("stopped"), err


# -------------------------------------------------------------- failures

@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """Big enough that one prefill takes a while on 2 cores."""
    import transformers

    cfg = transformers.GPT2Config(n_embd=384, n_layer=12, n_head=6, vocab_size=512, n_positions=1024)
    torch.manual_seed(0)
    return save(transformers.GPT2LMHeadModel(cfg).eval(), tmp_path_factory.mktemp("slow") / "gpt2")


def test_worker_killed_mid_prefill_names_the_rank_and_nothing_is_left(slow_model, reaper):
    m = prism_ext.load(slow_model)
    ids = torch.randint(0, 512, (4, 1024))
    c = reaper.cluster(cluster(m, devices=3, timeout=20))
    pids = c.executor.worker_pids
    box = {}
    started = threading.Event()

    def requests():
        # back to back until one fails: on a fast machine a prefill may end before the kill, the next one
        # is then under way (a fixed sleep inside one request is a race)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                started.set()
                c(ids, cr=4, outputs=("last",))
        except ClusterError as exc:
            box["error"] = exc
            box["at"] = time.monotonic()

    t = threading.Thread(target=requests)  # the requests run while this thread kills a worker
    t.start()
    assert started.wait(10)
    time.sleep(0.5)  # inside a prefill: about a second of work at this size on 2 cores
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    t.join(90)
    assert not t.is_alive()
    assert "error" in box, "no request failed within 60 s of the kill"
    assert "rank 2 lost" in str(box["error"]) and "SIGKILL" in str(box["error"])
    assert box["at"] - killed < 20 + 5
    assert wait_gone(pids, 10) == []
    with pytest.raises(ClusterError, match="closed"):
        c(ids[:, :8])


def test_a_request_waiting_on_a_dead_rank_ends_at_once(gpt, reaper):
    """gloo can miss a peer's death: a send to a killed worker then waits out
    the whole exchange timeout (seen under load: `prism serve` answered a
    request 120 s after the kill). Rank 0 ends a request as soon as a rank
    is certainly gone. Its part here is a wait only the test ends, standing
    in for gloo's missed notice (a race this test cannot make happen)."""
    c = reaper.cluster(cluster(gpt, devices=2, timeout=60))
    ex = c.executor
    [pid] = ex.worker_pids
    release = threading.Event()
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ClusterError, match=r"request 1 failed: rank 1 lost: its process was killed by SIGKILL"):
            ex._guarded(lambda: release.wait(120), "request 1")
        assert time.monotonic() - t0 < 10  # 0.5 s to the kill, a second or two to tear down; not 60
    finally:
        release.set()
    assert wait_gone([pid], 10) == []
    with pytest.raises(ClusterError, match="closed"):
        c(ids_of(c))


def test_hung_worker_is_named_after_the_timeout(slow_model, reaper):
    """SIGSTOP: the socket stays open, so only the timeout and the stopped
    heartbeat tell; rank 0 must name the rank, and nothing is left behind.
    The 4 s are the exchange timeout: forming has its own (a loaded machine
    may take longer than that to start the workers)."""
    m = prism_ext.load(slow_model)
    c = reaper.cluster(cluster(m, devices=3, timeout=4))
    pids = c.executor.worker_pids
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"rank 1 lost: no heartbeat"):
        c(torch.randint(0, 512, (1, 64)), cr=4, outputs=("last",))
    assert time.monotonic() - t0 < 4 + 8
    assert wait_gone(pids, 10) == []


def start_coordinator(reaper, start: str, then: str = "time.sleep(120)\n", **popen):
    """A coordinator process: ``start`` forms a cluster ``c``, then ``then``
    runs; returns the process and its workers' pids (printed once formed)."""
    code = ("import signal, sys, time, torch, prism_ext\n"
            "from prism_ext.runtime import cluster\n"
            f"{start}\n"
            "print(*c.executor.worker_pids, flush=True)\n"
            f"{then}")
    coord = reaper.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **popen)
    return coord, [int(p) for p in coord.stdout.readline().split()]


def test_dead_coordinator_makes_workers_exit(reaper):
    coord, pids = start_coordinator(reaper, "c = cluster('gpt2-tiny', devices=3, timeout=20)")
    assert len(pids) == 2 and all(alive(p) for p in pids)
    coord.kill()
    coord.wait()
    assert wait_gone(pids, 10) == []


def test_ctrl_c_on_the_coordinator_stops_every_process(slow_model, reaper):
    """Ctrl-C as a terminal delivers it. The coordinator installs Python's
    handler itself: a process started with SIGINT ignored (pytest run in the
    background, `make check &`) passes that on, and Python then leaves it
    ignored. Whatever happens, the reaper ends the coordinator and workers."""
    coord, pids = start_coordinator(
        reaper, "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                f"c = cluster(prism_ext.load({str(slow_model)!r}), devices=3, timeout=20)",
        then="ids = torch.randint(0, 512, (4, 1024))\n"
             "while True:\n"
             "    c(ids, cr=4, outputs=('last',))\n", stderr=subprocess.PIPE)
    time.sleep(1.5)
    t0 = time.monotonic()
    coord.send_signal(signal.SIGINT)
    coord.wait(timeout=30)
    took, err = time.monotonic() - t0, coord.stderr.read()
    assert took < 10, err
    assert "KeyboardInterrupt" in err
    assert wait_gone(pids, 10) == []


def test_auto_weights_give_a_slower_rank_fewer_positions(gpt):
    """The plan calibration makes, from given timings (a real race between
    processes would test the machine's load, not the plan): rank 1 twice as
    slow gets weight 0.5 and about half of rank 0's positions. Calibration on
    real processes: test_vit_devices_receive_only_their_patches."""
    from prism_ext.executor.request import plan
    from prism_ext.runtime import speed_weights

    weights = speed_weights([0.010, 0.020, 0.0125])
    assert weights == [1.0, 0.5, 0.8]
    request = plan(gpt.net, {"input_ids": torch.zeros(1, 100, dtype=torch.long)},
                   prism_ext.RunOptions(cr=2, device_weights=weights), devices=3)
    sizes = [b - a for a, b in request.ranges]
    assert sum(sizes) == 100 and sizes[0] > sizes[2] > sizes[1]
    assert abs(sizes[1] / sizes[0] - 0.5) < 0.1


# ------------------------------------------------------------------- CLI

def test_prism_run_starts_processes_and_says_so(reaper):
    p = reaper.popen(PRISM + ["run", "--model", "gpt2-tiny", "--text", "The for statement", "--devices", "2",
                              "--cr", "2", "--max-new-tokens", "4", "--json", "-q"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    assert "ready" not in stderr, f"-q leaves the workers' ready lines: {stderr}"
    result = json.loads(stdout)
    assert result["runtime"].startswith("2 processes on this machine")
    assert result["reference"]["tokens_identical"] >= 0 and result["decode"]["bytes_sent"] == 0
    sim = subprocess.run(PRISM + ["run", "--model", "gpt2-tiny", "--text", "The for statement", "--devices", "2",
                                  "--cr", "2", "--max-new-tokens", "4", "--json", "-q", "--simulate"],
                         capture_output=True, text=True, timeout=120)
    assert json.loads(sim.stdout)["runtime"].startswith("2 simulated")
    assert json.loads(sim.stdout)["output"] == result["output"]


def test_worker_bad_arguments_are_one_line():
    out = subprocess.run(PRISM + ["worker", "--master", "nohost", "--rank", "1", "--world", "2", "--token", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "master: expected HOST:PORT" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_handshake_refuses_a_rank_pinned_to_other_exact_rows():
    from prism_ext.runtime.session import mismatches

    base = {"version": "1", "model_type": "gpt2", "config": "c", "weights": "w"}
    claims = [{**base, "settings": {"cr": 4, "exact_rows": "special"}},
              {**base, "settings": {"cr": 4, "exact_rows": "none"}},
              {**base, "settings": {"cr": 4}}]  # a rank that pinned nothing about it agrees
    assert mismatches(claims) == ["rank 1: exact_rows none differs from rank 0's special"]


# ------------------------------------------------- formation and liveness

def test_a_fresh_cluster_forms_in_a_process_that_saw_failed_ones(gpt, reaper):
    """A formation that times out (no worker comes) and one that a worker
    breaks in the handshake (a 2**40-byte frame announced) each fail with a
    ClusterError naming why; a cluster formed after them in this same
    process works (c10d's group counter, the stores, the threads: nothing
    of a failed attempt leaks into the next)."""
    port = free_port()
    with pytest.raises(ClusterError, match=r"rendezvous: not every rank joined within 2 s.*rank 0 waited up to 2 s for 1 worker"):
        cluster(gpt, master=f"127.0.0.1:{port}", world=2, token=TOKEN, timeout=20, start_timeout=2, ifname="lo")
    reaper.popen([sys.executable, "-c", HUGE_FRAME_WORKER, f"127.0.0.1:{port}", TOKEN], stderr=subprocess.DEVNULL)
    with pytest.raises(ClusterError, match=r"rank 1: announced a frame of 1099511627776 bytes"):
        cluster(gpt, master=f"127.0.0.1:{port}", world=2, token=TOKEN, timeout=20, ifname="lo")
    ids = ids_of(gpt)
    with reaper.cluster(cluster(gpt, devices=2, timeout=20)) as c:
        torch.testing.assert_close(c(ids, cr=2).logits, gpt(ids, devices=2, cr=2).logits, rtol=0, atol=1e-6)


def test_hung_coordinator_makes_workers_exit_within_the_timeout(reaper):
    """SIGSTOP on rank 0: its connections stay open, so only silence tells;
    the workers hear nothing for the 3 s timeout and exit."""
    coord, pids = start_coordinator(reaper, "c = cluster('gpt2-tiny', devices=3, timeout=3)")
    assert len(pids) == 2 and all(alive(p) for p in pids)
    os.kill(coord.pid, signal.SIGSTOP)
    assert wait_gone(pids, 3 + 20) == []
    assert alive(coord.pid)  # the coordinator is only stopped: its silence alone ended them


def test_a_worker_with_the_wrong_world_is_named_at_once(gpt, reaper):
    """--world 3 against a cluster of 2: the worker names the mismatch and
    exits (2) without waiting for a rank that never comes, and rank 0
    names the rank and its world."""
    port = free_port()
    w = start_worker(reaper, port, 1, 3)
    with pytest.raises(HandshakeError, match=r"rank 1: started with --world 3; this cluster has 2 devices"):
        cluster(gpt, master=f"127.0.0.1:{port}", world=2, token=TOKEN, timeout=20, start_timeout=300, ifname="lo")
    assert w.wait(timeout=60) == 2
    assert "world: this worker was started with --world 3; rank 0's cluster has 2 devices" in w.stderr.read()


def test_worker_join_timeout(reaper):
    """No coordinator ever starts: `prism worker` gives up after --join-timeout, saying so."""
    p = reaper.popen(PRISM + ["worker", "--master", f"127.0.0.1:{free_port()}", "--rank", "1", "--world", "2",
                              "--token", TOKEN, "--join-timeout", "2"], stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "no coordinator (rank 0) at 127.0.0.1:" in err and "within 2 s (--join-timeout)" in err
    assert len(err.strip().splitlines()) == 1, err
