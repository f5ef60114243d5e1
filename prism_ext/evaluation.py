"""``prism eval``: accuracy against cost over a grid of devices x CR x knobs.

Every point runs the real engine (in-process transport, :func:`prism_ext.load`'s
simulation) on a task's items and is scored twice: on the task (accuracy,
perplexity, linear-probe accuracy) and for fidelity to the exact model
(top-1 agreement, cosine of pooled embeddings, retrieval agreement:
:mod:`prism_ext.util.metrics`), next to the bytes sent and the busiest
device's FLOPs per sequence, so accuracy can be read against cost. Every
metric carries its 95% interval and the count it rests on (``intervals``);
the plot draws the intervals, and never a metric resting on fewer than
``MIN_PLOTTED`` examples when another is at hand. Items are batched by
length only (no padding), so a sequence's partition is that of the
sequence alone.

Tasks (``--task``):
  images        image classifier on its labels: ``--data`` a CIFAR python folder,
                an ImageNet-style folder (``--label-map``), or none for the
                held-out digits shipped with vit-tiny-digits
  glue-sst2|glue-mrpc|glue-rte|glue-mnli
                a GLUE dev TSV: a classifier on its labels, a bare encoder by a
                linear probe on exact-model features (half the items each way)
  pydoc-topics  a bare encoder on 256-token windows of Python's own
                documentation: cosine and retrieval fidelity, and a linear
                probe for which topic a window comes from
  embed         a bare encoder on the lines of a text corpus (``--data``: a file,
                folder or glob): cosine and retrieval fidelity
  lm            a GPT-2 on held-out text (``--data`` a text file; none: the
                gpt2-tiny held-out split): perplexity, next-token agreement
  cbt           a GPT-2 on a CBT file (``--data``), or on a CBT-format cloze set
                built from the held-out text; candidates scored by likelihood
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .api import PrismModel
from .models.common import Network
from .options import RunOptions
from .inputs.datasets import GLUE_TASKS, ClozeItem, read_cbt, read_cifar, read_glue, read_image_folder, write_cbt
from .method.partition import AccuracyWarning, partition
from .inputs.corpus import read_lines, text_files
from .util import metrics as stats
from .util.plotting import new_figure
from .util.progress import progress

__all__ = ["TASKS", "SCHEDULES", "MIN_PLOTTED", "Variant", "build_task", "evaluate", "write_report",
           "cr_for_schedule", "plotted"]

TASKS = ("images", "pydoc-topics", "embed", "lm", "cbt") + tuple(f"glue-{t}" for t in GLUE_TASKS)
MIN_PLOTTED = 200  # a metric resting on fewer examples is not the plotted one when another is at hand
SCHEDULES = ("flat", "ends", "grow")


def cr_for_schedule(schedule: str, cr: int, layers: int):
    """Per-layer CR: ``flat`` cr everywhere; ``ends`` exact (CR 1) first and
    last layers; ``grow`` from 1 at the first layer to 2 cr - 1 at the last."""
    if schedule == "flat" or cr == 1:
        return cr
    if schedule == "ends":
        return [1] + [cr] * (layers - 2) + [1] if layers > 2 else [1] * layers
    if schedule == "grow":
        return [max(1, round(1 + (2 * cr - 2) * i / max(1, layers - 1))) for i in range(layers)]
    raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")


# The run options a line of the grid varies (mode, CR and devices are the grid's axes).
KNOBS = ("exact_rows", "wire_dtype", "compression_point", "mean_weighting")


@dataclasses.dataclass(frozen=True)
class Variant:
    """The knobs of one line of the grid: run options (those of ``KNOBS``)
    and a per-layer CR ``schedule`` (:func:`cr_for_schedule`)."""

    options: RunOptions = RunOptions()
    schedule: str = "flat"

    def knobs(self) -> dict:
        meta = self.options.to_meta()
        return {**{k: meta[k] for k in KNOBS}, "schedule": self.schedule}

    def label(self, net: Network) -> str:
        """The knobs that differ from ``net``'s plain run, each as it resolves
        for that family ("default" and its meaning read alike)."""
        def resolved(knobs: dict) -> dict:
            return {k: net.resolve(k, v) if k in net.defaults else v for k, v in knobs.items()}

        default = resolved(Variant().knobs())
        parts = [f"{k}={v}" for k, v in resolved(self.knobs()).items() if v != default[k]]
        return ", ".join(parts) or "plain PRISM"


# ---------------------------------------------------------------- tasks

class Task:
    """Items (one sequence each: inputs with batch 1), what to ask the engine
    for, how to read one sequence's result and how to score a point."""

    name: str
    outputs: tuple[str, ...]
    metric: str  # the task metric's name (higher is better unless ``lower_is_better``)
    fidelity: str
    lower_is_better = False
    note = ""

    def __init__(self, items: list[dict]):
        if not items:
            raise ValueError("data: the task has no items")
        self.items = items

    positions: int | None = None  # images: every item has the same patches + [CLS]

    def lengths(self) -> list[int]:
        """Positions of each item (what the devices partition)."""
        if self.positions is not None:
            return [self.positions] * len(self.items)
        return [it["input_ids"].shape[1] for it in self.items]

    def extract(self, fields: dict, inputs: dict, b: int, item: int):
        """What scoring needs of sequence ``b`` of a batch (item ``item``)."""
        raise NotImplementedError

    def score(self, exact: list, got: list) -> dict:
        raise NotImplementedError

    def intervals(self, exact: list, got: list) -> dict:
        """{metric: {"ci": [low, high], "n": examples}}: 95% intervals of :meth:`score`'s metrics."""
        raise NotImplementedError


