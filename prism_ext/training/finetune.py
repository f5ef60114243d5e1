"""``prism finetune``: PRISM-aware distillation (docs/finetune.md).

The exact model is the teacher (frozen). The student starts from the same
weights and runs the differentiable twin (:mod:`prism_ext.method.twin`) at a
(devices, CR, exact rows) drawn per batch, or exactly (one device) for a
share of the batches so that the exact mode keeps its quality. The loss
matches the teacher's outputs:

  embed     1 - cosine of the mean-pooled embeddings, plus the MSE of every
            valid row's hidden state (relative to the teacher's variance)
  classify  KL(teacher || student) of the class distributions, plus the
            cross-entropy to the labels when the data has them
  lm        KL(teacher || student) of every position's next-token distribution

With ``distill_layers="all"`` every block's output rows are matched too
(:func:`layer_losses`: per layer the MSE over valid rows divided by the
teacher's variance of that layer, summed over layers), beside the task loss.

Text data may be a corpus larger than memory (:class:`~prism_ext.inputs.corpus.TextCorpus`):
its batches stream from disk through a bounded shuffle buffer, its held-out
texts are those a hash of the text puts there. The twin and the teacher run
on ``device`` (a GPU when there is one); the checkpoint is written from the
CPU either way.

Before and after, the held-out part is run through the engine (not the
twin) at every point of the grid, at CR = 1 and with each of the report's
exact-rows settings; the output directory is a Hugging Face checkpoint
(:func:`prism_ext.models.write_checkpoint`) with ``prism_finetune.json``
(the recipe, the data, the split and those metrics).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..method import twin
from ..api import PrismModel
from ..inputs.corpus import TextCorpus, shuffled
from ..util import metrics
from ..method.engine import RunConfig
from ..models import write_checkpoint
from ..models.common import Network
from ..method.partition import AccuracyWarning, partition
from ..options import DEFAULT
from ..util.progress import progress

__all__ = ["TASKS", "TASK_DEFAULTS", "DISTILL_LAYERS", "PRECISIONS", "Recipe", "Examples", "check_task", "default_task",
           "read_data", "corpus_examples", "text_windows", "split", "warmup_cosine", "layer_losses", "resolve_device", "finetune",
           "evaluate", "format_report"]

TASKS = ("embed", "classify", "lm")
DISTILL_LAYERS = ("all", "last")
# The student's forward and loss under torch.autocast: bf16 halves a step where the matrix units take bfloat16
# (AMX / AVX512-BF16 CPUs, GPUs); the weights, the optimizer and the teacher's targets stay float32.
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# What a field left at None becomes, per task: the best recipe measured so far (bench/FINETUNE.md). embed is
# all-MiniLM-L6-v2's at scale: 2000 steps of 32 with every layer distilled (P = 4, CR = 8: 0.9465 plain, 0.9566
# with special+adaptive rows; 1000 steps of 8: 0.945 / 0.952; the earlier defaults: 0.895); 48 minutes on 2
# CPU cores, minutes on a GPU. The bare command with these defaults reaches 0.9508 / 0.9579 on the same split;
# every layer against the last: better on one device and at P = 2, equal at P = 4. lm is SmolLM2-135M-Instruct's
# (bench/FINETUNE.md, issue 21): 400 steps of 8 x 256 tokens at lr 1e-4 took P = 4, CR = 8 from 1.43x to 1.12x
# the exact perplexity (P = 2: 1.14x -> 1.01x).
# classify keeps the earlier defaults: its measured recipe (the bundled vit-tiny-digits, trained from scratch)
# says nothing about fine-tuning a pretrained checkpoint.
# Their exact rows are the family's own run default (the Llama family's position 0, an attention sink; none
# for GPT-2, BERT and ViT): the student trains and is reported as the model will be run.
_COMMON = {"steps": 300, "batch_size": 8, "lr": 5e-5, "exact_fraction": 0.25, "exact_rows": (DEFAULT,),
           "report_exact_rows": (DEFAULT,), "distill_layers": "last"}
TASK_DEFAULTS = {
    "embed": {**_COMMON, "steps": 2000, "batch_size": 32, "lr": 1e-4, "exact_fraction": 0.5,
              "exact_rows": ("none", "special+adaptive"), "report_exact_rows": ("none", "special+adaptive"),
              "distill_layers": "all"},
    "classify": _COMMON,
    "lm": {**_COMMON, "steps": 400, "lr": 1e-4},
}
_STATE = "resume"  # the sub-folder of --out holding the resumable state
_TEACHER_CACHE_BYTES = 1 << 30  # the teacher's outputs are kept per batch while they fit in this


@dataclass
class Recipe:
    """What ``prism finetune`` does; recorded in prism_finetune.json."""

    task: str
    devices: tuple[int, ...] = (2, 3, 4)
    crs: tuple[int, ...] = (4, 8, 16)
    # None: the task's default (TASK_DEFAULTS)
    exact_rows: tuple[str, ...] | None = None  # drawn per batch, like devices and CR
    exact_fraction: float | None = None  # share of batches run exactly (one device)
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: float = 0.05  # share of the steps with a linear warm-up; then cosine to 10%
    weight_decay: float = 0.01
    hidden_weight: float = 1.0  # embed: weight of the hidden-state MSE beside the cosine
    label_weight: float = 1.0  # classify: weight of the cross-entropy to labels, when there are labels
    dropout: float = 0.0
    max_length: int = 256
    held_out: float = 0.1  # share of the examples held out (at least 1)
    seed: int = 0
    report_exact_rows: tuple[str, ...] | None = None
    eval_batch_size: int = 16
    distill_layers: str | None = None  # "all": every block's hidden state beside the task loss; "last": the task's
    shuffle_buffer: int = 4096  # a text corpus: lines held for shuffling while it streams
    held_out_max: int = 1000  # a text corpus: at most this many held-out texts reported (the smallest hashes)
    precision: str = "fp32"  # the student's forward and loss: fp32, or bf16 under torch.autocast (PRECISIONS)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.distill_layers not in DISTILL_LAYERS:
            raise ValueError(f"distill-layers: expected one of {', '.join(DISTILL_LAYERS)}, "
                             f"got {self.distill_layers!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("devices", "crs"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}: expected ints >= 1, got {values!r}")
        for name in ("steps", "batch_size", "max_length", "eval_batch_size", "shuffle_buffer", "held_out_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')}: expected an int >= 1, got {v!r}")
        for name, low, high in (("exact_fraction", 0, 1), ("warmup", 0, 1), ("held_out", 0, 0.9), ("dropout", 0, 0.9)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(f"{name.replace('_', '-')}: expected a number in [{low}, {high}], got {v!r}")
        for name in ("lr", "weight_decay", "hidden_weight", "label_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name.replace('_', '-')}: expected a finite number >= 0, got {v!r}")
        if not self.exact_rows or not self.report_exact_rows:
            raise ValueError("exact-rows: expected at least one setting (e.g. none)")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Examples:
    """Training data: ``items`` are texts, images (paths or arrays), pixel
    tensors [C, H, W] or token windows (1-D LongTensors); ``labels`` the
    class of each, when known."""

    kind: str  # text, image, pixels, tokens
    items: list
    labels: np.ndarray | None = None
    source: dict = field(default_factory=dict)
    augment: Callable | None = None  # (inputs, generator) -> inputs, on training batches only

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx) -> "Examples":
        idx = [int(i) for i in idx]
        return Examples(self.kind, [self.items[i] for i in idx], None if self.labels is None else self.labels[idx],
                        self.source, self.augment)


def text_windows(ids: list[int], width: int, stride: int | None = None) -> list[torch.Tensor]:
    """A token stream cut into windows of ``width`` starting every ``stride``
    tokens (default ``width``: no overlap); a last, shorter one is dropped."""
    return [torch.tensor(ids[i:i + width]) for i in range(0, len(ids) - width + 1, stride or width)]


def read_data(model: PrismModel, task: str, specs, *, glue_task: str | None = None, held_out: float = 0.0,
              seed: int = 0, held_out_max: int | None = None, exclude=()) -> "Examples | TextCorpus":
    """``specs`` (a path, or a list of them): text files, folders of ``.txt``
    files or glob patterns (a :class:`TextCorpus`, one example per line, read
    lazily; ``held_out``, ``seed``, ``held_out_max`` its hash split,
    ``exclude`` texts that never train); a folder of images (class
    sub-folders give labels) or a CIFAR python-batches folder (its train
    split); with ``glue_task`` a GLUE TSV of single sentences."""
    from ..inputs import datasets
    from ..inputs.images import image_files

    specs = [str(specs)] if isinstance(specs, (str, Path)) else [str(s) for s in specs]
    if not specs:
        raise ValueError("data: expected at least one path")
    path = Path(specs[0])
    if glue_task is not None:
        if len(specs) > 1:
            raise ValueError(f"data: a GLUE TSV is one file, got {len(specs)} paths")
        if not path.is_file():
            raise FileNotFoundError(f"data: {path} does not exist")
        pairs = datasets.read_glue(path, glue_task)
        if pairs.second is not None:
            raise ValueError(f"data: GLUE {glue_task} holds sentence pairs; the tokenizer takes single texts")
        return Examples("text", list(pairs.first), np.asarray(pairs.labels), {"path": str(path), "glue": glue_task})
    if len(specs) > 1 or not path.is_dir() or any(path.rglob("*.txt")):
        if task != "lm" and "input_ids" not in model.net.input_names:
            raise ValueError(f"data: {specs[0]} is text; {model.model_type} takes images (give a folder of images)")
        return TextCorpus.from_specs(specs, held_out=held_out, seed=seed, held_out_max=held_out_max,
                                     exclude=frozenset(exclude))
    if (path / "data_batch_1").is_file() or (path / "train").is_file():
        cifar = datasets.read_cifar(path, "train")
        return Examples("image", list(cifar.images), _model_labels(model, cifar.label_names, cifar.labels, path),
                        {"path": str(path), "format": "cifar"})
    if any(p.is_dir() for p in path.iterdir()):
        folder = datasets.read_image_folder(path)
        return Examples("image", list(folder.images), _model_labels(model, folder.label_names, folder.labels, path),
                        {"path": str(path)})
    files = image_files(path)
    if not files:
        raise ValueError(f"data: {path} holds no images and no .txt files")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
    return Examples("image", files, None, {"path": str(path), "names_sha256": digest.hexdigest()})


def corpus_examples(model: PrismModel, task: str, texts: list[str], max_length: int,
                    source: dict | None = None) -> "Examples":
    """Texts held in memory (a corpus's held-out part) as examples: ``lm``
    joins them and cuts windows of ``max_length`` tokens, the other tasks
    take one text each."""
    if task != "lm":
        return Examples("text", list(texts), source=source or {})
    ids = model.tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"] if texts else []
    return Examples("tokens", text_windows(list(ids), min(max_length, model.net.n_positions)), source=source or {})


def _model_labels(model: PrismModel, names: list[str], labels, path: Path) -> np.ndarray:
    """The data's class names as the model's class ids (config.json's
    label2id): a folder's position in sorted order would silently be another
    class."""
    label2id = model.config.get("label2id") or {}
    missing = sorted({names[i] for i in set(np.asarray(labels).tolist())} - set(label2id))
    if missing:
        raise ValueError(f"data: classes {missing[:5]} of {path} are not among the model's labels "
                         f"(config.json label2id: {sorted(label2id)[:10]})")
    return np.asarray([int(label2id[names[i]]) for i in np.asarray(labels).tolist()])


def _inputs(model: PrismModel, ex: Examples, max_length: int) -> dict:
    """The model inputs of a batch of examples (texts padded to the longest)."""
    if ex.kind == "text":
        return dict(model.tokenizer(ex.items, padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt"))
    if ex.kind == "image":
        return dict(model.image_processor(ex.items))
    if ex.kind == "pixels":
        return {"pixel_values": torch.stack(ex.items)}
    return {"input_ids": torch.stack(ex.items)}


def _batches(model: PrismModel, ex: Examples, size: int, max_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """Indices in batches of similar length (less padding: texts sorted by
    token count) and each batch's chance to be drawn: its share of the
    tokens, so that every token is seen equally often and long texts, where
    PRISM compresses most, are not drawn as rarely as short ones."""
    order = list(range(len(ex)))
    lengths = [1] * len(ex)
    if ex.kind == "text":
        lengths = [len(model.tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in ex.items]
        order.sort(key=lambda i: lengths[i])
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    weights = torch.tensor([float(sum(lengths[i] for i in b)) for b in batches])
    return batches, weights / weights.sum()


def _tensors(fields: dict):
    """Every tensor of a twin's output (``hidden_states`` is a tuple of them)."""
    for v in fields.values():
        yield from (v if isinstance(v, tuple) else (v,))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.device, hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _task_output(task: str, fields: dict, inputs: dict) -> torch.Tensor:
    """What the task compares: pooled embeddings, class logits or next-token logits."""
    if task == "embed":
        return _mean_pool(fields["last_hidden_state"], inputs.get("attention_mask"))
    return fields["logits"]


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, N] the valid rows of ``t`` [B, N, ...], on its device."""
    return torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if mask is None else mask.bool().to(t.device)


def _relative_mse(hs: torch.Tensor, ht: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The MSE of the valid rows over the teacher's variance there: an error
    relative to the layer's own scale, so that layers weigh alike."""
    return ((hs - ht) ** 2).mean(-1)[rows].mean() / ht[rows].var().clamp(min=1e-12)


