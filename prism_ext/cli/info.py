"""``prism info``: version, CPU features, the ISA each kernel dispatches to, threads."""

from __future__ import annotations

import argparse


def _info(args: argparse.Namespace) -> int:
    import platform

    import numpy as np
    import torch

    from .. import kernels
    from .._version import __version__

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
    return 0


def register(sub) -> None:
    info = sub.add_parser("info", help="version, CPU features, the ISA each kernel dispatches to, threads")
    info.set_defaults(func=_info)