def _wilson(hits, n: int | None = None) -> dict:
    """A proportion's interval from per-item hits (or a count of ``n``)."""
    hits = np.asarray(hits)
    k, n = (int(hits.sum()), hits.size) if n is None else (int(hits), n)
    return {"ci": list(stats.wilson(k, n)), "n": n}


class ClassifierTask(Task):
    outputs = ("cls",)
    metric, fidelity = "accuracy", "agreement"

    def __init__(self, name, items, labels, note=""):
        super().__init__(items)
        self.name, self.labels, self.note = name, np.asarray(labels), note

    def extract(self, fields, inputs, b, item):
        return fields["logits"][b]

    def score(self, exact, got):
        pred = torch.stack(got).argmax(-1).numpy()
        ref = torch.stack(exact).argmax(-1).numpy()
        return {"accuracy": float((pred == self.labels).mean()), "agreement": float((pred == ref).mean())}

    def intervals(self, exact, got):
        pred = torch.stack(got).argmax(-1).numpy()
        ref = torch.stack(exact).argmax(-1).numpy()
        return {"accuracy": _wilson(pred == self.labels), "agreement": _wilson(pred == ref)}


class EmbeddingTask(Task):
    """A bare encoder: mean-pooled embeddings; cosine to the exact model,
    retrieval agreement (:func:`prism_ext.util.metrics.retrieval`: each item
    a query against the others, PRISM's neighbours against the exact
    model's), and with labels a linear probe trained on the exact model's
    features of the ``train`` items, applied to PRISM's features of the
    others. The probe is the plotted metric only when it is tested on
    ``MIN_PLOTTED`` items or more (a handful of test items is noise drawn
    as a result); retrieval agreement is, otherwise."""

    outputs = ("pooled",)
    fidelity = "cosine_mean"

    def __init__(self, name, items, labels=None, train=None, note=""):
        super().__init__(items)
        self.name, self.note = name, note
        self.labels = None if labels is None else np.asarray(labels)
        self.train = train
        probe_tests = 0 if labels is None else int((~train).sum())
        self.metric = "probe_accuracy" if probe_tests >= MIN_PLOTTED else "nn_agreement"
        self._probe = None

    def extract(self, fields, inputs, b, item):
        return fields["mean_pooled"][b]

    def _fit(self, exact: np.ndarray):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(exact[self.train])
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(exact[self.train]), self.labels[self.train])
        return scaler, clf

    def _per_item(self, exact, got) -> dict[str, np.ndarray]:
        e = torch.stack(exact).double()
        g = torch.stack(got).double()
        out = {"cosine": torch.nn.functional.cosine_similarity(g, e, dim=-1).numpy()}
        if len(e) >= 2:
            out.update(stats.retrieval_per_query(e, g))
        if self.labels is not None:
            if self._probe is None:
                self._probe = self._fit(e.numpy())
            scaler, clf = self._probe
            test = ~self.train
            out["probe"] = clf.predict(scaler.transform(g.numpy()[test])) == self.labels[test]
        return out

    def score(self, exact, got):
        per = self._per_item(exact, got)
        out = {"cosine_mean": float(per["cosine"].mean()), "cosine_worst": float(per["cosine"].min())}
        out.update({k: float(v.mean()) for k, v in per.items() if k not in ("cosine", "probe")})
        if "probe" in per:
            out["probe_accuracy"] = float(per["probe"].mean())
        return out

    def intervals(self, exact, got):
        per = self._per_item(exact, got)
        out = {"cosine_mean": {"ci": list(stats.bootstrap_mean(per["cosine"])), "n": len(per["cosine"])}}
        for k in ("nn_agreement", "top5_agreement"):
            if k in per:
                out[k] = _wilson(per[k])
        if "recall_at_10" in per:
            out["recall_at_10"] = {"ci": list(stats.bootstrap_mean(per["recall_at_10"])),
                                   "n": len(per["recall_at_10"])}
        if "probe" in per:
            out["probe_accuracy"] = _wilson(per["probe"])
        return out


