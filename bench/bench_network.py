"""End-to-end latency over a shaped network (a benchmark; nothing is asserted).

One Linux network namespace per rank (bench/netlab.py: veth pairs to a bridge,
tbf on both directions of every link), one process per namespace with one
thread: rank 0 is the coordinator (prism_ext.runtime.cluster), ranks 1..P-1
are ``prism worker`` processes. For every model, P and link rate it measures
the wall time of one request on rank 0 (median of --reps requests after one
warm-up each; the configurations are interleaved request by request, so load
from other processes hits all of them alike) for

- single: the single-device peer (rank 0 alone, no network);
- tp: tensor parallel over P devices;
- voltage: position-wise, full activations on the wire;
- prism: position-wise, segment means on the wire, at each CR.

Beside the wall time: every rank's own compute (stats.devices[r].seconds, no
waiting), the engine's byte accounting (bytes_sent + result_bytes +
input_bytes per rank) and the bytes each rank's interface really sent (link
counters read before and after every measured request).

Random weights from the standard configs (transformers; no download):
BERT-base (N = 512, CLS out), GPT-2-small prefill (N = 512, last position's
logits), ViT-B/16 (224 px, N = 197, CLS out); batch 1. No added latency: the
kernel has no netem here and this benchmark adds none in user space, so a
link is its rate plus the (sub-millisecond) veth/bridge delay.

Needs root (network namespaces, qdiscs) and iproute2. Writes
bench/results/network-<date>.json, updates the "Shaped network" section of
bench/RESULTS.md (one block per model and P, so a subset run only replaces
its own blocks) and draws bench/results/network-<date>.png if matplotlib (the plot extra) is
installed.

    sudo .venv/bin/python bench/bench_network.py --models bert --devices 2 --crs 16,64
    sudo .venv/bin/python bench/bench_network.py              # everything: long
    sudo .venv/bin/python bench/bench_network.py --quick      # smoke: tiny BERT, P = 2, 100 Mbit/s
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import netlab  # noqa: E402  (stdlib only)
import shapes  # noqa: E402
from netlab import NetLab  # noqa: E402

MODES = ("single", "tp", "voltage", "prism")
MODEL_NAMES = {"bert": "BERT-base", "gpt2": "GPT-2-small", "vit": "ViT-B/16", "tiny": "BERT-tiny",
               "qwen": "Qwen2.5-0.5B shape", "llama1b": "Llama-3.2-1B shape"}
PORT = 29500
_LLM_SHAPES = ("qwen", "llama1b")  # prompt length set by --seq
TBF_GOODPUT = 0.956  # TCP goodput / configured rate through the lab's tbf (bench/netlab.py)


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(name: str, root: Path) -> Path:
    """A random-weight checkpoint of the model ``name`` in ``root/name``."""
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertModel(transformers.BertConfig())
    elif name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    elif name == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(image_size=224, patch_size=16))
    elif name in _LLM_SHAPES:
        model = shapes.llm(name)
    elif name == "tiny":  # the smoke run's model
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=128, vocab_size=1000))
    else:
        raise ValueError(f"unknown model {name!r}")
    path = root / name
    model.save_pretrained(path)
    del model
    return path


def model_inputs(name: str, seq: int | None = None):
    """(inputs, outputs, N) of one request: batch 1, fixed seed; ``seq``: the
    decoder LLM shapes' prompt length (default 512)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if name in ("qwen", "llama1b"):
        n = seq or 512
        return {"input_ids": torch.randint(0, 32000, (1, n), generator=g)}, ("last",), n
    if name == "bert":
        return {"input_ids": torch.randint(1000, 30000, (1, 512), generator=g)}, ("cls",), 512
    if name == "gpt2":
        return {"input_ids": torch.randint(0, 50257, (1, 512), generator=g)}, ("last",), 512
    if name == "vit":
        return {"pixel_values": torch.randn(1, 3, 224, 224, generator=g)}, ("cls",), 197
    if name == "tiny":
        return {"input_ids": torch.randint(0, 1000, (1, 128), generator=g)}, ("cls",), 128
    raise ValueError(name)


# ---------------------------------------------------------------- coordinator (inside rank 0's namespace)


