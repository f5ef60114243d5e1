"""Engine benchmarks (not tests; nothing is asserted).

1. P = 1: the engine's forward vs the Hugging Face model's own forward (sdpa
   attention), same threads, BERT-base and GPT-2-small configs, N = 512.
2. P = 4, N = 512: per-device time of PRISM at CR in {4, 16, 128} vs Voltage
   (own compute + (de)serialisation, no waiting), next to the counted FLOPs.
3. P = 4, N = 512, CR in {4, 16, 128}: each phase's share (compress,
   exchange, project, attention, mlp) of a device's time, with the C++
   kernels and with their torch peers swapped in (segment means as
   reshape + mean, attention as SDPA with a float mask of log counts and the
   causal rule), so the kernels' gain on the whole forward is measured.

Random weights from the standard configs (no download). Runs alternate
between the compared sides and report medians, so load from other processes
hits both alike. Writes bench/results/engine-<date>.json.

4. decode (LLM shapes): tokens/s of PRISM's decoding device after a --seq
   prompt against the same model on one device, same threads.

Models: bert-base and gpt2-small by default; --models adds random-weight
Qwen2.5-0.5B and Llama-3.2-1B shapes (bench/shapes.py), for which every part
runs a prefill with the last position's logits.

    python bench/bench_engine.py [--threads 1] [--reps 5] [--seq 512] [--only phases]
    python bench/bench_engine.py --models qwen2.5-0.5b llama-3.2-1b --devices 2 --cr 8 --only p1 p4 decode
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prism_ext
from prism_ext import kernels
from prism_ext.method.attention import count_bias
from prism_ext.method.engine import PHASES
from prism_ext.util.progress import progress, write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference  # noqa: E402  the torch reference of every kernel (tests/reference.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402  the LLM shapes (bench/shapes.py)


MODELS = ("bert-base", "gpt2-small", "qwen2.5-0.5b", "llama-3.2-1b")
LLM_SHAPES = {"qwen2.5-0.5b": "qwen", "llama-3.2-1b": "llama1b"}  # bench/shapes.py


def _configs(seq: int, names):
    """name -> (HF model, inputs maker), built one at a time (the 1B shape is 5 GB in float32)."""
    import transformers

    for name in names:
        if name == "bert-base":
            hf = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=True)  # bert-base-uncased
        elif name == "gpt2-small":
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        else:
            hf = shapes.llm(LLM_SHAPES[name])
        vocab = hf.config.vocab_size
        yield name, hf, lambda: {"input_ids": torch.randint(0, vocab, (1, seq))}


def _median_pair(fa, fb, reps: int):
    """Alternate fa/fb ``reps`` times after one warm-up each; medians (s)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def bench_p1(name, hf, make_inputs, model, reps):
    inputs = make_inputs()
    hf.config._attn_implementation = "sdpa"
    with torch.inference_mode():
        if name in LLM_SHAPES:  # a prefill: the last position's logits on both sides
            t_eng, t_hf = _median_pair(lambda: model(inputs, devices=1, outputs=("last",)),
                                       lambda: hf(**inputs, logits_to_keep=1), reps)
            err = (model(inputs, devices=1, outputs=("last",)).logits[:, -1]
                   - hf(**inputs, logits_to_keep=1).logits[:, -1]).abs().max().item()
        else:
            t_eng, t_hf = _median_pair(lambda: model(inputs, devices=1), lambda: hf(**inputs), reps)
            err = (model(inputs, devices=1).last_hidden_state
                   - hf(**inputs, output_hidden_states=True).hidden_states[-1]).abs().max().item()
    row = {"model": name, "positions": inputs["input_ids"].shape[1], "engine_s": t_eng, "hf_sdpa_s": t_hf,
           "engine_over_hf": t_eng / t_hf, "max_abs_err": err}
    write(f"P=1 {name:11s} N={row['positions']}: engine {t_eng * 1e3:8.1f} ms  HF {t_hf * 1e3:8.1f} ms  "
          f"ratio {t_eng / t_hf:.3f}  (max err {err:.1e})")
    return row


def _device_times(stats):
    return [d.seconds for d in stats.devices]


