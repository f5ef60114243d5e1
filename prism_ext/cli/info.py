"""``prism info``: version, CPU features, the ISA each kernel dispatches to, threads."""

from __future__ import annotations

import argparse


def _info(args: argparse.Namespace) -> int:
    import platform

    import numpy as np
    import torch

    from .. import kernels
    from .._version import __version__

    memory = [] if args.model is None else _memory(args.model, args.weight_dtype)  # a bad model fails before any line
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
    q8, s8 = np.ones((2, 8), dtype=np.int8), np.ones(2, dtype=np.float32)
    q4, s4 = np.ones((2, 4), dtype=np.uint8), np.ones((2, 1), dtype=np.float32)
    kernels.int8_linear(x[0], q8, s8)
    kernels.int4_linear(x[0], q4, s4, s4, 8)
    kernels.int8_dequantize(q8, s8)
    kernels.int4_dequantize(q4, s4, s4, 8)
    for op, isa in kernels.dispatched_isas().items():
        print(f"kernel    {op}: {isa}")
    print(f"threads   {kernels.get_num_threads()}")
    for line in memory:
        print(line)
    return 0


def _memory(model: str, weight_dtype: str) -> list[str]:
    """The lines saying what one device needs for ``model`` at
    ``weight_dtype``, from its shapes alone (no weights are read; nothing runs)."""
    from ..method.engine import peak_rss
    from ..models import skeleton_network

    mib = 1 << 20
    runtime = peak_rss()  # this process so far: Python, torch, the package
    net = skeleton_network(model)
    weights = net.weight_bytes_as(weight_dtype)
    # A decoding device keeps, per layer and position, a key and a value (kv_width each), a count and a position.
    per_position = sum(2 * blk.kv_width * 4 + 8 for blk in net.blocks)
    return [f"model     {model} ({net.model_type}, {len(net.blocks)} layers, weights {weight_dtype})",
            f"memory    weights {weights / mib:.1f} MiB on every device (PRISM splits positions, not weights)",
            f"          KV cache {per_position * 1000 / mib:.1f} MiB per 1000 positions of context (the decoding "
            f"device; keys and values of kv heads only)",
            f"          runtime {runtime / mib:.0f} MiB (this process before any model: Python, torch, prism-ext)",
            f"          one device needs about {(weights + runtime) / mib:.0f} MiB plus its KV cache and activations"]


def register(sub) -> None:
    from ..models.quant import WEIGHT_DTYPES
    from .args import one_line_errors, user_errors

    info = one_line_errors(sub.add_parser(
        "info", help="version, CPU features, the ISA each kernel dispatches to, threads; with --model, the memory "
                     "one device needs"), "info")
    info.add_argument("--model", help="a checkpoint directory or bundled name: print the memory one device needs "
                                      "(from its shapes; no weights are read)")
    info.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp32",
                      help="with --model: how the weights would be held (default fp32)")
    info.set_defaults(func=user_errors("info")(_info))