def _link_tx(namespaces: list[str]) -> list[int]:
    """tx bytes of eth0 in each namespace (the lab's counters, read from here)."""
    out = []
    for ns in namespaces:
        r = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", netlab.IFNAME],
                           capture_output=True, text=True, check=True)
        out.append(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])
    return out


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), seconds (clock-tick resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return float("nan")


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (every core, every process) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TICK  # minus idle and iowait; guest time is inside user


def _proc_table(path: str, section: str) -> dict:
    """One section of /proc/<pid>/net/snmp or netstat (header line, value line) as a dict."""
    with open(path) as f:
        rows = [line.split() for line in f if line.startswith(section + ":")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:]))) if len(rows) >= 2 else {}


def _tcp_troubles(pids: list[int]) -> list[int]:
    """[retransmitted segments, retransmission timeouts] summed over the network namespaces of ``pids``
    (/proc/<pid>/net shows the namespace that process runs in)."""
    retrans = timeouts = 0
    for pid in pids:
        try:
            retrans += _proc_table(f"/proc/{pid}/net/snmp", "Tcp").get("RetransSegs", 0)
            timeouts += _proc_table(f"/proc/{pid}/net/netstat", "TcpExt").get("TCPTimeouts", 0)
        except OSError:
            pass
    return [retrans, timeouts]


def _tbf_drops(namespaces: list[str], hub: str | None) -> int:
    """Packets dropped by the tbf on both ends of every rank's link (queue full)."""
    total = 0
    sides = [(ns, netlab.IFNAME) for ns in namespaces] + ([(hub, f"r{r}") for r in range(len(namespaces))] if hub else [])
    for ns, dev in sides:
        r = subprocess.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev, "root"],
                           capture_output=True, text=True)
        try:
            total += int((json.loads(r.stdout) or [{}])[0].get("drops") or 0)
        except (ValueError, TypeError):
            pass
    return total


def _configs(modes, crs, points=("default",)):
    """(mode, cr, compression point) of every configuration; the point is
    None for the modes that average nothing."""
    out = []
    for mode in ("single", "prism", "voltage", "tp"):  # tp last: if it breaks the cluster, the rest is done
        if mode not in modes:
            continue
        if mode == "prism":
            out += [("prism", cr, point) for point in points for cr in crs]
        else:
            out.append((mode, None, None))
    return out


