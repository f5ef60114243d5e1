"""Work run in child processes by tests/test_hardening_fork.py (a module of
its own so spawn and forkserver children can import it by name)."""

from __future__ import annotations

import numpy as np


def kernel_work(seed: int) -> float:
    """One call of each kernel, large enough to go through the thread pool."""
    from prism_ext import kernels

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 256, 32), dtype=np.float32)
    means, _ = kernels.segment_means(x, 4)
    q = rng.standard_normal((2, 4, 128, 32), dtype=np.float32)
    out = kernels.compressed_attention(q, q, q)
    s = kernels.masked_softmax(rng.standard_normal((16, 128, 128), dtype=np.float32))
    return float(means.sum() + out.sum() + s.sum())


def threads_and_work(seed: int) -> tuple[int, float]:
    from prism_ext import kernels

    return kernels.get_num_threads(), kernel_work(seed)
