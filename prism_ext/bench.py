"""Kernel micro-benchmarks against their torch peers, timed in the same run.

The one implementation of the benchmark shapes and the torch peers: ``prism
bench kernels`` runs it from an installed wheel (no source tree, no compiler)
and ``bench/bench_kernels.py`` wraps it to write ``bench/results`` and
``bench/RESULTS.md``. Timing is google-benchmark's, through the Python
bindings of the PyPI package ``google-benchmark`` (extra ``bench``): wall
time (the kernels are multi-threaded), medians over repetitions that are
randomly interleaved across benchmarks so that a noisy neighbour on a shared
machine hits prism and torch alike.

Peers: segment means vs ``x.view(m, seg, d).mean(1)`` (plus the tail segment
``x[m*seg:].mean(0)`` when ``n % seg != 0``); compressed attention vs
``F.scaled_dot_product_attention`` with a float mask (log counts, -inf where
hidden) built outside the timed region; masked softmax vs
``torch.softmax(scores + mask, -1)`` with the same prebuilt mask. The
weight-only linear layers (issue 22) have two peers, each its own case:
``F.linear`` on the dequantized float32 weights (what the layer replaces) and
torch's own weight-only kernel on the same weights
(``aten._weight_int8pack_mm``; ``aten._weight_int4pack_mm_for_cpu`` with the
offsets moved to its ``(q - 8) * scale + zero`` form).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels
from .method.attention import count_bias

# Shapes from issue 2: a device owning nq of N = 512 positions attends to its
# own nq keys plus the segment means of the other N - nq positions.
SEQ_LEN = 512
QUERY_LENS = (64, 128, 256, 512)
COMPRESSION_RATES = (4, 16, 128)
# (label, heads, head size): BERT-base and GPT-2-small share the head shape,
# GPT-2 is the causal one; MiniLM is all-MiniLM-L6-v2.
MODELS = (("bert-base", 12, 64, False), ("gpt2-small", 12, 64, True), ("minilm", 12, 32, False))
SEGMENT_WIDTHS = (768, 384)
SGEMM_SIZE = 512

KERNELS = ("segment_means", "compressed_attention", "masked_softmax", "int8_linear", "int4_linear")

# Weight-only linear layers (issue 22): (label, K, N) of Qwen2.5-0.5B (MLP up,
# MLP down, fused q/k/v) and Llama-3.2-1B (MLP up), decoding M = 1 and a
# small batch M = 8; int4 with groups of 32.
LINEAR_SHAPES = (("qwen0.5b mlp-up", 896, 4864), ("qwen0.5b mlp-down", 4864, 896), ("qwen0.5b qkv", 896, 1152),
                 ("llama3.2-1b mlp-up", 2048, 8192))
LINEAR_ROWS = (1, 8)
INT4_GROUP = 32
LINEAR_PEERS = ("F.linear", "torch-pack")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Keys of one device: its own nq positions, then one mean per segment of
    CR positions of the other partitions. Own block placed so that earlier
    partitions lie before it and later ones after it (the causal case sees
    both kinds of mean); its start is a multiple of CR so no segment straddles
    it, which keeps nk = nq + ceil((N - nq) / CR)."""

    nq: int
    seq_len: int
    cr: int

    @property
    def start(self) -> int:
        return self.cr * (((self.seq_len - self.nq) // 2) // self.cr)

    def tensors(self):
        """(counts[nk], q_pos[nq], k_pos[nk]); a mean's position is the last
        position it covers, so later partitions stay hidden from own queries."""
        own = list(range(self.start, self.start + self.nq))
        counts, k_pos = [1.0] * self.nq, list(own)
        for lo, hi in ((0, self.start), (self.start + self.nq, self.seq_len)):
            for s in range(lo, hi, self.cr):
                e = min(hi, s + self.cr)
                counts.append(float(e - s))
                k_pos.append(e - 1)
        return (torch.tensor(counts), torch.tensor(own, dtype=torch.int32), torch.tensor(k_pos, dtype=torch.int32))

    @property
    def suffix(self) -> str:
        """' CR=x' when there are means (at nq = N the rate plays no part)."""
        return f" CR={self.cr}" if self.nq < self.seq_len else ""

    @property
    def nk(self) -> int:
        return self.nq + -(-(self.seq_len - self.nq) // self.cr)


def float_mask(counts: torch.Tensor, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None) -> torch.Tensor:
    """The torch peers' additive mask: log counts, -inf where hidden;
    [nq, nk] with positions, else [1, nk] broadcast over queries (what a torch
    user would pass for per-key weights)."""
    return count_bias(counts, q_pos, k_pos).contiguous()


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape of one kernel. ``setup()`` allocates the inputs
    (outside the timed region) and returns (prism call, torch call)."""

    kernel: str
    label: str  # model or tensor description
    shape: str  # for the table
    params: dict
    bytes: float  # minimal memory traffic per call (same for both peers)
    flops: float
    setup: Callable[[], tuple[Callable[[], object], Callable[[], object]]]

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.label}/{self.shape}"


def segment_means_case(n: int, d: int, seg: int) -> Case:
    m = -(-n // seg)
    m_full = n // seg

    def setup():
        x = torch.randn(n, d)

        def torch_call():
            full = x[: m_full * seg].view(m_full, seg, d).mean(1) if m_full else None
            tail = x[m_full * seg :].mean(0) if n % seg else None
            return full, tail

        return (lambda: kernels.segment_means(x, seg)), torch_call

    return Case(
        kernel="segment_means",
        label=f"d{d}",
        shape=f"n={n} seg={seg}",
        params={"n": n, "d": d, "seg": seg, "divides": n % seg == 0},
        bytes=4.0 * (n * d + m * d + m),
        flops=float(n * d),
        setup=setup,
    )


def attention_case(model: str, heads: int, dh: int, causal: bool, layout: Layout) -> Case:
    nq, nk = layout.nq, layout.nk

    def setup():
        q, k, v = (torch.randn(1, heads, rows, dh) for rows in (nq, nk, nk))
        counts, q_pos, k_pos = layout.tensors()
        if not causal:
            q_pos = k_pos = None
        mask = float_mask(counts, q_pos, k_pos)
        return (
            lambda: kernels.compressed_attention(q, k, v, counts, q_pos, k_pos),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        )

    return Case(
        kernel="compressed_attention",
        label=model + (" causal" if causal else ""),
        shape=f"H={heads} dh={dh} nq={nq} nk={nk}{layout.suffix}",
        params={"heads": heads, "dh": dh, "nq": nq, "nk": nk, "cr": layout.cr, "causal": causal},
        bytes=4.0 * heads * dh * (2 * nq + 2 * nk),
        # q.k and p.v, one multiply-add = 2 FLOPs; causal counted dense too.
        flops=4.0 * heads * nq * nk * dh,
        setup=setup,
    )


def softmax_case(heads: int, causal: bool, layout: Layout) -> Case:
    nq, nk = layout.nq, layout.nk

    def setup():
        scores = torch.randn(heads, nq, nk)
        counts, q_pos, k_pos = layout.tensors()
        if not causal:
            q_pos = k_pos = None
        mask = float_mask(counts, q_pos, k_pos)
        return (
            lambda: kernels.masked_softmax(scores, counts, q_pos, k_pos),
            lambda: torch.softmax(scores + mask, -1),
        )

    return Case(
        kernel="masked_softmax",
        label="causal" if causal else "bidirectional",
        shape=f"[{heads}, {nq}, {nk}]{layout.suffix}",
        params={"heads": heads, "nq": nq, "nk": nk, "cr": layout.cr, "causal": causal},
        bytes=4.0 * 2 * heads * nq * nk,
        flops=4.0 * heads * nq * nk,  # add, max, exp, scale per element (exp counted once)
        setup=setup,
    )


def linear_case(kernel: str, label: str, k: int, n: int, m: int, peer: str) -> Case:
    """One weight-only linear layer against one peer (LINEAR_PEERS). Weights
    scaled so outputs are O(1); both peers get the same weights."""
    int4 = kernel == "int4_linear"

    def setup():
        gen = torch.Generator().manual_seed(k * n + m)
        x = torch.randn(m, k, generator=gen)
        if int4:
            q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
            scale = torch.full((n, k // INT4_GROUP), 2.0 / (15 * k**0.5))
            offset = -7.5 * scale
            w = kernels.int4_dequantize(q, scale, offset, INT4_GROUP)
            prism_call = lambda: kernels.int4_linear(x, q, scale, offset, INT4_GROUP)  # noqa: E731
            if peer == "F.linear":
                return prism_call, lambda: F.linear(x, w)
            nibbles = torch.stack((q & 15, q >> 4), -1).reshape(n, k).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 2)
            # torch's int4 weight is (q - 8) * scale + zero: zero = offset + 8 scale.
            scale_zeros = torch.stack((scale.T, (offset + 8 * scale).T), -1).contiguous()
            return prism_call, lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scale_zeros)
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.full((n,), 1.0 / (127 * k**0.5))
        w = kernels.int8_dequantize(q, scale)
        prism_call = lambda: kernels.int8_linear(x, q, scale)  # noqa: E731
        if peer == "F.linear":
            return prism_call, lambda: F.linear(x, w)
        return prism_call, lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale)

    weight_bytes = n * k // 2 + 8 * n * (k // INT4_GROUP) if int4 else n * k + 4 * n
    return Case(
        kernel=kernel,
        label=f"{label} vs {peer}",
        shape=f"K={k} N={n} M={m}",
        params={"k": k, "n": n, "m": m, "peer": peer},
        bytes=float(weight_bytes + 4 * (m * k + m * n)),
        flops=2.0 * m * n * k,
        setup=setup,
    )


def _layouts(query_lens, rates, seq_len=SEQ_LEN) -> list[Layout]:
    """One layout per distinct (nq, nk): at nq = N every CR gives nk = N."""
    seen, out = set(), []
    for nq in query_lens:
        for cr in rates:
            lay = Layout(nq, seq_len, cr)
            if (nq, lay.nk) not in seen:
                seen.add((nq, lay.nk))
                out.append(lay)
    return out


def cases(quick: bool = False) -> list[Case]:
    """The shapes of issue 2, or (quick) one small shape per kernel plus a
    non-dividing segment-means case, for a smoke run."""
    if quick:
        lay = Layout(32, 128, 16)  # model heads, a short sequence: nk = 38
        return [
            segment_means_case(32, 384, 16),
            segment_means_case(31, 384, 16),
            attention_case("bert-base", 12, 64, False, lay),
            attention_case("gpt2-small", 12, 64, True, lay),
            softmax_case(12, True, lay),
            *(linear_case(kernel, "small", 256, 96, 1, peer) for kernel in ("int8_linear", "int4_linear")
              for peer in LINEAR_PEERS),
        ]
    out = []
    for d in SEGMENT_WIDTHS:
        for nq in QUERY_LENS:
            for cr in COMPRESSION_RATES:
                # nq itself (divides unless nq < CR) and a partition one row short.
                out += [segment_means_case(nq, d, cr), segment_means_case(nq - 1, d, cr)]
    layouts = _layouts(QUERY_LENS, COMPRESSION_RATES)
    for model, heads, dh, causal in MODELS:
        out += [attention_case(model, heads, dh, causal, lay) for lay in layouts]
    for causal in (False, True):
        out += [softmax_case(12, causal, lay) for lay in layouts]
    for kernel in ("int8_linear", "int4_linear"):
        for label, k, n in LINEAR_SHAPES:
            for m in LINEAR_ROWS:
                out += [linear_case(kernel, label, k, n, m, peer) for peer in LINEAR_PEERS]
    return out


def _sgemm_setup(size: int):
    a, b, c = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    return lambda: torch.mm(a, b, out=c)


def _load_google_benchmark():
    try:
        import google_benchmark
    except ImportError as exc:
        raise RuntimeError(
            "the kernel benchmarks need google-benchmark's Python bindings: pip install 'prism-ext[bench]' "
            "(or pip install google-benchmark)"
        ) from exc
    return google_benchmark


@dataclasses.dataclass
class _Entry:
    case: str
    kernel: str
    impl: str  # "torch" or "prism"
    isa: str | None
    threads: int
    bytes: float
    flops: float


def run(
    threads: list[int],
    quick: bool = False,
    repetitions: int | None = None,
    min_time: float | None = None,
    progress=sys.stderr,
    only: list[str] | None = None,
) -> dict:
    """Registers every case x thread count x (torch, prism per available ISA)
    with google-benchmark, runs them and returns the report: machine info,
    one record per benchmark (median wall time over repetitions and the
    coefficient of variation) and the single-thread sgemm reference.
    ``only``: the kernels (names in KERNELS) to run; default all.
    google-benchmark's console report goes to ``progress`` (a real file: its
    descriptor stands in for stdout during the run)."""
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"threads: expected thread counts >= 1, got {threads}")
    gb = _load_google_benchmark()
    repetitions = repetitions or (3 if quick else 7)
    min_time = min_time or (0.01 if quick else 0.05)
    isas = kernels.available_isas()
    if only is not None:
        unknown = [k for k in only if k not in KERNELS]
        if unknown or not only:
            raise ValueError(f"kernels: expected names from {', '.join(KERNELS)}, got {only}")
    all_cases = [c for c in cases(quick) if only is None or c.kernel in only]
    entries: list[_Entry] = []
    gb._benchmark.ClearRegisteredBenchmarks()

    def register(name: str, entry: _Entry, body: Callable[[object], None]) -> None:
        entries.append(entry)
        (
            gb._benchmark.RegisterBenchmark(name, body)
            .use_real_time()
            .unit(gb.kMicrosecond)
            .repetitions(repetitions)
            .min_time(min_time)
            .report_aggregates_only(True)
        )

    def body_for(call_factory: Callable[[], Callable[[], object]], n_threads: int, isa: str | None, entry: _Entry):
        def body(state) -> None:
            torch.set_num_threads(n_threads)
            kernels.set_num_threads(n_threads)
            # An exception must not cross into google-benchmark's C++ loop:
            # it becomes this benchmark's error and the run goes on.
            try:
                call = call_factory()
                with kernels.use_isa(isa) if isa else contextlib.nullcontext():
                    call()  # warm-up: first-touch of outputs, lazy inits
                    while state:
                        call()
            except Exception as exc:
                state.skip_with_error(f"{type(exc).__name__}: {exc}")
                return
            state.counters["bytes_per_second"] = gb.Counter(entry.bytes * state.iterations, gb.Counter.kIsRate)
            state.counters["flops"] = gb.Counter(entry.flops * state.iterations, gb.Counter.kIsRate)

        return body

    for case in all_cases:
        for t in threads:
            torch_entry = _Entry(case.name, case.kernel, "torch", None, t, case.bytes, case.flops)
            register(f"{case.name}/torch/t{t}", torch_entry,
                     body_for(lambda c=case: c.setup()[1], t, None, torch_entry))
            for isa in isas:
                entry = _Entry(case.name, case.kernel, "prism", isa, t, case.bytes, case.flops)
                register(f"{case.name}/prism-{isa}/t{t}", entry,
                         body_for(lambda c=case: c.setup()[0], t, isa, entry))
    sgemm = _Entry(f"sgemm/torch.mm/{SGEMM_SIZE}", "sgemm", "torch", None, 1, 4.0 * 3 * SGEMM_SIZE**2,
                   2.0 * SGEMM_SIZE**3)
    register(sgemm.case, sgemm, body_for(lambda: _sgemm_setup(SGEMM_SIZE), 1, None, sgemm))

    previous_threads = (torch.get_num_threads(), kernels.get_num_threads())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "gbench.json")
            gb.initialize([
                "prism-bench",
                f"--benchmark_out={out_path}",
                "--benchmark_out_format=json",
                "--benchmark_enable_random_interleaving=true",
            ])
            # google-benchmark's console report goes to stdout (fd 1); send it
            # to `progress` so stdout carries only the final table.
            with _fd1_to(progress):
                gb.run_benchmarks()
            with open(out_path) as f:
                raw = json.load(f)
    finally:
        torch.set_num_threads(previous_threads[0])
        kernels.set_num_threads(previous_threads[1])
        gb._benchmark.ClearRegisteredBenchmarks()

    records = _records(raw["benchmarks"], entries)
    case_info = {c.name: {"kernel": c.kernel, "label": c.label, "shape": c.shape, "params": c.params}
                 for c in all_cases}
    return {
        "machine": machine_info(),
        "gbench_context": raw.get("context", {}),
        "quick": quick,
        "repetitions": repetitions,
        "min_time_s": min_time,
        "threads": list(threads),
        "isas": isas,
        "cases": case_info,
        "records": records,
    }


class _fd1_to:
    """Points file descriptor 1 at another stream's descriptor for a while."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        sys.stdout.flush()
        self.stream.flush()
        self.saved = os.dup(1)
        os.dup2(self.stream.fileno(), 1)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        return False


_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def _records(benchmarks: list[dict], entries: list[_Entry]) -> list[dict]:
    """google-benchmark JSON -> one record per registered benchmark, matched
    by registration order (family_index; no filter is passed, so every
    registered family runs and keeps its index). With one repetition there are no
    aggregates; the single run is its own median."""
    by_family: dict[int, dict] = {}
    for b in benchmarks:
        slot = by_family.setdefault(b["family_index"], {})
        if b.get("error_occurred"):
            slot["error"] = b.get("error_message", "error")
        elif b["run_type"] == "aggregate":
            if b["aggregate_name"] in ("median", "cv"):
                slot[b["aggregate_name"]] = b
        else:
            slot.setdefault("runs", []).append(b)
    records = []
    for index, entry in enumerate(entries):
        slot = by_family.get(index, {})
        rec = dataclasses.asdict(entry)
        if "error" in slot or ("median" not in slot and not slot.get("runs")):
            rec.update(seconds=None, cv=None, error=slot.get("error", "no result"))
        else:
            med = slot.get("median") or slot["runs"][0]
            rec["seconds"] = med["real_time"] * _UNIT_SECONDS[med["time_unit"]]
            rec["cv"] = slot["cv"]["real_time"] if "cv" in slot else None
        records.append(rec)
    return records


def _cpu_name() -> str:
    """x86: 'model name'; ARM boards: 'Hardware' or the board 'Model' (x86's
    'model' is a number and is skipped)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    for key in ("model name", "hardware", "model"):
        if fields.get(key) and not fields[key].isdigit():
            return fields[key]
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    cpu = _cpu_name()
    from ._version import __version__

    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cpu_features": [k for k, v in kernels.cpu_features().items() if v],
        "isas": kernels.available_isas(),
        "best_isa": kernels.available_isas()[-1],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "prism_ext": __version__,
    }


# Targets of issue 11 for the best ISA, as speedup t_torch / t_prism: every
# shape >= 1.0x, and these where they ask for more.
ATTENTION_SGEMM_TARGET = 0.70


# Issue 22: decoding (M = 1, one thread) against F.linear on float32 weights.
LINEAR_TARGETS = {"int8_linear": 1.5, "int4_linear": 2.0}


def target(kernel: str, params: dict) -> float | None:
    if kernel in LINEAR_TARGETS:
        return LINEAR_TARGETS[kernel] if params["peer"] == "F.linear" and params["m"] == 1 else None
    if kernel == "masked_softmax":
        return 2.5
    if kernel == "segment_means":
        return 1.5 if params["divides"] else 3.0
    if kernel == "compressed_attention":
        return 1.3 if params["nq"] <= 64 else 1.0
    return None


def summarize(report: dict) -> dict:
    """Rows (one per case x thread count) with torch and per-ISA prism times,
    speedups and the target verdict for the best ISA; the sgemm reference and
    attention's fraction of it at nq = nk = 512, one thread."""
    isas, best = report["isas"], report["isas"][-1]
    index = {(r["case"], r["impl"], r["isa"], r["threads"]): r for r in report["records"]}
    rows = []
    for name, info in report["cases"].items():
        for t in report["threads"]:
            torch_rec = index[(name, "torch", None, t)]
            row = {"case": name, **info, "threads": t, "torch_s": torch_rec["seconds"], "prism_s": {},
                   "speedup": {}, "errors": {}}
            if torch_rec["seconds"] is None:
                row["errors"]["torch"] = torch_rec["error"]
            for isa in isas:
                rec = index[(name, "prism", isa, t)]
                row["prism_s"][isa] = rec["seconds"]
                if rec["seconds"] is None:
                    row["errors"][isa] = rec["error"]
                elif torch_rec["seconds"] is not None:
                    row["speedup"][isa] = torch_rec["seconds"] / rec["seconds"]
            # The targets are about the shapes, not the smoke ones.
            goal = None if report["quick"] or t != 1 and info["kernel"] in LINEAR_TARGETS else (
                target(info["kernel"], info["params"]))
            row["target"] = goal
            row["passed"] = None if goal is None or best not in row["speedup"] else row["speedup"][best] >= goal
            best_s = row["prism_s"][best]
            rec = index[(name, "prism", best, t)]
            row["best_rate"] = None if best_s is None else (
                rec["flops"] / best_s if info["kernel"] == "compressed_attention" else rec["bytes"] / best_s)
            rows.append(row)
    sgemm_rec = next(r for r in report["records"] if r["kernel"] == "sgemm")
    sgemm_flops = None if sgemm_rec["seconds"] is None else sgemm_rec["flops"] / sgemm_rec["seconds"]
    fractions = []
    for row in rows:
        p = row["params"]
        if (not report["quick"] and row["kernel"] == "compressed_attention" and p["nq"] == p["nk"] == SEQ_LEN
                and not p["causal"]
                and row["threads"] == 1 and sgemm_flops and row["prism_s"][best] and row["torch_s"]):
            flops = 4.0 * p["heads"] * p["nq"] * p["nk"] * p["dh"]
            frac = flops / row["prism_s"][best] / sgemm_flops
            fractions.append({"case": row["case"], "isa": best, "prism_fraction": frac,
                              "torch_sdpa_fraction": flops / row["torch_s"] / sgemm_flops,
                              "target": ATTENTION_SGEMM_TARGET, "passed": frac >= ATTENTION_SGEMM_TARGET})
    warnings = []
    load = report["gbench_context"].get("load_avg") or []
    cores = report["machine"]["cores"] or 1
    if load and load[0] > cores:
        # Seen here: torch's OpenMP threads then spin at barriers on a shared
        # core and 2-thread torch times grow by 100x; prism's pool sleeps.
        warnings.append(f"load average {load[0]:.1f} on {cores} cores when the run started: other processes "
                        "share the cores, multi-thread timings (torch's above all) measure that contention")
    return {"rows": rows, "sgemm": {"size": SGEMM_SIZE, "threads": 1, "seconds": sgemm_rec["seconds"],
                                    "flops_per_s": sgemm_flops},
            "attention_vs_sgemm": fractions, "warnings": warnings}


def _us(seconds: float | None) -> str:
    return "error" if seconds is None else f"{seconds * 1e6:.1f}"


def _rate(kernel: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.1f} GFLOP/s" if kernel == "compressed_attention" else f"{value / 1e9:.1f} GB/s"


def format_table(report: dict, summary: dict) -> str:
    """Markdown: one row per case x threads; times are medians in µs, the
    ratio in parentheses is the speedup t_torch / t_prism; the verdict is for
    the best ISA."""
    isas, best = report["isas"], report["isas"][-1]
    head = (["kernel", "case", "shape", "thr", "torch µs"] + [f"prism {isa} µs (speedup)" for isa in isas]
            + [f"{best} rate", "target", "verdict"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [row["kernel"], row["label"], row["shape"], str(row["threads"]), _us(row["torch_s"])]
        for isa in isas:
            sp = row["speedup"].get(isa)
            cells.append(_us(row["prism_s"][isa]) + ("" if sp is None else f" ({sp:.2f}x)"))
        cells.append(_rate(row["kernel"], row["best_rate"]))
        cells.append("-" if row["target"] is None else f">= {row['target']:g}x")
        cells.append("-" if row["passed"] is None else ("pass" if row["passed"] else "**miss**"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The sgemm reference, attention's fraction of it and the target tally."""
    sg = summary["sgemm"]
    lines = []
    if sg["flops_per_s"] is None:
        lines.append(f"sgemm {sg['size']}^3 (torch.mm, 1 thread): error")
    else:
        lines.append(f"sgemm {sg['size']}^3 (torch.mm, 1 thread): {sg['flops_per_s'] / 1e9:.1f} GFLOP/s")
    for f in summary["attention_vs_sgemm"]:
        lines.append(
            f"{f['case']} (1 thread, {f['isa']}): {100 * f['prism_fraction']:.0f}% of sgemm "
            f"(torch SDPA {100 * f['torch_sdpa_fraction']:.0f}%), target >= {100 * f['target']:.0f}%: "
            + ("pass" if f["passed"] else "miss"))
    verdicts = [r["passed"] for r in summary["rows"] if r["passed"] is not None]
    verdicts += [f["passed"] for f in summary["attention_vs_sgemm"]]
    lines.append(f"targets met: {sum(verdicts)} of {len(verdicts)}" if verdicts
                 else "targets: not judged (they apply to the full shape set, not --quick)")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    errors = [(r["case"], r["threads"], k, e) for r in summary["rows"] for k, e in r["errors"].items()]
    lines += [f"error: {case} t{t} {impl}: {msg}" for case, t, impl, msg in errors]
    return "\n".join(lines)


def parse_threads(text: str) -> list[int]:
    """'1,2' -> [1, 2]; each a positive int, duplicates dropped."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"threads: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"threads: expected thread counts >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def default_threads() -> str:
    """1 and every core of the machine (1 and 2 on a 2-core board)."""
    return ",".join(str(t) for t in dict.fromkeys((1, os.cpu_count() or 1)))