def coordinator(spec: dict) -> dict:
    """Runs one (model, P, rate) cell; returns its records. Runs inside rank 0's namespace."""
    import torch

    from prism_ext.runtime import cluster

    torch.set_num_threads(1)
    world, name = spec["world"], spec["model"]
    namespaces = spec["namespaces"]
    port = [PORT]  # a restarted cluster takes the next port (see open_cluster)
    token = secrets.token_hex(16)
    inputs, outputs, n = model_inputs(name, spec.get("seq"))
    env = dict(os.environ, PRISM_TOKEN=token, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    workers: list[subprocess.Popen] = []
    c_box: list = []
    logs = []
    log_dir = Path(spec["log_dir"])

    def start_workers():
        for r in range(1, world):
            log = open(log_dir / f"rank{r}.log", "a")
            logs.append(log)
            argv = ["ip", "netns", "exec", namespaces[r], sys.executable, "-m", "prism_ext", "worker",
                    "--master", f"{spec['addr0']}:{port[0]}", "--rank", str(r), "--world", str(world), "--ifname", netlab.IFNAME,
                    "--threads", "1", "--timeout", str(spec["timeout"]), "--model", spec["model_dir"]]
            # cwd away from the source tree: `-m prism_ext` must find the installed package, not ./prism_ext.
            workers.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            cwd=log_dir))

    def stop_workers():
        for p in workers:
            if p.poll() is None:
                p.terminate()
        for p in workers:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        workers.clear()
        for f in logs:
            f.close()
        logs.clear()

    def open_cluster():
        # A request that fails on rank 0 before it is sent (e.g. tp's plan, refused by decode_request) leaves
        # the failed cluster's TCPStore listening even after close(): a new cluster needs a new port.
        if c_box:
            port[0] += 1
        start_workers()
        # The rendezvous waits for every worker up to the timeout: one that dies at start-up ends the run now.
        started = threading.Event()

        def watch():
            while not started.wait(0.2):
                for r, p in enumerate(list(workers), start=1):
                    if p.poll() is not None:
                        text = (log_dir / f"rank{r}.log").read_text(errors="replace").strip().splitlines()[-5:]
                        print(f"bench_network: worker rank {r} exited with {p.returncode} during start-up:\n  "
                              + "\n  ".join(text), file=sys.stderr, flush=True)
                        stop_workers()
                        os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
        try:
            c_box.append(True)
            return cluster(spec["model_dir"], master=f"{spec['addr0']}:{port[0]}", world=world, token=token, ifname=netlab.IFNAME,
                           threads=1, timeout=spec["timeout"])
        finally:
            started.set()

    configs = _configs(spec["modes"], spec["crs"], spec.get("points") or ("default",))
    errors: dict[str, str] = {}
    c = None
    try:
        c = open_cluster()

        def call(mode, cr, point):
            if mode == "single":
                return c(inputs, devices=1, outputs=outputs)
            return c(inputs, mode=mode, cr=cr if mode == "prism" else 1, outputs=outputs,
                     compression_point=point or "default")

        # Background traffic (heartbeats to rank 0's store) over an idle second.
        b0 = _link_tx(namespaces)
        time.sleep(1.0)
        background = [a - b for a, b in zip(_link_tx(namespaces), b0)]

        live = []
        for mode, cr, point in configs:  # one warm-up each; a config that fails is reported and dropped
            try:
                call(mode, cr, point)
                live.append((mode, cr, point))
            except Exception as exc:  # noqa: BLE001 - reported in the results
                key = f"{mode}" + (f" {point}" if point and point != "default" else "") + (f" cr={cr}" if cr else "")
                errors[key] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                print(f"bench_network: {name} P={world} {spec['rate']} Mbit/s: {key} failed: {errors[key]}",
                      file=sys.stderr, flush=True)
                # The failure may have torn the cluster down (or left a worker dead): start afresh.
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
                stop_workers()
                c = open_cluster()

        samples = {cfg: [] for cfg in live}
        for _ in range(spec["reps"]):
            for cfg in live:
                pids = [os.getpid()] + [p.pid for p in workers]
                before = _link_tx(namespaces)
                tcp0, drops0 = _tcp_troubles(pids), _tbf_drops(namespaces, spec.get("hub"))
                cpu0, busy0 = [_cpu_seconds(q) for q in pids], _machine_busy()
                t0 = time.perf_counter()
                out = call(*cfg)
                wall = time.perf_counter() - t0
                cpu1, busy1 = [_cpu_seconds(q) for q in pids], _machine_busy()
                after = _link_tx(namespaces)
                tcp1, drops1 = _tcp_troubles(pids), _tbf_drops(namespaces, spec.get("hub"))
                st = out.stats
                cpu = [b - a for a, b in zip(cpu0, cpu1)]
                samples[cfg].append({
                    "wall": wall,
                    "wire_tx": [a - b for a, b in zip(after, before)],
                    "compute": [d.seconds for d in st.devices],
                    # CPU time of every rank's process during the request (all ranks, also idle ones), and
                    # what the rest of the machine used meanwhile: the noise from other jobs.
                    "cpu": cpu,
                    "other_cpu": [(busy1 - busy0) - sum(cpu)],
                    # TCP retransmitted segments and timeouts (all ranks), packets the tbfs dropped.
                    "troubles": [tcp1[0] - tcp0[0], tcp1[1] - tcp0[1], drops1 - drops0],
                    "bytes_sent": [d.bytes_sent for d in st.devices],
                    "result_bytes": [d.result_bytes for d in st.devices],
                    "input_bytes": [d.input_bytes for d in st.devices],
                    "flops": [d.flops for d in st.devices],
                    "peak_rss": [d.peak_rss for d in st.devices],
                })
    finally:
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        stop_workers()

    records = []
    for (mode, cr, point), ss in samples.items():
        med = lambda key: [statistics.median(s[key][r] for s in ss) for r in range(len(ss[0][key]))]  # noqa: E731
        engine = [b + res + i for b, res, i in zip(med("bytes_sent"), med("result_bytes"), med("input_bytes"))]
        wire = med("wire_tx")
        records.append({
            "model": name, "model_name": MODEL_NAMES[name], "N": n, "P": world, "rate_mbit": spec["rate"],
            "mode": mode, "cr": cr, "point": point, "devices_used": 1 if mode == "single" else world,
            "latency_s": statistics.median(s["wall"] for s in ss),
            "latency_all_s": [s["wall"] for s in ss],
            "compute_s": med("compute"), "cpu_s": med("cpu"), "other_cpu_s": med("other_cpu")[0],
            "tcp_retrans": med("troubles")[0], "tcp_timeouts": med("troubles")[1], "tbf_drops": med("troubles")[2],
            "flops": med("flops"), "peak_rss": med("peak_rss"),
            "bytes_sent": med("bytes_sent"), "result_bytes": med("result_bytes"), "input_bytes": med("input_bytes"),
            "engine_bytes": engine, "engine_bytes_total": sum(engine),
            "wire_tx_bytes": wire, "wire_tx_bytes_total": sum(wire),
        })
    return {"records": records, "errors": errors, "background_tx_bytes_per_s": background,
            "load_avg_end": os.getloadavg()}


