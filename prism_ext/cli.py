"""The ``prism`` command."""

from __future__ import annotations

import argparse
import sys

from .cli_jobs import Bounded, _max_threads, _one_line_errors, _positive, _user_errors


def _info(args: argparse.Namespace) -> int:
    import platform

    import numpy as np
    import torch

    from prism_ext import kernels
    from prism_ext._version import __version__

    features = kernels.cpu_features()
    print(f"prism-ext {__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__}")
    print("cpu       " + (", ".join(name for name, on in features.items() if on) or "no SIMD features detected"))
    print("isas      " + ", ".join(kernels.available_isas()))
    # One tiny call of each kernel, then what the C++ dispatch says it ran.
    x = np.ones((1, 2, 8), dtype=np.float32)
    kernels.segment_means(x, 2)
    kernels.compressed_attention(x, x, x)
    kernels.masked_softmax(x)
    for op, isa in kernels.dispatched_isas().items():
        print(f"kernel    {op}: {isa}")
    print(f"threads   {kernels.get_num_threads()}")
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import json

    from prism_ext import bench

    threads = list(dict.fromkeys(args.threads)) if args.threads else bench.parse_threads(bench.default_threads())
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


# Standard configs (no weights needed): hidden size, MLP width, layers, default sequence lengths.
ACCOUNT_MODELS = {
    "bert-base": (768, 3072, 12, (128, 512)),
    "vit-b16": (768, 3072, 12, (197,)),  # 14 x 14 patches + [CLS] at 224 px
    "gpt2": (768, 3072, 12, (512, 1024)),
}
PAPER_HEADLINE = "paper (arXiv 2507.12145, BERT, CR = 128): communication -99.2%, per-device computation -51.24% (P, N not stated)"


def _config_dims(path: str) -> tuple[int, int, int]:
    """(d, d_ff, layers) from a config.json or a checkpoint directory."""
    from pathlib import Path

    from prism_ext.models import read_json

    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = read_json(p, "--config")
    except OSError as exc:
        raise ValueError(f"--config: cannot read {p} ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--config: {p} must hold a JSON object")
    if cfg.get("model_type") == "gpt2":
        return cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"], cfg["n_layer"]
    try:
        return cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    except KeyError as exc:
        raise ValueError(f"--config: {p} has no {exc}") from None


@_user_errors("account")
def _account(args: argparse.Namespace) -> int:
    import json

    from prism_ext.method.accounting import reduction_table

    models = []
    if args.config:
        d, d_ff, layers = _config_dims(args.config)
        if not args.seq:
            raise ValueError("--seq: required with --config")
        models.append((args.config, d, d_ff, layers, args.seq))
    for name in args.model or ([] if args.config else list(ACCOUNT_MODELS)):
        d, d_ff, layers, seqs = ACCOUNT_MODELS[name]
        models.append((name, d, d_ff, layers, args.seq or seqs))
    report = []
    for name, d, d_ff, layers, seqs in models:
        rows = reduction_table(d, d_ff, args.devices, seqs, args.cr)
        report.append({"model": name, "d": d, "d_ff": d_ff, "layers": layers, "rows": [
            dict(zip(("devices", "positions", "cr", "comm_reduction", "compute_reduction_busiest",
                      "compute_reduction_mean"), r)) for r in rows]})
    if args.json:
        print(json.dumps({"paper": PAPER_HEADLINE, "models": report}, indent=1))
        return 0
    print("PRISM vs Voltage, per Transformer layer (the same in every layer; embeddings and heads left out).")
    print("comm: activation bytes sent, all devices; compute: matmul + attention FLOPs of one device")
    print("(busiest = the device with the most FLOPs in each mode; mean = mean of per-device reductions).")
    for entry in report:
        print(f"\n{entry['model']}  d={entry['d']} d_ff={entry['d_ff']} layers={entry['layers']}")
        print(f"{'P':>4} {'N':>6} {'CR':>5} {'comm':>9} {'compute':>9} {'(mean)':>9}")
        for r in entry["rows"]:
            print(f"{r['devices']:>4} {r['positions']:>6} {r['cr']:>5} {-100 * r['comm_reduction']:>8.2f}% "
                  f"{-100 * r['compute_reduction_busiest']:>8.2f}% {-100 * r['compute_reduction_mean']:>8.2f}%")
    print("\n" + PAPER_HEADLINE)
    print("ours: communication -(1 - 1/CR) exactly when CR divides every device's share "
          f"(-{100 * (1 - 1 / 128):.2f}% at CR = 128), less when it does not (a share < CR still sends one mean);")
    print("      computation depends on P and N as in the table (no single figure without them).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM distributed Transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, CPU features, the ISA each kernel dispatches to, threads")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    kern = _one_line_errors(bench_sub.add_parser(
        "kernels",
        help="time each kernel (every available ISA) against its torch peer, in the same run",
        description="Kernel micro-benchmarks through google-benchmark's Python bindings "
        "(pip install 'prism-ext[bench]'). Prints a markdown table of median wall times and the "
        "speedup t_torch / t_prism; google-benchmark's own report goes to stderr.",
    ), "bench kernels")
    kern.add_argument("--threads", type=Bounded(1, _max_threads, many=True),
                      help="comma-separated kernel/torch thread counts (default: 1 and the core count)")
    kern.add_argument("--quick", action="store_true", help="a few small shapes, short runs: a smoke test")
    kern.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    kern.set_defaults(func=_bench_kernels)
    account = _one_line_errors(sub.add_parser(
        "account", help="communication and per-device computation reduction vs Voltage"), "account")
    account.add_argument("--model", action="append", choices=sorted(ACCOUNT_MODELS),
                         help="a standard config (repeatable; default: all)")
    account.add_argument("--config", help="a config.json or checkpoint directory instead of a standard config")
    account.add_argument("--devices", "-P", type=_positive, nargs="+", default=[2, 4, 8], help="device counts P")
    account.add_argument("--seq", "-N", type=_positive, nargs="+", help="sequence lengths N (default: per model)")
    account.add_argument("--cr", type=_positive, nargs="+", default=[4, 16, 128], help="compression rates")
    account.add_argument("--json", action="store_true", help="print JSON instead of a table")
    account.set_defaults(func=_account)
    from .cli_jobs import register as register_jobs

    register_jobs(sub)
    from .cli_serve import register as register_serve

    register_serve(sub)
    from .cli_eval import register as register_eval

    register_eval(sub)
    from .cli_finetune import register as register_finetune

    register_finetune(sub)
    return parser


def _one_line_accuracy_warnings() -> None:
    """AccuracyWarning as one line on stderr, once per message (the peer runs
    of `prism run` would repeat it), instead of Python's two-line format."""
    import warnings

    from prism_ext.method.partition import AccuracyWarning

    default, seen = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, AccuracyWarning):
            return default(message, category, filename, lineno, file, line)
        if str(message) not in seen:
            seen.add(str(message))
            print(f"prism: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_accuracy_warnings()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