def bench_p4(name, make_inputs, model, reps, devices, crs, bar):
    inputs = make_inputs()
    rows = []
    out = {"outputs": ("last",)} if name in LLM_SHAPES else {}  # LLMs: a prefill (last position's logits)
    with torch.inference_mode():
        model(inputs, devices=devices, mode="voltage", **out)  # warm-up
        for cr in crs:
            samples_p, samples_v = [], []
            for _ in range(reps):  # alternate the two modes
                samples_p.append(model(inputs, devices=devices, cr=cr, **out).stats)
                samples_v.append(model(inputs, devices=devices, mode="voltage", **out).stats)
            med = lambda runs: [statistics.median(ts) for ts in zip(*(_device_times(s) for s in runs))]  # noqa: E731
            tp, tv = med(samples_p), med(samples_v)
            sp, sv = samples_p[-1], samples_v[-1]
            phases = lambda s: {ph: sum(l.time[ph] for d in s.devices for l in d.layers) / len(s.devices)  # noqa: E731
                                for ph in sp.devices[0].layers[0].time}
            row = {
                "model": name, "devices": devices, "positions": inputs["input_ids"].shape[1], "cr": cr,
                "prism_device_s": tp, "voltage_device_s": tv,
                "time_reduction_busiest": 1 - max(tp) / max(tv),
                "time_reduction_mean": 1 - sum(tp) / sum(tv),
                "flop_reduction_busiest": 1 - max(d.flops for d in sp.devices) / max(d.flops for d in sv.devices),
                "comm_reduction": 1 - sp.activation_bytes / sv.activation_bytes,
                "prism_bytes_per_layer": sp.bytes_sent / len(sp.crs), "voltage_bytes_per_layer": sv.bytes_sent / len(sv.crs),
                "prism_phase_s_mean_device": phases(sp), "voltage_phase_s_mean_device": phases(sv),
            }
            rows.append(row)
            write(f"P={devices} {name:11s} N={row['positions']} CR={cr:3d}: per-device time prism "
                  f"{max(tp) * 1e3:7.1f} ms vs voltage {max(tv) * 1e3:7.1f} ms (busiest): "
                  f"-{100 * row['time_reduction_busiest']:.1f}% measured, -{100 * row['flop_reduction_busiest']:.1f}% "
                  f"FLOPs, comm -{100 * row['comm_reduction']:.2f}%")
            bar.update(1)
    return rows


def _torch_attention(q, k, v, counts=None, q_pos=None, k_pos=None, scale=None):
    """The torch peer of kernels.compressed_attention, as the engine calls it
    (q/k/v [B, H, n, dh], counts [B, nk], positions [n] and [nk], or [B, n]
    and [B, nk] as the engine batches them): SDPA with a float mask, built per
    call (the engine has no other use for it)."""
    mask = count_bias(counts, q_pos, k_pos)[:, None]  # [B, 1 (heads), n or 1, nk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@contextlib.contextmanager
def torch_path():
    """The engine's kernel calls go to their torch peers inside the block (the
    engine and prism_attention look them up on the kernels module per call)."""
    saved = kernels.segment_means, kernels.compressed_attention
    kernels.segment_means, kernels.compressed_attention = reference.segment_means, _torch_attention
    try:
        yield
    finally:
        kernels.segment_means, kernels.compressed_attention = saved


