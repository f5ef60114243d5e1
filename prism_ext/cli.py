"""The ``prism`` command."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import prism_ext
    from prism_ext import kernels

    features = kernels.cpu_features()
    print(f"prism-ext {prism_ext.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__}")
    print("cpu       " + (", ".join(name for name, on in features.items() if on) or "no SIMD features detected"))
    print("isas      " + ", ".join(kernels.available_isas()))
    active = kernels.active_isa()
    for op in ("segment_means", "compressed_attention", "masked_softmax"):
        print(f"kernel    {op}: {active}")
    print(f"threads   {kernels.get_num_threads()}")
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import json

    from prism_ext import bench

    try:
        threads = bench.parse_threads(args.threads or bench.default_threads())
    except ValueError as exc:
        print(f"prism bench kernels: {exc}", file=sys.stderr)
        return 2
    try:
        report = bench.run(threads, quick=args.quick)
    except RuntimeError as exc:  # google-benchmark missing
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM distributed Transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, CPU features, the ISA each kernel uses, threads")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    kern = bench_sub.add_parser(
        "kernels",
        help="time each kernel (every available ISA) against its torch peer, in the same run",
        description="Kernel micro-benchmarks through google-benchmark's Python bindings "
        "(pip install 'prism-ext[bench]'). Prints a markdown table of median wall times and the "
        "speedup t_torch / t_prism; google-benchmark's own report goes to stderr.",
    )
    kern.add_argument("--threads", help="comma-separated kernel/torch thread counts (default: 1 and the core count)")
    kern.add_argument("--quick", action="store_true", help="a few small shapes, short runs: a smoke test")
    kern.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    kern.set_defaults(func=_bench_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