class LanguageModelTask(Task):
    outputs = ("rows",)
    metric, fidelity = "perplexity", "agreement"
    lower_is_better = True

    def __init__(self, name, items, note=""):
        super().__init__(items)
        self.name, self.note = name, note

    def extract(self, fields, inputs, b, item):
        logits = fields["logits"][b, :-1].double()
        ids = inputs["input_ids"][b, 1:]
        nll = torch.nn.functional.cross_entropy(logits, ids, reduction="sum")
        return float(nll), logits.shape[0], logits.argmax(-1)

    def score(self, exact, got):
        nll = sum(g[0] for g in got)
        count = sum(g[1] for g in got)
        agree = sum(int((g[2] == e[2]).sum()) for g, e in zip(got, exact))
        return {"perplexity": math.exp(nll / count), "agreement": agree / count}

    def intervals(self, exact, got):
        # over windows, not tokens: the tokens of one window are not independent draws
        nll, count = [g[0] for g in got], [g[1] for g in got]
        agree = [int((g[2] == e[2]).sum()) for g, e in zip(got, exact)]
        lo, hi = stats.bootstrap_ratio(nll, count)
        return {"perplexity": {"ci": [math.exp(lo), math.exp(hi)], "n": len(got)},
                "agreement": {"ci": list(stats.bootstrap_ratio(agree, count)), "n": len(got)}}


class ClozeTask(Task):
    """CBT: each item is the context and query with one candidate filled in;
    its score is the log-likelihood of the query from the candidate on."""

    outputs = ("rows",)
    metric, fidelity = "accuracy", "agreement"

    def __init__(self, name, items, starts, groups, answers, note=""):
        super().__init__(items)
        self.name, self.note = name, note
        self.starts, self.groups, self.answers = starts, groups, np.asarray(answers)

    def extract(self, fields, inputs, b, item):
        logp = torch.log_softmax(fields["logits"][b, :-1].double(), dim=-1)
        ids = inputs["input_ids"][b, 1:]
        start = self.starts[item]
        return float(logp[start - 1:].gather(1, ids[start - 1:, None]).sum())

    def _choices(self, scores):
        return np.array([int(np.argmax([scores[i] for i in g])) for g in self.groups])

    def score(self, exact, got):
        mine, ref = self._choices(got), self._choices(exact)
        return {"accuracy": float((mine == self.answers).mean()), "agreement": float((mine == ref).mean())}

    def intervals(self, exact, got):
        mine, ref = self._choices(got), self._choices(exact)
        return {"accuracy": _wilson(mine == self.answers), "agreement": _wilson(mine == ref)}


