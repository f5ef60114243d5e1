#!/usr/bin/env python3
"""Per-call cost of the kernels' call path (a benchmark, nothing asserted).

On tiny problems, where the call path is all there is, three ways to call each
kernel with the same inputs:

- face(torch): ``prism_ext.kernels`` with torch tensors (what the engine does);
- _C(torch): ``prism_ext._C`` directly with the same tensors;
- _C(numpy): ``prism_ext._C`` with numpy views made beforehand (the floor:
  argument checks, the output allocation and the kernel).

face - _C is the Python face's own overhead. Times are CPU time of this thread
(``time.thread_time``), so other processes on a shared machine do not count;
medians of ``--rounds`` rounds of ``--calls`` calls, the three interleaved.

    python bench/bench_call_overhead.py [--rounds 15] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from prism_ext import _C, kernels


def medians(calls, n: int, rounds: int) -> list[float]:
    for _ in range(max(1, n // 10)):
        for f in calls:
            f()
    samples = [[] for _ in calls]
    for _ in range(rounds):
        for i, f in enumerate(calls):
            t = time.thread_time()
            for _ in range(n):
                f()
            samples[i].append((time.thread_time() - t) / n)
    return [statistics.median(s) * 1e6 for s in samples]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    kernels.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, generator=gen)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (4, 6, 6))
    counts = torch.ones(6)
    q_pos, k_pos = torch.arange(2, 6, dtype=torch.int32), torch.arange(6, dtype=torch.int32)
    s = torch.randn(2, 4, 6, generator=gen)
    xn, qn, kn, vn, sn = x.numpy(), q.numpy(), k.numpy(), v.numpy(), s.numpy()
    cn, qpn, kpn = counts.numpy()[None], q_pos.numpy()[None], k_pos.numpy()[None]
    cases = [
        ("segment_means", lambda: kernels.segment_means(x, 4), lambda: _C.segment_means(x, 4, None),
         lambda: _C.segment_means(xn, 4, None)),
        ("compressed_attention", lambda: kernels.compressed_attention(q, k, v, counts, q_pos, k_pos),
         lambda: _C.compressed_attention(q, k, v, counts, q_pos, k_pos, None),
         lambda: _C.compressed_attention(qn, kn, vn, cn, qpn, kpn, None)),
        ("masked_softmax", lambda: kernels.masked_softmax(s, counts, q_pos, k_pos),
         lambda: _C.masked_softmax(s, counts, q_pos, k_pos, None, None),
         lambda: _C.masked_softmax(sn, cn, qpn, kpn, None, None)),
    ]
    print(f"{'kernel':22s} {'face(torch)':>12s} {'_C(torch)':>10s} {'_C(numpy)':>10s} {'face - _C':>10s}"
          "   (µs of CPU per call, medians)")
    for name, *calls in cases:
        face, c_torch, c_numpy = medians(calls, args.calls, args.rounds)
        print(f"{name:22s} {face:12.2f} {c_torch:10.2f} {c_numpy:10.2f} {face - c_torch:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