def bench_phases(name, make_inputs, model, reps, devices, crs):
    """Per phase: mean over devices of its time, kernels vs torch peers,
    alternating; medians over reps. Shares are of the sum of the phases."""
    inputs = make_inputs()
    rows = []
    with torch.inference_mode():
        for cr in crs:
            with torch_path():
                ref = model(inputs, devices=devices, cr=cr).last_hidden_state  # warm-up, and the check below
            got = model(inputs, devices=devices, cr=cr).last_hidden_state
            samples = {"kernels": [], "torch": []}
            for _ in range(reps):
                samples["kernels"].append(model(inputs, devices=devices, cr=cr).stats)
                with torch_path():
                    samples["torch"].append(model(inputs, devices=devices, cr=cr).stats)
            row = {"model": name, "devices": devices, "positions": inputs["input_ids"].shape[1], "cr": cr,
                   "max_abs_diff": (got - ref).abs().max().item()}
            for path, runs in samples.items():
                per_run = [{ph: sum(l.time[ph] for d in s.devices for l in d.layers) / len(s.devices)
                            for ph in PHASES} for s in runs]
                med = {ph: statistics.median(r[ph] for r in per_run) for ph in PHASES}
                total = sum(med.values())
                row[path] = {"phase_s": med, "total_s": total, "share": {ph: t / total for ph, t in med.items()}}
            k, t = row["kernels"], row["torch"]
            row["gain_total"] = t["total_s"] / k["total_s"]
            # The phases the kernels serve, swapped one for the other with the
            # rest held at the kernel run's times: the other phases run the
            # same code on both paths, so their difference is noise.
            kern = ("compress", "attention")
            swapped = k["total_s"] - sum(k["phase_s"][ph] for ph in kern) + sum(t["phase_s"][ph] for ph in kern)
            row["gain_kernel_phases"] = swapped / k["total_s"]
            rows.append(row)
            shares = "  ".join(f"{ph} {100 * k['share'][ph]:4.1f}/{100 * t['share'][ph]:4.1f}%"
                               for ph in PHASES)
            print(f"phases P={devices} {name:11s} CR={cr:3d}: device {k['total_s'] * 1e3:7.1f} ms (kernels) vs "
                  f"{t['total_s'] * 1e3:7.1f} ms (torch) = {row['gain_total']:.3f}x (kernel phases alone: "
                  f"{row['gain_kernel_phases']:.3f}x); compress "
                  f"{t['phase_s']['compress'] / k['phase_s']['compress']:.2f}x, attention "
                  f"{t['phase_s']['attention'] / k['phase_s']['attention']:.2f}x; shares kernels/torch: {shares}")
    return rows


def bench_decode(name, make_inputs, model, reps, devices, crs, steps: int = 32):
    """Decoding after a prefill of the --seq prompt: tokens/s of the device
    that decodes (PRISM: the last one, its own KV cache plus the others'
    compressed keys/values, no traffic per token) against the same model on
    one device, same threads; medians of ``reps`` runs, alternating."""
    ids = make_inputs()["input_ids"]
    speed = lambda **kw: (lambda st: len(st.seconds) / sum(st.seconds))(  # noqa: E731
        model.generate(ids, max_new_tokens=steps + 1, eos_token_id=(), return_stats=True, **kw)[2])
    rows = []
    with torch.inference_mode():
        for cr in crs:
            single, prism = [], []
            speed(devices=1), speed(devices=devices, cr=cr)  # warm-up
            for _ in range(reps):
                single.append(speed(devices=1))
                prism.append(speed(devices=devices, cr=cr))
            s1, sp = statistics.median(single), statistics.median(prism)
            rows.append({"model": name, "devices": devices, "positions": ids.shape[1], "cr": cr, "steps": steps,
                         "single_tokens_per_s": s1, "prism_last_device_tokens_per_s": sp, "ratio": sp / s1})
            write(f"decode {name:12s} N={ids.shape[1]} P={devices} CR={cr:3d}: last device {sp:6.2f} tok/s vs one "
                  f"device {s1:6.2f} tok/s = {sp / s1:.3f}x")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch and kernel threads (both sides)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--cr", type=int, nargs="+", default=[4, 16, 128])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--only", choices=["p1", "p4", "phases", "decode"], nargs="+", default=["p1", "p4", "phases"],
                    help="parts to run (default: p1 p4 phases; decode is for the LLM shapes)")
    ap.add_argument("--models", choices=MODELS, nargs="+", default=list(MODELS[:2]),
                    help="default: bert-base gpt2-small; qwen2.5-0.5b and llama-3.2-1b are random-weight LLM shapes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prism_ext.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "isa": prism_ext.kernels.active_isa(), "threads": args.threads},
        "p1": [], "p4": [], "phases": [], "decode": [],
    }
    bar = progress(total=len(args.models) * (1 + len(args.cr)), desc="bench_engine", quiet=args.quiet,
                   unit="config")
    for name, hf, make_inputs in _configs(args.seq, args.models):
        hf.eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            model = prism_ext.load(tmp)
        if "p1" in args.only:
            result["p1"].append(bench_p1(name, hf, make_inputs, model, args.reps))
        bar.update(1)
        if "p4" in args.only:
            result["p4"].extend(bench_p4(name, make_inputs, model, args.reps, args.devices, args.cr, bar))
        if "phases" in args.only:
            result["phases"].extend(bench_phases(name, make_inputs, model, args.reps, args.devices, args.cr))
        if "decode" in args.only and name in LLM_SHAPES:
            result["decode"].extend(bench_decode(name, make_inputs, model, args.reps, args.devices, args.cr))
        del hf, model
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