# ------------------------------------------------------------ task data

def _pixels_task(model: PrismModel, data, label_map, limit) -> ClassifierTask:
    if model.net.head != "classification":
        raise ValueError(f"task images: needs an image classifier; {model.model_type} has head {model.net.head}")
    proc = model.image_processor
    if data is None:
        if proc.digits is None or model.directory is None or not (model.directory / "heldout_digits.npz").is_file():
            raise ValueError("--data: required (a CIFAR folder or an image folder) for a model with no bundled "
                             "held-out set")
        z = np.load(model.directory / "heldout_digits.npz")
        px, labels, what = proc.digits_to_pixels(z["images"][:limit]), z["labels"][:limit], "bundled held-out digits"
    else:
        root = Path(data)
        if (root / "batches.meta").is_file() or (root / "meta").is_file():
            images = read_cifar(root, limit=limit)
        else:
            images = read_image_folder(root, label_map, limit=limit)
        px = proc.to_pixels(list(images.images))
        labels, what = images.labels, f"{root} ({len(images.labels)} images)"
    items = [{"pixel_values": px[i:i + 1]} for i in range(len(px))]
    task = ClassifierTask("images", items, labels, note=f"{what}; the model's classification head on its labels")
    task.positions = model.net.grid ** 2 + 1
    return task


def _text_inputs(model: PrismModel, first: str, second: str | None, max_len: int) -> dict:
    tok = model.tokenizer
    wrap = tok.encode("")  # the special tokens alone: [CLS] [SEP] for BERT-style tokenizers
    cls, sep = (wrap[:1], wrap[-1:]) if len(wrap) == 2 else ([], [])
    a = tok.encode(first, add_special_tokens=False)
    ids, types = cls + a + sep, [0] * (len(cls) + len(a) + len(sep))
    if second is not None:
        b = tok.encode(second, add_special_tokens=False) + sep
        ids, types = ids + b, types + [1] * len(b)
    ids, types = ids[:max_len - len(sep)] + (sep if len(ids) > max_len else []), types[:max_len]
    out = {"input_ids": torch.tensor([ids])}
    if "token_type_ids" in model.net.input_names:
        out["token_type_ids"] = torch.tensor([types])
    return out


def _halves(labels) -> np.ndarray:
    """Probe split: every other item of each label trains the probe (on
    exact features); the rest test it."""
    labels = np.asarray(labels)
    train = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        train[np.flatnonzero(labels == c)[::2]] = True
    if len(np.unique(labels[train])) < 2 or train.all():
        raise ValueError("data: a linear probe needs at least two labels and two items of some label")
    return train


def _glue_task(model: PrismModel, task: str, data, limit) -> Task:
    if data is None:
        raise ValueError(f"--data: required for {task} (the task's dev TSV)")
    pairs = read_glue(data, task[5:], limit=limit)
    max_len = min(model.net.n_positions, 512)
    items = [_text_inputs(model, a, None if pairs.second is None else pairs.second[i], max_len)
             for i, a in enumerate(pairs.first)]
    if model.net.head == "classification":
        return ClassifierTask(task, items, pairs.labels, note=f"{data}; the model's classifier on the dev labels")
    return EmbeddingTask(task, items, pairs.labels, _halves(pairs.labels),
                         note=f"{data}; bare encoder: linear probe trained on exact-model mean-pooled features of "
                              f"half the items, applied to PRISM features of the other half")


