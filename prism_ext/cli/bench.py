"""``prism bench kernels``: each kernel against its torch peer, in the same run."""

from __future__ import annotations

import argparse
import sys

from .args import Bounded, max_threads, one_line_errors


def _bench_kernels(args: argparse.Namespace) -> int:
    import json

    from .. import bench

    threads = list(dict.fromkeys(args.threads)) if args.threads else bench.parse_threads(bench.default_threads())
    try:
        only = None if args.kernels is None else [k.strip() for k in args.kernels.split(",") if k.strip()]
        report = bench.run(threads, quick=args.quick, only=only)
    except (RuntimeError, ValueError) as exc:  # google-benchmark missing, unknown kernel names
        print(f"prism bench kernels: {exc}", file=sys.stderr)
        return 2
    summary = bench.summarize(report)
    print(bench.format_table(report, summary))
    print()
    print(bench.format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "summary": summary}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    kern = one_line_errors(bench_sub.add_parser(
        "kernels",
        help="time each kernel (every available ISA) against its torch peer, in the same run",
        description="Kernel micro-benchmarks through google-benchmark's Python bindings "
        "(pip install 'prism-ext[bench]'). Prints a markdown table of median wall times and the "
        "speedup t_torch / t_prism; google-benchmark's own report goes to stderr.",
    ), "bench kernels")
    kern.add_argument("--threads", type=Bounded(1, max_threads, many=True),
                      help="comma-separated kernel/torch thread counts (default: 1 and the core count)")
    kern.add_argument("--quick", action="store_true", help="a few small shapes, short runs: a smoke test")
    kern.add_argument("--kernels", metavar="NAMES",
                      help="comma-separated kernels to run (default: all; names as in the table's first column)")
    kern.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    kern.set_defaults(func=_bench_kernels)
