#!/usr/bin/env python3
"""Kernel benchmarks against torch, written to bench/results and bench/RESULTS.md.

A thin wrapper over :mod:`prism_ext.bench` (the shapes, the torch peers and the
timing live there, shared with ``prism bench kernels``). It adds what only a
source tree has: the commit, the JSON file ``bench/results/kernels-<date>.json``
and the generated block of ``bench/RESULTS.md`` (the text around the block is
kept, so the analysis of missed targets survives a re-run).

    python bench/bench_kernels.py            # full run, 1 and 2 threads
    python bench/bench_kernels.py --quick    # smoke run; writes only a -quick JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

from prism_ext import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench_kernels:begin -->", "<!-- bench_kernels:end -->"


def git_commit() -> str:
    """Short HEAD, '+dirty' if tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def results_block(report: dict, summary: dict, meta: dict) -> str:
    m = report["machine"]
    ctx = report["gbench_context"]
    load = ", ".join(f"{x:.2f}" for x in ctx.get("load_avg", [])) or "unknown"
    lines = [
        BEGIN,
        f"## Kernels vs torch — {meta['date']}",
        "",
        f"- machine: {m['cpu']} ({m['arch']}), {m['cores']} cores; CPU features: {', '.join(m['cpu_features'])}; "
        f"prism ISAs available: {', '.join(m['isas'])} (targets judged on {m['best_isa']})",
        f"- torch {m['torch']}, Python {m['python']}, prism-ext {m['prism_ext']}, commit {meta['commit']}",
        f"- google-benchmark {ctx.get('library_version', '?')}: wall time, median of {report['repetitions']} "
        f"randomly interleaved repetitions (min {report['min_time_s']} s each); load average at start: {load}",
        "- speedup = t_torch / t_prism (> 1: prism faster); rate = bytes/s (segment means, softmax) or "
        "FLOP/s (attention, causal counted dense) of the best ISA",
    ]
    lines += ["", bench.format_table(report, summary), "", "```", bench.format_summary(summary), "```", END]
    return "\n".join(lines)


def write_results_md(path: pathlib.Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few small shapes; RESULTS.md is left alone")
    parser.add_argument("--repetitions", type=int, help="repetitions per benchmark (default: 7, quick: 3)")
    parser.add_argument("--min-time", type=float, help="seconds per repetition (default: 0.05, quick: 0.01)")
    parser.add_argument("--results-dir", type=pathlib.Path, default=ROOT / "bench" / "results")
    parser.add_argument("--results-md", type=pathlib.Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.repetitions is not None and args.repetitions < 1:
        parser.error(f"--repetitions: must be >= 1, got {args.repetitions}")
    if args.min_time is not None and not args.min_time > 0:
        parser.error(f"--min-time: must be > 0, got {args.min_time}")
    try:
        threads = bench.parse_threads(args.threads)
    except ValueError as exc:
        parser.error(str(exc))

    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        report = bench.run(threads, quick=args.quick, repetitions=args.repetitions, min_time=args.min_time)
    except RuntimeError as exc:  # google-benchmark missing
        parser.exit(2, f"{parser.prog}: {exc}\n")
    summary = bench.summarize(report)
    meta = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit()}

    print(bench.format_table(report, summary))
    print()
    print(bench.format_summary(summary))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{now.strftime('%Y-%m-%d')}" + ("-quick" if args.quick else "")
    json_path = args.results_dir / f"{stem}.json"
    json_path.write_text(json.dumps({**meta, **report, "summary": summary}, indent=1) + "\n")
    print(f"wrote {json_path}")
    if not args.quick:
        write_results_md(args.results_md, results_block(report, summary, meta))
        print(f"wrote {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