def _pydoc_task(model: PrismModel, limit) -> EmbeddingTask:
    """Windows of 254 tokens (+ [CLS], [SEP]) of the longest pydoc topics,
    8 per topic; the probe learns the topic from windows 0, 2, 4, 6."""
    from pydoc_data.topics import topics

    if model.net.head == "lm" or "input_ids" not in model.net.input_names:
        raise ValueError("task pydoc-topics: needs a text encoder (BERT-style)")
    per_topic = 8
    tok = model.tokenizer
    wrap = tok.encode("")
    width = min(256, model.net.n_positions) - len(wrap)
    encoded = {k: tok.encode(topics[k], add_special_tokens=False) for k in sorted(topics)}
    ranked = sorted((k for k in encoded if len(encoded[k]) >= per_topic * width), key=lambda k: -len(encoded[k]))
    want = max(1, (limit or 48) // per_topic)
    items, labels = [], []
    for label, k in enumerate(ranked[:want]):
        for w in range(per_topic):
            ids = wrap[:1] + encoded[k][w * width:(w + 1) * width] + wrap[1:]
            item = {"input_ids": torch.tensor([ids])}
            if "token_type_ids" in model.net.input_names:
                item["token_type_ids"] = torch.zeros(1, len(ids), dtype=torch.long)
            items.append(item)
            labels.append(label)
    return EmbeddingTask("pydoc-topics", items, labels, _halves(labels),
                         note=f"{len(items)} windows of {width + len(wrap)} tokens from pydoc_data.topics "
                              f"({', '.join(ranked[:want])}); linear probe: which topic, trained on exact features of "
                              f"half the windows, applied to PRISM features of the other half")


def _embed_task(model: PrismModel, data, limit) -> EmbeddingTask:
    """The lines of a text corpus (each once, at most ``limit``), one item each."""
    if data is None:
        raise ValueError("--data: required for embed (text files, a folder of them or a glob; one text per line)")
    if model.net.head == "lm" or "input_ids" not in model.net.input_names:
        raise ValueError("task embed: needs a text encoder (BERT-style)")
    texts = []
    for text in read_lines(text_files([str(data)])):
        if text not in texts:
            texts.append(text)
            if limit is not None and len(texts) == limit:
                break
    if len(texts) < 2:
        raise ValueError(f"data: {data} holds {len(texts)} distinct line(s); retrieval needs 2 or more")
    max_len = min(model.net.n_positions, 256)
    items = [_text_inputs(model, t, None, max_len) for t in texts]
    return EmbeddingTask("embed", items, note=f"{len(texts)} lines of {data} (at most {max_len} tokens each); "
                                              f"retrieval: each text a query against the others")


def _held_out_text(model: PrismModel, data) -> tuple[str, str]:
    if data is not None:
        return Path(data).read_text(encoding="utf-8"), str(data)
    if model.directory is None or model.directory.name != "gpt2-tiny":
        raise ValueError("--data: required (a text file) for a model other than the bundled gpt2-tiny")
    from .zoo import text_split

    return text_split()[1].decode("utf-8"), "gpt2-tiny's held-out pydoc topics"


def _lm_task(model: PrismModel, data, limit) -> LanguageModelTask:
    if model.net.head != "lm":
        raise ValueError(f"task lm: needs a language model; {model.model_type} has head {model.net.head}")
    text, what = _held_out_text(model, data)
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    width = min(model.net.n_positions, 256)
    items = [{"input_ids": torch.tensor([ids[i:i + width]])} for i in range(0, len(ids) - width + 1, width)]
    return LanguageModelTask("lm", items[:limit], note=f"{what}: non-overlapping windows of {width} tokens")


def build_cloze(text: str, count: int, max_query: int, seed: int = 0) -> list[ClozeItem]:
    """A CBT-format cloze set from ``text``: a line of at most ``max_query``
    characters with a word of 4+ letters blanked out, the 20 preceding lines
    as context (the word occurs there, as CBT's answers do), and 9 other
    words of the context as the other candidates."""
    import re

    rng = np.random.default_rng(seed)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    word = re.compile(r"\b[A-Za-z]{4,}\b")
    items = []
    for i in sorted(rng.permutation(np.arange(20, len(lines)))[:20 * count].tolist()):
        query, context = lines[i], lines[i - 20:i]
        if len(query) > max_query:
            continue
        pool = sorted(set(word.findall(" ".join(context))))
        targets = [w for w in word.findall(query) if w in pool]
        if not targets or len(pool) < 10:
            continue
        answer = targets[int(rng.integers(len(targets)))]
        others = [w for w in pool if w != answer]
        candidates = sorted([answer] + list(rng.choice(others, 9, replace=False)))
        items.append(ClozeItem(context, re.sub(rf"\b{answer}\b", "XXXXX", query, count=1), answer, candidates))
        if len(items) == count:
            break
    return items


def _cbt_task(model: PrismModel, data, limit, out_dir: Path | None) -> ClozeTask:
    if model.net.head != "lm":
        raise ValueError(f"task cbt: needs a language model; {model.model_type} has head {model.net.head}")
    n_pos = model.net.n_positions
    if data is not None and Path(data).is_file() and Path(data).name.startswith("cbtest"):
        source, what = Path(data), str(data)
    else:
        text, what = _held_out_text(model, data)
        built = build_cloze(text, limit or 100, max_query=n_pos // 2)
        source = (out_dir or Path(".")) / "cloze_cbt_format.txt"
        source.parent.mkdir(parents=True, exist_ok=True)
        write_cbt(source, built)
        what = f"{len(built)} CBT-format cloze items built from {what} (written to {source})"
    examples = read_cbt(source, limit=limit)
    tok = model.tokenizer
    items, starts, groups, answers = [], [], [], []
    for ex in examples:
        head, _, tail = ex.query.partition("XXXXX")
        group = []
        for cand in ex.candidates:
            ctx_lines = list(ex.context)
            while True:
                prefix = tok.encode("\n".join(ctx_lines + [head]), add_special_tokens=False)
                rest = tok.encode(cand + tail, add_special_tokens=False)
                if len(prefix) + len(rest) <= n_pos or not ctx_lines:
                    break
                ctx_lines.pop(0)  # drop the oldest context line until it fits
            ids = (prefix + rest)[:n_pos]
            group.append(len(items))
            items.append({"input_ids": torch.tensor([ids])})
            starts.append(max(1, len(prefix)))
        groups.append(group)
        answers.append(ex.candidates.index(ex.answer))
    return ClozeTask("cbt", items, starts, groups, answers,
                     note=f"{what}; each candidate scored by the LM log-likelihood of the query from the "
                          f"candidate on (as the GPT-2 paper scores CBT)")


def build_task(model: PrismModel, task: str, data=None, label_map=None, limit: int | None = None,
               out_dir: Path | None = None) -> Task:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected an int >= 1, got {limit!r}")
    if task == "images":
        return _pixels_task(model, data, label_map, limit)
    if task.startswith("glue-"):
        return _glue_task(model, task, data, limit)
    if task == "pydoc-topics":
        return _pydoc_task(model, limit)
    if task == "embed":
        return _embed_task(model, data, limit)
    if task == "lm":
        return _lm_task(model, data, limit)
    return _cbt_task(model, data, limit, out_dir)


# ---------------------------------------------------------------- runs

def _batches(task: Task, batch: int) -> list[list[int]]:
    """Item indices grouped by length (no padding), at most ``batch`` each."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(task.lengths()):
        by_len.setdefault(n, []).append(i)
    return [idx[j:j + batch] for n in sorted(by_len) for idx in [by_len[n]] for j in range(0, len(idx), batch)]


def _run(model: PrismModel, task: Task, batches, bar, **run) -> tuple[list, dict]:
    """Every item through the engine with ``run`` settings: per-item results
    and the cost per sequence (bytes sent by all devices, the busiest
    device's FLOPs), summed over layers."""
    results: list = [None] * len(task.items)
    cost = {"bytes": 0, "activation_bytes": 0, "busiest_flops": 0, "seconds": 0.0}
    for idx in batches:
        inputs = {k: torch.cat([task.items[i][k] for i in idx]) for k in task.items[idx[0]]}
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccuracyWarning)  # the grid visits coarse points on purpose
            out = model(inputs, outputs=task.outputs, **run)
        cost["seconds"] += time.perf_counter() - t
        for b, i in enumerate(idx):
            results[i] = task.extract(out, inputs, b, i)
        cost["bytes"] += out.stats.bytes_sent
        cost["activation_bytes"] += out.stats.activation_bytes
        cost["busiest_flops"] += max(d.flops for d in out.stats.devices)
        bar.update(1)
    n = len(task.items)
    return results, {k: (v / n if k != "seconds" else round(v, 3)) for k, v in cost.items()}


def _not_applicable(lengths: list[int], devices: int, cr: int) -> str | None:
    """Why a grid point makes no sense for these items, or None."""
    shortest = min(lengths)
    if devices > shortest:
        return f"{devices} devices need {devices} positions; the shortest item has {shortest}"
    largest = max(max(partition(n, devices).sizes()) for n in set(lengths))
    if cr > largest:
        return (f"CR {cr} exceeds every partition (the largest holds {largest} positions): "
                f"the same rows as CR {largest}")
    return None


def evaluate(model: PrismModel, task: Task, devices, crs, variants, *, mode: str = "prism", batch: int = 16,
             quiet: bool = False) -> dict:
    """The grid ``variants`` x ``devices`` x ``crs``, plus the exact model
    (one device) as the reference; returns the JSON-ready result."""
    batches = _batches(task, batch)
    layers = len(model.net.blocks)
    lengths = task.lengths()
    crs = [1] if mode == "voltage" else list(crs)
    grid = list(itertools.product(variants, devices, crs))
    applicable = [(v, p, c, _not_applicable(lengths, p, c)) for v, p, c in grid]
    todo = sum(1 for *_, why in applicable if why is None) + 1
    points = []
    with progress(total=todo * len(batches), quiet=quiet, desc=f"prism eval {task.name}", leave=False) as bar:
        exact, exact_cost = _run(model, task, batches, bar, devices=1, mode="single")
        exact_metrics = task.score(exact, exact)
        exact_intervals = task.intervals(exact, exact)
        for variant, p, cr, why in applicable:
            point = {"devices": p, "cr": cr, "variant": variant.label(model.net), "knobs": variant.knobs(),
                     "mode": mode}
            if why is not None:
                points.append({**point, "status": "n/a", "reason": why})
                continue
            crs_of_layers = cr_for_schedule(variant.schedule, cr, layers)
            got, cost = _run(model, task, batches, bar, devices=p,
                             options=variant.options.replace(mode=mode, cr=crs_of_layers))
            points.append({**point, "status": "ok", "crs": _as_list(crs_of_layers, layers),
                           "metrics": task.score(exact, got), "intervals": task.intervals(exact, got), **cost})
    return {"model": str(model.directory) if model.directory else model.model_type,
            "model_type": model.model_type, "task": task.name, "data": task.note, "items": len(task.items),
            "positions": [min(lengths), max(lengths)], "metric": task.metric, "fidelity": task.fidelity,
            "lower_is_better": task.lower_is_better,
            "exact": {"metrics": exact_metrics, "intervals": exact_intervals, **exact_cost},
            "points": points, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _as_list(cr, layers: int) -> list[int]:
    return list(cr) if isinstance(cr, (list, tuple)) else [cr] * layers


# -------------------------------------------------------------- reports

def _model_name(result: dict) -> str:
    """The checkpoint folder's name (its parent's when the folder is just ``model``)."""
    path = Path(result["model"])
    return path.parent.name if path.name == "model" else path.name


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.2f}" if isinstance(v, float) else str(v)


def _cell(value, interval: dict | None) -> str:
    """A metric with its 95% interval, e.g. ``0.8333 [0.64, 0.94]``."""
    if not interval:
        return _fmt(value)
    lo, hi = interval["ci"]
    digits = 2 if abs(hi) >= 10 else 3
    return f"{_fmt(value)} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(result: dict) -> str:
    """One table per variant: a row per (devices, CR), every metric with its
    95% interval, the cost."""
    metrics = list(result["exact"]["metrics"])
    head = ["P", "CR", *metrics, "KB sent / seq", "busiest MFLOP / seq"]
    ex = result["exact"]
    lines = [f"**{result['task']}** on `{_model_name(result)}` ({result['model_type']}), "
             f"{result['items']} items of {result['positions'][0]}-{result['positions'][1]} positions. "
             f"{result['data']}.", "",
             "Exact model (one device): " + ", ".join(f"{k} {_cell(v, ex.get('intervals', {}).get(k))}"
                                                      for k, v in ex["metrics"].items())
             + f", {ex['busiest_flops'] / 1e6:.1f} MFLOP / seq.",
             "", "Brackets: 95% intervals (Wilson for proportions, bootstrap for means and perplexity); "
                 "examples behind each: " + ", ".join(f"{k} {v['n']}" for k, v in ex.get("intervals", {}).items())
             + ".", ""]
    by_variant: dict[str, list] = {}
    for p in result["points"]:
        by_variant.setdefault(p["variant"], []).append(p)
    for variant, pts in by_variant.items():
        lines += [f"*{variant}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in pts:
            if p["status"] != "ok":
                lines.append(f"| {p['devices']} | {p['cr']} | n/a: {p['reason']} |" + " |" * (len(head) - 3))
                continue
            lines.append("| " + " | ".join([str(p["devices"]), str(p["cr"]),
                                            *(_cell(p["metrics"][m], p.get("intervals", {}).get(m)) for m in metrics),
                                            f"{p['bytes'] / 1e3:.1f}", f"{p['busiest_flops'] / 1e6:.1f}"]) + " |")
        lines.append("")
    return "\n".join(lines)


def plotted(result: dict, metric: str, x: str = "cr") -> dict[tuple[str, int], list[tuple]]:
    """What the plot draws of ``metric``: per (variant, devices) line, the
    points (x, value, interval low, interval high), x the CR or (``x="kb"``)
    the KB sent per sequence."""
    lines: dict[tuple[str, int], list[tuple]] = {}
    for p in result["points"]:
        if p["status"] != "ok":
            continue
        lo, hi = p["intervals"][metric]["ci"]
        lines.setdefault((p["variant"], p["devices"]), []).append(
            (p["cr"] if x == "cr" else p["bytes"] / 1e3, p["metrics"][metric], lo, hi))
    return lines


def _examples(result: dict, metric: str) -> int:
    return min(p["intervals"][metric]["n"] for p in result["points"] if p["status"] == "ok")


def plot(result: dict, path: Path) -> None:
    """Left: the task metric against CR, a line per (variant, devices), the
    exact model dashed. Right: fidelity against bytes sent per sequence.
    Every point with its 95% interval (a band), the axis with the number of
    examples it rests on."""
    import matplotlib.ticker

    fig = new_figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    panels = ((left, result["metric"], "cr"), (right, result["fidelity"], "kb"))
    keys = list(plotted(result, result["metric"]))
    variants = list(dict.fromkeys(v for v, _ in keys))
    counts = sorted({p for _, p in keys})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "x"]
    for ax, metric, x in panels:
        for (variant, devices), pts in plotted(result, metric, x).items():
            label = f"P={devices}" + ("" if variant == "plain PRISM" else f", {variant}")
            i = variants.index(variant)
            colour = f"C{counts.index(devices)}"  # colour: devices; line and marker: knobs (identical lines stay visible)
            xs, ys, lo, hi = (list(c) for c in zip(*pts))
            ax.plot(xs, ys, color=colour, ls=styles[i % len(styles)], marker=markers[i % len(markers)], alpha=0.85,
                    label=label)
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.12, lw=0)
        ax.grid(alpha=0.3)
    exact = result["exact"]
    left.axhline(exact["metrics"][result["metric"]], color="k", ls="--", label="exact model")
    if result["metric"] in ("accuracy", "probe_accuracy", "perplexity"):  # on labels: the exact model's own noise
        left.axhspan(*exact["intervals"][result["metric"]]["ci"], color="k", alpha=0.06, lw=0)
    left.set_xscale("log", base=2)
    left.set_xlabel("compression rate CR")
    left.set_ylabel(f"{result['metric']} (95% CI band; n = {_examples(result, result['metric'])})")
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on short ranges
    right.set_xlabel("KB sent per sequence (all devices, all layers)")
    right.set_ylabel(f"{result['fidelity']} to the exact model (95% CI; n = {_examples(result, result['fidelity'])})")
    left.legend(fontsize=7)
    fig.suptitle(f"{result['task']}: {_model_name(result)}, {result['items']} items", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(result: dict, out_dir: Path, stem: str = "eval") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result) + "\n")
    plot(result, paths[2])
    return paths