# ---------------------------------------------------------------- driver (root namespace)


def run_cell(name: str, model_dir: Path, world: int, rate: float, args, log_dir: Path) -> dict:
    """Builds a lab for one (model, P, rate), runs the coordinator in rank 0's namespace."""
    with NetLab(world, rate) as lab:
        with tempfile.TemporaryDirectory(prefix="prism-netbench-") as tmp:
            spec = {"model": name, "model_dir": str(model_dir), "world": world, "rate": rate,
                    "namespaces": [lab.netns(r) for r in range(world)], "addr0": lab.addr(0), "hub": lab.hub,
                    "modes": args.modes, "crs": args.crs, "points": args.points, "seq": args.seq,
                    "reps": args.reps, "timeout": args.timeout,
                    "log_dir": str(log_dir)}
            spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
            spec_path.write_text(json.dumps(spec))
            with open(log_dir / "rank0.log", "a") as log:
                p = lab.popen(0, [sys.executable, str(Path(__file__).resolve()), "--role", "coordinator",
                                  "--spec", str(spec_path), "--result", str(out_path)],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
                try:
                    rc = p.wait(args.cell_timeout)
                except subprocess.TimeoutExpired:
                    rc = None  # the lab kills it (and the workers) on the way out
            if rc != 0 or not out_path.is_file():
                tail = (log_dir / "rank0.log").read_text(errors="replace").strip().splitlines()[-15:]
                why = "timed out" if rc is None else f"exited with {rc}"
                raise RuntimeError(f"coordinator for {name} P={world} {rate:g} Mbit/s {why}; "
                                   f"log tail ({log_dir}):\n  " + "\n  ".join(tail))
            return json.loads(out_path.read_text())


def _key(r: dict) -> tuple:
    return (r["model"], r["N"], r["P"], r["rate_mbit"], r["mode"], r["cr"], r.get("point"))


def _mode_label(r: dict) -> str:
    if r["mode"] != "prism":
        return r["mode"]
    point = r.get("point")
    return f"prism {point} CR={r['cr']}" if point and point != "default" else f"prism CR={r['cr']}"


def _fmt_bytes(b: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= k:
            return f"{b / k:.3g} {unit}"
    return f"{b:.0f} B"


def _mode_order(label: str) -> tuple:
    if label.startswith("prism"):
        return (3, label.split(" CR=")[0], int(label.split("=")[1]))
    return ({"single": 0, "tp": 1, "voltage": 2}.get(label, 9), "", 0)


def markdown_block(model: str, world: int, records: list[dict], meta: dict, n: int | None = None) -> str:
    """One block of the RESULTS.md section: latency table, ratios, per-rank compute, bytes."""
    recs = [r for r in records if r["model"] == model and r["P"] == world and n in (None, r["N"])]
    rates = sorted({r["rate_mbit"] for r in recs}, reverse=True)
    labels = sorted({_mode_label(r) for r in recs}, key=_mode_order)
    at = {(_mode_label(r), r["rate_mbit"]): r for r in recs}
    first = recs[0]
    lines = [f"### {first['model_name']}, N = {first['N']}, P = {world}", ""]
    lines.append(f"`{meta['command']}` ({meta['machine']}; {meta['date']}; reps {meta['reps']}, median; "
                 f"raw numbers in `results/{meta['json']}`).")
    if world > os.cpu_count():
        lines.append(f"P = {world} processes share {os.cpu_count()} cores: wall time includes waiting for a "
                     f"core; the per-rank compute columns below show each rank's own compute.")
    lines.append("")
    lines.append("Latency per request, ms (wall time on rank 0):")
    lines.append("")
    lines.append("| mode | " + " | ".join(f"{r:g} Mbit/s" for r in rates) + " |")
    lines.append("|---|" + "---|" * len(rates))
    for lab in labels:
        cells = [f"{1e3 * at[(lab, rt)]['latency_s']:.0f}" if (lab, rt) in at else "-" for rt in rates]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    # Ratios of prism against the others.
    ratio_rows = []
    for lab in labels:
        if not lab.startswith("prism"):
            continue
        for peer in ("single", "voltage", "tp"):
            if not any((peer, rt) in at for rt in rates):
                continue
            cells = []
            for rt in rates:
                a, b = at.get((lab, rt)), at.get((peer, rt))
                cells.append(f"{a['latency_s'] / b['latency_s']:.2f}x" if a and b else "-")
            ratio_rows.append(f"| {lab} / {peer} | " + " | ".join(cells) + " |")
    if ratio_rows:
        lines += ["", "Latency ratios (below 1: prism is faster):", "",
                  "| ratio | " + " | ".join(f"{r:g} Mbit/s" for r in rates) + " |", "|---|" + "---|" * len(rates)]
        lines += ratio_rows
    # Compute and bytes at the slowest rate measured (bytes do not depend on the rate).
    lines += ["", "Per request, at each rate: own compute per rank (ms, no waiting), then bytes: the engine's "
              "accounting (sum over ranks of bytes_sent + result_bytes + input_bytes) and what the ranks' "
              "interfaces sent (link counters, headers and the store's control traffic included); engine x fan-out "
              "counts each all-gathered payload once per receiving peer (P - 1 times), which is what the wire "
              "carries. CPU per rank: CPU "
              "time of each rank's process during the request (10 ms ticks; below its compute time when it "
              "waited for a core); other jobs' CPU: what the rest of the machine used meanwhile "
              f"(of at most {os.cpu_count()} x wall); last column: TCP segments retransmitted, retransmission "
              "timeouts (all ranks) and packets the tbfs dropped (queue full), per request:", "",
              "| mode | rate Mbit/s | wall ms | compute per rank ms | CPU per rank ms | other jobs' CPU ms "
              "| engine bytes | engine x fan-out | wire tx bytes | wire / fan-out | TCP retrans / RTOs / tbf drops |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab in labels:
        for rt in rates:
            r = at.get((lab, rt))
            if not r:
                continue
            comp = " / ".join(f"{1e3 * s:.0f}" for s in r["compute_s"])
            eng, wire = r["engine_bytes_total"], r["wire_tx_bytes_total"]
            # bytes_sent is what a rank serialised once; an all-gather hands it to each of the P - 1 peers
            # (tp's bytes_sent already counts its ring all-reduce per rank).
            fan = (sum(r["bytes_sent"]) * (1 if r["mode"] == "tp" else max(1, r["devices_used"] - 1))
                   + sum(r["result_bytes"]) + sum(r["input_bytes"]))
            ratio = f"{wire / fan:.2f}" if fan else "-"
            cpu = " / ".join(f"{1e3 * s:.0f}" for s in r["cpu_s"]) if "cpu_s" in r else "-"
            other = f"{max(0.0, 1e3 * r['other_cpu_s']):.0f}" if "other_cpu_s" in r else "-"
            trouble = (f"{r['tcp_retrans']:.0f} / {r['tcp_timeouts']:.0f} / {r['tbf_drops']:.0f}"
                       if "tbf_drops" in r else "-")
            lines.append(f"| {lab} | {rt:g} | {1e3 * r['latency_s']:.0f} | {comp} | {cpu} | {other} | "
                         f"{_fmt_bytes(eng)} | {_fmt_bytes(fan)} | {_fmt_bytes(wire)} | {ratio} | {trouble} |")
    # "<model> P=<P> <rate> Mbit/s: <config>" -> message; one line per (config, message) with its rates.
    grouped: dict[tuple, list] = {}
    for k, v in meta.get("errors", {}).items():
        m = re.match(rf"{re.escape(model)} P={world} (\S+) Mbit/s: (.*)", k)
        if m:
            grouped.setdefault((m.group(2), v), []).append(m.group(1))
    if grouped:
        lines += ["", "Failed configurations (not measured):", ""]
        lines += [f"- {cfg} at {', '.join(sorted(rates, key=float, reverse=True))} Mbit/s: {msg}"
                  for (cfg, msg), rates in sorted(grouped.items())]
    return "\n".join(lines) + "\n"


SECTION = "## Shaped network"
SECTION_INTRO = """\
## Shaped network

End-to-end latency of one request over a rate-limited network, by
`bench/bench_network.py`: one network namespace per device (veth to a bridge,
tbf on both directions of every link; TCP goodput is about 0.956 of the
configured rate), one process per namespace with one thread, rank 0 the
coordinator. single = the single-device peer on rank 0 alone; tp = tensor
parallel; voltage = position-wise, full activations; prism = position-wise,
segment means. No added delay (no netem here). Each block below is replaced
when its model and P are measured again; text outside the blocks is kept.
"""


def update_markdown(md_path: Path, records: list[dict], meta: dict) -> None:
    text = md_path.read_text() if md_path.is_file() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + SECTION_INTRO
    # The decoder LLM shapes run at several prompt lengths: a block per N (the others have one N each).
    for model, n, world in sorted({(r["model"], r["N"] if r["model"] in _LLM_SHAPES else None, r["P"])
                                   for r in records}, key=lambda t: (t[0], t[1] or 0, t[2])):
        name = model if n is None else f"{model} N={n}"
        begin, end = f"<!-- bench_network {name} P={world} begin -->", f"<!-- bench_network {name} P={world} end -->"
        block = f"{begin}\n{markdown_block(model, world, records, meta, n)}{end}\n"
        if begin in text and end in text:
            text = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: block, text, flags=re.S)
        else:
            # At the end of the section: before the next "## " heading after it, or at the end of the file.
            start = text.index(SECTION)
            nxt = text.find("\n## ", start + len(SECTION))
            if nxt < 0:
                text = text.rstrip("\n") + "\n\n" + block
            else:
                text = text[:nxt].rstrip("\n") + "\n\n" + block + text[nxt:]
    md_path.write_text(text)


def plot(records: list[dict], path: Path) -> str | None:
    """Latency against link rate: one panel per (model, P), one colour per mode
    in every panel (PRISM's CRs in one hue, darker as CR grows), one legend."""
    from prism_ext.util.plotting import PLOT_HINT, new_figure

    try:
        fig = new_figure(layout="constrained")
    except ImportError:
        return f"no plot: {PLOT_HINT}"
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    models = sorted({r["model"] for r in records}, key=lambda m: list(MODEL_NAMES).index(m))
    worlds = sorted({r["P"] for r in records})
    labels = sorted({_mode_label(r) for r in records}, key=_mode_order)
    crs = [lab for lab in labels if lab.startswith("prism")]
    colour = {"single": "0.35", "tp": "tab:orange", "voltage": "tab:red"}
    blues = colormaps["Blues"]
    colour.update({lab: blues(0.45 + 0.55 * i / max(1, len(crs) - 1)) for i, lab in enumerate(crs)})
    fig.set_size_inches(4.6 * len(worlds), 3.3 * len(models) + 0.6)
    grid = fig.subplots(len(models), len(worlds), squeeze=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for i, model in enumerate(models):
        for j, world in enumerate(worlds):
            ax = grid[i][j]
            recs = [r for r in records if r["model"] == model and r["P"] == world]
            if not recs:
                ax.set_visible(False)
                continue
            for lab in sorted({_mode_label(r) for r in recs}, key=_mode_order):
                pts = sorted((r["rate_mbit"], r["latency_s"]) for r in recs if _mode_label(r) == lab)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=lab,
                        color=colour.get(lab, "black"), linestyle="--" if lab == "single" else "-")
            rates = sorted({r["rate_mbit"] for r in recs})
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(rates)  # the measured link rates, as plain numbers
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels in every panel
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{recs[0]['model_name']}, N = {recs[0]['N']}, P = {world}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("link rate (Mbit/s)")
            if j == 0:
                ax.set_ylabel("latency per request (s)")
    handles, names = [], []
    for ax in grid.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    order = sorted(range(len(names)), key=lambda k: _mode_order(names[k]))
    fig.legend([handles[k] for k in order], [names[k] for k in order], loc="outside upper center",
               ncol=len(names), frameon=False, fontsize=9)
    fig.savefig(path, dpi=100)
    return None


def render(json_path: Path, md_path: Path) -> int:
    """Rewrites the blocks of every (model, P) in ``json_path`` (with the meta of the run that measured it)."""
    data = json.loads(json_path.read_text())
    records = data["records"]
    latest = {}
    for run in data.get("runs", []):
        for cell in run.get("cells", []):
            latest[(cell["model"], cell["P"])] = run
    for (model, world), run in sorted(latest.items()):
        update_markdown(md_path, [r for r in records if r["model"] == model and r["P"] == world], run)
    skipped = plot(records, json_path.with_suffix(".png"))
    print(f"bench_network: updated {md_path}" + (f"; {skipped}" if skipped else f", drew {json_path.with_suffix('.png')}"))
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=_csv(str), default=["bert", "gpt2", "vit"], help="bert,gpt2,vit")
    ap.add_argument("--devices", type=_csv(int), default=[2, 4], help="P values, e.g. 2,4")
    ap.add_argument("--rates", type=_csv(float), default=[1000, 100, 20], help="link rates, Mbit/s")
    ap.add_argument("--crs", type=_csv(int), default=[4, 16, 64, 128], help="prism compression ratios")
    ap.add_argument("--modes", type=_csv(str), default=list(MODES), help="single,tp,voltage,prism")
    ap.add_argument("--points", type=_csv(str), default=["default"],
                    help="prism's compression points, e.g. kv,attn_input (default: each family's)")
    ap.add_argument("--seq", type=int, default=None, help="prompt length of the qwen / llama1b shapes (default 512)")
    ap.add_argument("--reps", type=int, default=3, help="measured requests per configuration (after one warm-up)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny BERT, P = 2, 100 Mbit/s, CR 4,16, 2 reps")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--out", type=Path, default=None, help="directory for the JSON and the plot (default bench/results)")
    ap.add_argument("--md", type=Path, default=None,
                    help="markdown file to update (default bench/RESULTS.md; with --out or --quick: OUT/RESULTS.md)")
    ap.add_argument("--timeout", type=float, default=300, help="cluster timeout per exchange, s")
    ap.add_argument("--cell-timeout", type=float, default=3600, help="seconds for one (model, P, rate) cell")
    ap.add_argument("--role", choices=["driver", "coordinator"], default="driver", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only redraw the markdown blocks (--md) and the plot from a results JSON; no root needed")
    a = ap.parse_args(argv)

    if a.render:
        return render(a.render, a.md or HERE / "RESULTS.md")

    if a.role == "coordinator":
        # The lab SIGTERMs our process group on the way out: unwind so the workers are stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        res = coordinator(json.loads(a.spec.read_text()))
        a.result.write_text(json.dumps(res))
        return 0

    if os.geteuid() != 0:
        print("bench_network: needs root (network namespaces and qdiscs): run it as root, e.g. "
              "sudo .venv/bin/python bench/bench_network.py", file=sys.stderr)
        return 2
    ok, why = NetLab.available()
    if not ok:
        print(f"bench_network: network lab unavailable: {why}", file=sys.stderr)
        return 2
    if a.quick:
        a.models, a.devices, a.rates, a.crs, a.reps = ["tiny"], [2], [100.0], [4, 16], 2
    bad = [m for m in a.models if m not in MODEL_NAMES] + [m for m in a.modes if m not in MODES]
    if bad or a.reps < 1 or any(p < 2 for p in a.devices) or any(r <= 0 for r in a.rates):
        ap.error(f"bad option values {bad or ''} (models: {','.join(MODEL_NAMES)}; modes: {','.join(MODES)}; P >= 2; reps >= 1)")
    out_dir = a.out or HERE / "results"
    md_path = a.md or ((out_dir / "RESULTS.md") if (a.out or a.quick) else HERE / "RESULTS.md")
    out_dir.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc)
    json_path = out_dir / f"network-{date:%Y-%m-%d}.json"
    removed = netlab.cleanup_stale()
    if removed:
        print(f"bench_network: removed stale namespaces of dead runs: {' '.join(removed)}", flush=True)

    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    meta = {"command": f"python bench/bench_network.py {argv_shown}".strip(), "machine": machine(),
            "date": f"{date:%Y-%m-%d %H:%M} UTC", "reps": a.reps, "json": json_path.name, "errors": {},
            "tbf": {str(r): netlab.tbf_params(r) for r in a.rates}, "load_avg_start": os.getloadavg()}
    if max(a.devices) > (os.cpu_count() or 1):
        print(f"bench_network: P = {max(a.devices)} processes on {os.cpu_count()} cores: they share cores, so "
              f"wall time includes waiting for one; per-rank compute time is reported beside it", flush=True)
    # Earlier records of the same day are kept unless measured again.
    old = json.loads(json_path.read_text()) if json_path.is_file() else {}
    records = {_key(r): r for r in old.get("records", [])}
    runs = old.get("runs", [])
    t_start = time.monotonic()
    cells = []
    log_dir = Path(tempfile.mkdtemp(prefix="prism-netbench-logs-"))
    from prism_ext.util.progress import progress

    bar = progress(total=len(a.models) * len(a.devices) * len(a.rates), desc="bench_network", quiet=a.quiet,
                   unit="cell")
    with tempfile.TemporaryDirectory(prefix="prism-netbench-ckpt-") as ckroot:
        for name in a.models:
            bar.write(f"bench_network: making a random-weight {MODEL_NAMES[name]} checkpoint")
            model_dir = make_checkpoint(name, Path(ckroot))
            for world in a.devices:
                for rate in a.rates:
                    t0 = time.monotonic()
                    res = run_cell(name, model_dir, world, rate, a, log_dir)
                    for r in res["records"]:
                        records[_key(r)] = r
                    for k, v in res["errors"].items():
                        meta["errors"][f"{name} P={world} {rate:g} Mbit/s: {k}"] = v
                    cells.append({"model": name, "P": world, "rate_mbit": rate, "seconds": time.monotonic() - t0,
                                  "background_tx_bytes_per_s": res["background_tx_bytes_per_s"],
                                  "load_avg_end": res["load_avg_end"]})
                    summary = ", ".join(f"{_mode_label(r)} {1e3 * r['latency_s']:.0f} ms" for r in res["records"])
                    bar.write(f"bench_network: {name} P={world} {rate:g} Mbit/s ({time.monotonic() - t0:.0f} s): "
                              f"{summary}")
                    bar.update(1)
                    # Saved after every cell: an interrupted run keeps what it measured.
                    json_path.write_text(json.dumps({"records": sorted(records.values(), key=lambda r: str(_key(r))),
                                                     "runs": runs + [dict(meta, cells=cells)]}, indent=1))
    bar.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept (and named in the error) when a cell fails
    meta["seconds"] = time.monotonic() - t_start
    runs.append(dict(meta, cells=cells))
    all_records = sorted(records.values(), key=lambda r: str(_key(r)))
    json_path.write_text(json.dumps({"records": all_records, "runs": runs}, indent=1))
    measured = {(c["model"], c["P"]) for c in cells}
    update_markdown(md_path, [r for r in all_records if (r["model"], r["P"]) in measured], meta)
    png = out_dir / f"network-{date:%Y-%m-%d}.png"
    skipped = plot(all_records, png)
    print(f"bench_network: done in {meta['seconds']:.0f} s; wrote {json_path}, updated {md_path}"
          + (f"; {skipped}" if skipped else f", drew {png}"), flush=True)
    for k, v in meta["errors"].items():
        print(f"bench_network: FAILED {k}: {v}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
