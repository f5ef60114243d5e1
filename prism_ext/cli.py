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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM distributed Transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, CPU features, the ISA each kernel uses, threads")
    info.set_defaults(func=_info)
    from .cli_jobs import register as register_jobs

    register_jobs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