def layer_losses(student: tuple, teacher: tuple, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers] the relative MSE (:func:`_relative_mse`) of every block's
    output rows (the twin's ``hidden_states``) over the valid rows."""
    rows = _rows(teacher[0], mask)
    return torch.stack([_relative_mse(hs, ht, rows) for hs, ht in zip(student, teacher)])


def _loss(recipe: Recipe, student: dict, teacher: dict, inputs: dict, labels: torch.Tensor | None) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    every_layer = recipe.distill_layers == "all" and recipe.hidden_weight
    if recipe.task == "embed":
        s, t = _task_output("embed", student, inputs), _task_output("embed", teacher, inputs)
        loss = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        if recipe.hidden_weight and not every_layer:  # every_layer holds the last block's output already
            ht = teacher["last_hidden_state"]
            loss = loss + recipe.hidden_weight * _relative_mse(student["last_hidden_state"], ht, _rows(ht, mask))
    else:
        s, t = student["logits"], teacher["logits"]
        if recipe.task == "lm":  # every valid position's next-token distribution
            rows = _rows(t, mask)
            s, t = s[rows], t[rows]
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        if recipe.task == "classify" and labels is not None and recipe.label_weight:
            loss = loss + recipe.label_weight * F.cross_entropy(s, labels.to(s.device))
    if every_layer:
        loss = loss + recipe.hidden_weight * layer_losses(student["hidden_states"], teacher["hidden_states"],
                                                          mask).sum()
    return loss


def resolve_device(name: str) -> torch.device:
    """``auto``: a CUDA device when torch finds one, else the CPU; ``cuda``
    only where there is one (refused by name otherwise)."""
    if name not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch finds no CUDA device on this machine (use --device cpu or auto)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _to_device(net: Network, device: torch.device) -> None:
    """Move every tensor of ``net`` to ``device`` in place: ``.data`` keeps
    each tensor object, so tied weights stay tied and references held
    elsewhere (the optimiser's parameters) follow."""
    for t in net.named_tensors().values():
        t.data = t.data.to(device)


def check_task(net: Network, task: str) -> None:
    if task == "lm" and net.head != "lm":
        raise ValueError(f"task: lm needs a language model (GPT-2), got a {net.model_type} with head {net.head!r}")
    if task == "classify" and net.head != "classification":
        raise ValueError(f"task: classify needs a checkpoint with a classifier head, got head {net.head!r}")
    if task == "embed" and net.model_type == "gpt2":
        raise ValueError("task: embed is for encoders (BERT, ViT); GPT-2 fine-tunes with --task lm")


def default_task(net: Network) -> str:
    return {"lm": "lm", "classification": "classify"}.get(net.head, "embed")


# ------------------------------------------------------------------ evaluation

def _run_engine(model: PrismModel, inputs: dict, devices: int, cr: int, exact_rows: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)  # the grid visits coarse points on purpose
        return dict(model(inputs, devices=devices, cr=cr, exact_rows=exact_rows))


def _points(recipe: Recipe) -> list[tuple[int, int, str]]:
    """(devices, CR, exact rows) of the report: one device first (the exact mode), then the grid."""
    grid = [(p, c, e) for e in recipe.report_exact_rows for p in recipe.devices for c in recipe.crs if p > 1]
    return [(1, 1, "none")] + grid


def _held_batches(model: PrismModel, held: Examples, recipe: Recipe) -> list[tuple[Examples, dict]]:
    """The held-out examples in batches of one length only, with their model
    inputs, built once for every report point: a padded batch would partition
    its padding too (a short text's devices holding only padding), which is
    not how a request of that text runs."""
    return [(sub, _inputs(model, sub, recipe.max_length)) for sub in
            (held.subset(idx) for idx in _eval_batches(model, held, recipe.eval_batch_size, recipe.max_length))]


def _eval_batches(model: PrismModel, held: Examples, size: int, max_length: int) -> list[list[int]]:
    """Indices of ``held`` in batches of at most ``size`` texts of one token count."""
    if held.kind != "text":
        return [list(range(i, min(i + size, len(held)))) for i in range(0, len(held), size)]
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(held.items):
        by_length.setdefault(len(model.tokenizer(t, truncation=True, max_length=max_length)["input_ids"]), []).append(i)
    return [group[j:j + size] for _, group in sorted(by_length.items()) for j in range(0, len(group), size)]


@torch.no_grad()
def evaluate(model: PrismModel, net: Network, batches: list[tuple[Examples, dict]], recipe: Recipe,
             teacher_out: list, quiet: bool = True, desc: str = "evaluate") -> list[dict]:
    """Fidelity of ``net`` run by the engine to the teacher's exact outputs
    ``teacher_out`` (one per held-out batch of :func:`_held_batches`) at
    every report point."""
    runner = model if net is model.net else PrismModel(net, model.directory)  # a student: the teacher's files
    rows = []
    points = _points(recipe)
    bar = progress(total=len(points) * len(batches), desc=desc, quiet=quiet, unit="batch", leave=False)
    for devices, cr, spec in points:
        cos, agree, kl, nll, count, correct, n_labels = [], 0, 0.0, 0.0, 0, 0, 0
        skipped, pairs = 0, []  # embed: (exact, got) embeddings of every example run, for retrieval
        for (sub, inputs), t_out in zip(batches, teacher_out):
            n = net.check_inputs(inputs)[1]
            if devices > n:
                skipped += len(sub)
                bar.update(1)
                continue
            fields = _run_engine(runner, inputs, devices, cr, spec)
            got = _task_output(recipe.task, fields, inputs)
            if recipe.task == "embed":
                cos += F.cosine_similarity(got, t_out, dim=-1).tolist()
                pairs.append((t_out, got))
            elif recipe.task == "classify":
                agree += int((got.argmax(-1) == t_out.argmax(-1)).sum())
                kl += float(F.kl_div(F.log_softmax(got, -1), F.log_softmax(t_out, -1), log_target=True,
                                     reduction="sum"))
                count += len(sub)
                if sub.labels is not None:
                    correct += int((got.argmax(-1) == torch.as_tensor(sub.labels)).sum())
                    n_labels += len(sub)
            else:  # lm: next-token NLL of the held-out windows
                ids = inputs["input_ids"]
                nll += float(F.cross_entropy(got[:, :-1].reshape(-1, got.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum"))
                count += ids[:, 1:].numel()
            bar.update(1)
        row = {"devices": devices, "cr": cr, "exact_rows": spec}
        if skipped:
            row["skipped_examples"] = skipped  # shorter than the number of devices
        if recipe.task == "embed":
            row.update(cosine_mean=float(np.mean(cos)), cosine_mean_ci=list(metrics.bootstrap_mean(cos)),
                       cosine_worst=float(np.min(cos)), examples=len(cos))
            if len(cos) >= 2:  # each held-out text a query against the others
                r = metrics.retrieval(torch.cat([e for e, _ in pairs]), torch.cat([g for _, g in pairs]))
                row.update(nn_agreement=r["nn_agreement"],
                           nn_agreement_ci=list(metrics.wilson(round(r["nn_agreement"] * r["n"]), r["n"])),
                           top5_agreement=r["top5_agreement"], recall_at_10=r["recall_at_10"])
        elif recipe.task == "classify":
            row.update(agreement=agree / max(count, 1), kl=kl / max(count, 1), examples=count)
            if count:
                row["agreement_ci"] = list(metrics.wilson(agree, count))
            if n_labels:
                row["accuracy"] = correct / n_labels
                row["accuracy_ci"] = list(metrics.wilson(correct, n_labels))
        else:
            row.update(perplexity=math.exp(nll / max(count, 1)), tokens=count)
        rows.append(row)
    bar.close()
    return rows


@torch.no_grad()
def _teacher_outputs(model: PrismModel, batches: list[tuple[Examples, dict]], recipe: Recipe) -> list:
    """The teacher's exact outputs per held-out batch."""
    return [_task_output(recipe.task, _run_engine(model, inputs, 1, 1, "none"), inputs)
            for _, inputs in batches]


# -------------------------------------------------------------------- training

def warmup_cosine(step: int, steps: int, warmup: int, lr: float) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps, then a cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _lr(step: int, recipe: Recipe) -> float:
    return warmup_cosine(step, recipe.steps, max(1, round(recipe.warmup * recipe.steps)), recipe.lr)


def _draw(recipe: Recipe, gen: torch.Generator) -> tuple[int, int, str]:
    """(devices, CR, exact rows) for one batch."""
    if float(torch.rand(1, generator=gen)) < recipe.exact_fraction:
        return 1, 1, "none"

    def pick(values):
        return values[int(torch.randint(len(values), (1,), generator=gen))]

    return pick(recipe.devices), pick(recipe.crs), pick(recipe.exact_rows)


def _save_state(path: Path, step: int, params: dict, opt: torch.optim.Optimizer, recipe: Recipe, losses) -> None:
    """Resumable state: the student's tensors and AdamW's moments (safetensors), the rest in JSON."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    names = list(params)
    for i, state in opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            tensors[f"opt.{key}.{names[i]}"] = state[key].detach().cpu().reshape(-1).contiguous() if key == "step" \
                else state[key].detach().cpu().contiguous()
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / "state.safetensors")
    (path / "state.json").write_text(json.dumps({"step": step, "recipe": recipe.to_json(), "losses": losses}) + "\n")


def _load_state(path: Path, params: dict, opt: torch.optim.Optimizer, recipe: Recipe) -> tuple[int, list]:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    if meta.get("recipe") != json.loads(json.dumps(recipe.to_json())):
        raise ValueError(f"resume: {path} was written by another recipe; use a new --out or drop --resume")
    tensors = load_file(str(path / "state.safetensors"))
    names = list(params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    state = opt.state_dict()
    for i, name in enumerate(names):
        if f"opt.step.{name}" in tensors:
            state["state"][i] = {"step": tensors[f"opt.step.{name}"].reshape(()),
                                 "exp_avg": tensors[f"opt.exp_avg.{name}"],
                                 "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"]}
    opt.load_state_dict(state)
    return int(meta["step"]), list(meta.get("losses", []))


def split(ex: Examples, recipe: Recipe) -> tuple[Examples, Examples]:
    """(train, held out): distinct examples (duplicates dropped), a fixed shuffle by ``recipe.seed``."""
    keep, seen = [], set()
    for i, item in enumerate(ex.items):
        key = item if isinstance(item, str) else None
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        keep.append(i)
    order = np.random.default_rng(recipe.seed).permutation(len(keep))
    n_held = max(1, int(round(recipe.held_out * len(keep)))) if recipe.held_out > 0 else 0
    if len(keep) - n_held < 1:
        raise ValueError(f"data: {len(keep)} distinct example(s) leave none to train on after holding out {n_held}")
    held = [keep[i] for i in sorted(order[:n_held])]
    train = [keep[i] for i in sorted(order[n_held:])]
    return ex.subset(train), ex.subset(held)


_BUCKET = 16  # a streamed corpus: this many batches' texts are sorted by length together (less padding)


def _stream_windows(model: PrismModel, lines, width: int):
    """Windows of ``width`` tokens of the lines joined with newlines, as they stream."""
    ids: list[int] = []
    for line in lines:
        ids += model.tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
        while len(ids) >= width:
            yield torch.tensor(ids[:width])
            ids = ids[width:]


def _streamed(model: PrismModel, corpus: TextCorpus, recipe: Recipe):
    """Training batches of a corpus, forever (epoch after epoch, each in
    another order): lines through a bounded shuffle buffer, then
    ``_BUCKET`` batches' worth sorted by token count and cut into batches
    (texts of similar length pad little), the batches in a random order.
    Deterministic for a recipe, so a resumed run skips what it had done."""
    epoch = 0
    while True:
        rng = random.Random(recipe.seed * 1_000_003 + epoch)
        items = corpus.train_lines()
        if recipe.task == "lm":
            items = _stream_windows(model, items, min(recipe.max_length, model.net.n_positions))
        chunk, any_batch = [], False
        for item in shuffled(items, recipe.shuffle_buffer, rng):
            chunk.append(item)
            if len(chunk) == recipe.batch_size * _BUCKET:
                yield from _bucketed(model, chunk, recipe, rng)
                chunk, any_batch = [], True
        if chunk:
            yield from _bucketed(model, chunk, recipe, rng)
            any_batch = True
        if not any_batch:
            raise ValueError("data: nothing left to train on after the held-out split"
                             + (f" (lm: fewer than {recipe.max_length} tokens)" if recipe.task == "lm" else ""))
        epoch += 1


def _bucketed(model: PrismModel, chunk: list, recipe: Recipe, rng: random.Random):
    order = list(range(len(chunk)))
    if recipe.task != "lm":
        ids = model.tokenizer(chunk, truncation=True, max_length=recipe.max_length)["input_ids"]
        order.sort(key=lambda i: len(ids[i]))
    batches = [order[i:i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
    rng.shuffle(batches)
    for b in batches:
        yield Examples("tokens" if recipe.task == "lm" else "text", [chunk[i] for i in b])


def finetune(model: PrismModel, data: "Examples | TextCorpus", recipe: Recipe, out, *, resume: bool = False,
             quiet: bool = False, log=None, held: Examples | None = None, save_every: int = 50,
             command: str | None = None, device: str | torch.device = "cpu") -> dict:
    """Distil ``model`` into a PRISM-aware student on ``data`` (examples in
    memory, or a text corpus streamed from disk); write the checkpoint and
    prism_finetune.json to ``out``; return the report. ``held``: the
    held-out examples (default: split off ``data``). ``device``: where the
    twin and the teacher run (``auto``, ``cpu``, ``cuda`` or a torch device)."""
    net = model.net
    check_task(net, recipe.task)
    if net.weight_dtype != "fp32":  # before any data is read or step taken
        raise ValueError(f"model: fine-tuning trains fp32 weights; this model's are {net.weight_dtype} "
                         f"(fine-tune the fp32 checkpoint, then quantize the result)")
    if model.directory is None:
        raise ValueError("model: needs a checkpoint directory to copy its config and tokenizer from")
    out = Path(out)
    if out.resolve() == Path(model.directory).resolve():  # refused before any training, not after it
        raise ValueError(f"out: {out} is the teacher's own checkpoint; choose another directory")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    log = log or (lambda msg: None)
    recipe = replace(recipe,  # "default" recorded and reported by the name it stands for
                     exact_rows=tuple(net.resolve("exact_rows", e) for e in recipe.exact_rows),
                     report_exact_rows=tuple(net.resolve("exact_rows", e) for e in recipe.report_exact_rows))
    if isinstance(data, TextCorpus):
        n_train = sum(1 for _ in data.train_lines())  # one pass, nothing kept
        if held is None:
            held = corpus_examples(model, recipe.task, data.held_out_texts(), recipe.max_length)
            how = (f"by a hash of each text (SHA-256, seed {data.seed}): {data.held_out:.0%} held out, "
                   f"at most {data.held_out_max} reported")
        else:
            how = {"held_out": held.source}
        if n_train == 0:
            raise ValueError("data: no training texts left after the held-out split")
        source = {**data.source(), "kind": "tokens" if recipe.task == "lm" else "text", "train_examples": n_train,
                  "labels": False}
        labels_known = False
    else:
        if held is None:
            train, held = split(data, recipe)
            how = f"distinct examples, shuffled with seed {recipe.seed}, {recipe.held_out:.0%} held out"
        else:
            train, how = data, {"held_out": held.source}
        labels_known = train.labels is not None
        source = {**train.source, "kind": train.kind, "train_examples": len(train), "labels": labels_known}
    if len(held) == 0:
        raise ValueError("held-out: no held-out examples to report on")
    torch.manual_seed(recipe.seed)
    if isinstance(data, TextCorpus):
        stream = _streamed(model, data, recipe)
    else:
        batches, chances = _batches(model, train, recipe.batch_size, recipe.max_length)

    log(f"finetune: {source['train_examples']} train / {len(held)} held-out examples, {recipe.steps} steps of "
        f"{recipe.batch_size}, task {recipe.task}, on {dev}")
    t0 = time.perf_counter()
    held_batches = _held_batches(model, held, recipe)
    teacher_out = _teacher_outputs(model, held_batches, recipe)
    before = evaluate(model, net, held_batches, recipe, teacher_out, quiet, "before")
    eval_seconds = time.perf_counter() - t0

    student = copy.deepcopy(net)
    student.__dict__.pop("_digest", None)  # the teacher's, if it was computed
    _to_device(student, dev)
    teacher_net = net
    if dev.type != "cpu":  # the engine's teacher stays on the CPU for the report
        teacher_net = copy.deepcopy(net)
        _to_device(teacher_net, dev)
    every_layer = recipe.distill_layers == "all"
    params = student.named_tensors()
    for p in params.values():
        p.requires_grad_(True)
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr)
    state_dir = out / _STATE
    start, losses = 0, []
    if resume and (state_dir / "state.json").is_file():
        start, losses = _load_state(state_dir, params, opt, recipe)
        log(f"finetune: resumed at step {start} from {state_dir}")
        if isinstance(data, TextCorpus):  # the stream is deterministic: pass over what was trained
            for _ in range(start):
                next(stream)
    t1 = time.perf_counter()
    avg = None
    cache, cached = {}, 0
    for step in progress(range(start, recipe.steps), desc="finetune", quiet=quiet, unit="step",
                         initial=start, total=recipe.steps):
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)  # resumable without RNG state
        if isinstance(data, TextCorpus):
            which, sub = None, next(stream)
        else:
            which = int(torch.multinomial(chances, 1, generator=gen))
            sub = train.subset(batches[which])
        inputs = _inputs(model, sub, recipe.max_length)
        if not isinstance(data, TextCorpus) and train.augment is not None:  # the teacher sees the same batch
            inputs = train.augment(inputs, gen)
        n = net.check_inputs(inputs)[1]
        devices, cr, spec = _draw(recipe, gen)
        devices = min(devices, n)
        cfg = RunConfig.make(len(net.blocks), cr=cr, exact_rows=model.exact_rows(spec))
        part = partition(n, devices)
        teacher = cache.get(which)
        if teacher is None:
            with torch.no_grad():
                teacher = twin.forward(teacher_net, inputs, partition(n, 1), RunConfig.make(len(net.blocks)),
                                       hidden_states=every_layer)
            size = sum(t.numel() * t.element_size() for t in _tensors(teacher))
            if which is not None and train.augment is None and cached + size <= _TEACHER_CACHE_BYTES:
                cache[which] = teacher  # the same batch, the same outputs
                cached += size
        labels = torch.as_tensor(sub.labels, dtype=torch.long) if labels_known else None
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
            loss = _loss(recipe, twin.forward(student, inputs, part, cfg, dropout=recipe.dropout,
                                              hidden_states=every_layer), teacher, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        losses.append(round(loss.item(), 6))
        if (step + 1) % save_every == 0 and step + 1 < recipe.steps:
            _save_state(state_dir, step + 1, params, opt, recipe, losses)
        if step % 25 == 0 or step == recipe.steps - 1:
            log(f"  step {step:5d}  loss {avg:.4f}  ({time.perf_counter() - t1:.0f} s)")
    train_seconds = time.perf_counter() - t1
    for p in params.values():
        p.requires_grad_(False)
    _to_device(student, torch.device("cpu"))  # the engine runs and the checkpoint is written from the CPU
    t2 = time.perf_counter()
    after = evaluate(model, student, held_batches, recipe, teacher_out, quiet, "after")
    eval_seconds += time.perf_counter() - t2

    write_checkpoint(student, model.directory, out)
    report = {
        "model": str(model.directory), "model_type": net.model_type, "recipe": recipe.to_json(),
        "data": {**source, "held_out_examples": len(held), "split": how}, "device": dev.type,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "command": command,
        "losses": {"first": losses[0] if losses else None,
                   "last_25_mean": float(np.mean(losses[-25:])) if losses else None},
        "metrics": {"before": before, "after": after},
    }
    (out / "prism_finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    if (state_dir / "state.json").is_file():  # finished: the resumable state is no longer needed
        for f in state_dir.iterdir():
            f.unlink()
        state_dir.rmdir()
    return report


def _metric_columns(task: str) -> list[tuple[str, str]]:
    if task == "embed":
        return [("cosine_mean", "cosine mean"), ("cosine_worst", "cosine worst"), ("nn_agreement", "NN agreement"),
                ("recall_at_10", "recall@10")]
    if task == "classify":
        return [("agreement", "agreement"), ("accuracy", "accuracy")]
    return [("perplexity", "perplexity")]


def format_report(report: dict) -> str:
    """A markdown table: every report point, before and after (language
    models: perplexity also as a ratio to the teacher's, the first point)."""
    task = report["recipe"]["task"]
    cols = _metric_columns(task)
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    if task == "lm":
        base = before[0]["perplexity"]
        before = [{**b, "ratio": b["perplexity"] / base} for b in before]
        after = [{**a, "ratio": a["perplexity"] / base} for a in after]
        cols = cols + [("ratio", "perplexity / teacher's")]
    head = "| devices | CR | exact rows | " + " | ".join(f"{name} before | {name} after" for _, name in cols) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(cols))]
    for b, a in zip(before, after):
        cells = []
        for key, _ in cols:
            cells += [f"{b[key]:.4f}" if key in b else "-", f"{a[key]:.4f}" if key in a else "-"]
        lines.append(f"| {b['devices']} | {b['cr']} | {b['exact_rows']} | " + " | ".join(cells) + " |")
    if task == "lm":
        lines.append(f"\nperplexity ratios are to the teacher's exact {base:.4f}")
    return "\n".join(lines)
