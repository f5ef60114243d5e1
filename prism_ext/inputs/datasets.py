"""Readers for the standard local evaluation formats (``prism eval --data``).
Nothing is downloaded: each reader takes files the user already has.

* CIFAR-10/100 python batches (``cifar-10-batches-py``, ``cifar-100-python``)
* an ImageNet-style folder: one sub-folder of images per class, and a label
  map (``LOC_synset_mapping.txt`` lines ``wnid name``, line i = label i, or a
  JSON object ``{folder: label}``)
* GLUE dev TSVs: SST-2, MRPC, RTE, MNLI (matched or mismatched)
* CBT (``cbtest_*_test_2500ex.txt``): 20 context lines, a query with XXXXX,
  the answer and 10 candidates

Every reader returns plain Python/numpy data and raises ValueError naming
the file and line for a malformed one.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import image_files

__all__ = ["ImageSet", "TextPairs", "ClozeItem", "read_cifar", "read_image_folder", "read_glue", "read_cbt",
           "write_cbt", "GLUE_TASKS"]


@dataclass
class ImageSet:
    """Images (uint8 [H, W, C] arrays, or paths read on demand) and their labels."""

    images: list
    labels: np.ndarray
    label_names: list[str]


@dataclass
class TextPairs:
    """Sentences (or sentence pairs: ``second`` not None) with integer labels."""

    first: list[str]
    second: list[str] | None
    labels: np.ndarray
    label_names: list[str]


@dataclass
class ClozeItem:
    context: list[str]  # the context lines, in order
    query: str  # holds XXXXX where the missing word goes
    answer: str
    candidates: list[str]


# --------------------------------------------------------------------- CIFAR

def _reconstruct():
    core = getattr(np, "_core", None)  # numpy >= 2 (numpy.core is its deprecated alias)
    if core is None:
        from numpy.core import multiarray
    else:
        multiarray = core.multiarray
    return multiarray._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickled dicts of bytes, lists and numpy arrays:
    only numpy's array reconstruction is allowed, nothing else can be
    constructed (no other callable runs)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy", "ndarray"): lambda: np.ndarray, ("numpy", "dtype"): lambda: np.dtype,
                # bytes in a protocol-2 pickle written by Python 3 (str -> bytes, nothing else)
                ("_codecs", "encode"): lambda: codecs.encode}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]()
        raise ValueError(f"{module}.{name} is not allowed in a CIFAR batch")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            got = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"data: {path} is not a CIFAR python batch ({exc})") from None
    if not isinstance(got, dict):
        raise ValueError(f"data: {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in got.items()}


def _names(meta: dict, key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise ValueError(f"data: {path} has no list {key!r}")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def read_cifar(path, split: str = "test", limit: int | None = None) -> ImageSet:
    """A ``cifar-10-batches-py`` or ``cifar-100-python`` folder: ``split``
    ``test`` (the test batch) or ``train`` (every training batch); CIFAR-100
    uses the 100 fine labels."""
    root = Path(path)
    if (root / "batches.meta").is_file():
        meta, key, label_key = _load_batch(root / "batches.meta"), "label_names", "labels"
        files = [root / "test_batch"] if split == "test" else sorted(root.glob("data_batch_*"))
    elif (root / "meta").is_file():
        meta, key, label_key = _load_batch(root / "meta"), "fine_label_names", "fine_labels"
        files = [root / split]
    else:
        raise ValueError(f"data: {root} is neither cifar-10-batches-py (batches.meta) nor cifar-100-python (meta)")
    if split not in ("test", "train"):
        raise ValueError(f"split: expected test or train, got {split!r}")
    names = _names(meta, key, root / ("batches.meta" if key == "label_names" else "meta"))
    images, labels = [], []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"data: {f} is missing")
        batch = _load_batch(f)
        data, lab = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"data: {f}: 'data' must be a uint8 array [N, 3072]")
        if not isinstance(lab, list) or len(lab) != len(data) or not all(
                isinstance(v, int) and 0 <= v < len(names) for v in lab):
            raise ValueError(f"data: {f}: {label_key!r} must be {len(data)} labels in [0, {len(names)})")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(lab)
    stacked = np.concatenate(images)[:limit]
    return ImageSet(list(stacked), np.asarray(labels[:limit], dtype=np.int64), names)


# ------------------------------------------------------- ImageNet-style folder

def _label_map(path: Path) -> dict[str, tuple[int, str]]:
    """folder -> (label, name) from a synset mapping text or a JSON object."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            got = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"label map: {path} is not valid JSON ({exc})") from None
        if not isinstance(got, dict) or not all(isinstance(v, int) and v >= 0 for v in got.values()):
            raise ValueError(f"label map: {path} must map folder names to labels >= 0")
        return {k: (v, k) for k, v in got.items()}
    out = {}
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        out[wnid] = (len(out), name or wnid)
    if not out:
        raise ValueError(f"label map: {path} holds no lines")
    return out


def read_image_folder(path, label_map=None, limit: int | None = None) -> ImageSet:
    """``path/<class folder>/<image>``; labels from ``label_map`` (a file, see
    the module doc), else the sorted folder names numbered from 0. Images are
    returned as paths, read when used."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data: {root} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if label_map is not None:
        mapping = _label_map(Path(label_map))
    else:
        mapping = {p.name: (i, p.name) for i, p in enumerate(folders)}
    images, labels = [], []
    for folder in folders:
        if folder.name not in mapping:
            raise ValueError(f"data: folder {folder.name!r} is not in the label map {label_map}")
        for f in image_files(folder):  # every extension Pillow reads
            images.append(f)
            labels.append(mapping[folder.name][0])
    if not images:
        raise ValueError(f"data: {root} holds no images in class folders")
    names = [""] * (max(v for v, _ in mapping.values()) + 1)
    for label, name in mapping.values():
        names[label] = name
    order = np.random.default_rng(0).permutation(len(images))[:limit] if limit else np.arange(len(images))
    return ImageSet([images[i] for i in order], np.asarray(labels, dtype=np.int64)[order], names)


# ---------------------------------------------------------------------- GLUE

# task -> (sentence columns, label column, label names in the order of the usual label ids)
GLUE_TASKS = {
    "sst2": (("sentence",), "label", ["0", "1"]),
    "mrpc": (("#1 String", "#2 String"), "Quality", ["0", "1"]),
    "rte": (("sentence1", "sentence2"), "label", ["entailment", "not_entailment"]),
    "mnli": (("sentence1", "sentence2"), "gold_label", ["entailment", "neutral", "contradiction"]),
}


def read_glue(path, task: str, limit: int | None = None) -> TextPairs:
    """A GLUE dev TSV (``dev.tsv``; MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``)
    with its header line. Quotes are literal in these files (no CSV quoting)."""
    if task not in GLUE_TASKS:
        raise ValueError(f"task: expected one of {', '.join(GLUE_TASKS)}, got {task!r}")
    cols, label_col, names = GLUE_TASKS[task]
    path = Path(path)
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"data: {path} is empty")
    header = rows[0]
    missing = [c for c in (*cols, label_col) if c not in header]
    if missing:
        raise ValueError(f"data: {path} is not a GLUE {task} TSV (no column {missing[0]!r} in its header)")
    idx = [header.index(c) for c in cols]
    li = header.index(label_col)
    first, second, labels = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < len(header):
            raise ValueError(f"data: {path} line {line}: {len(row)} fields, the header has {len(header)}")
        label = row[li]
        if label not in names:
            raise ValueError(f"data: {path} line {line}: label {label!r} is not one of {', '.join(names)}")
        first.append(row[idx[0]])
        if len(idx) > 1:
            second.append(row[idx[1]])
        labels.append(names.index(label))
        if limit and len(labels) == limit:
            break
    return TextPairs(first, second if len(idx) > 1 else None, np.asarray(labels, dtype=np.int64), names)


# ----------------------------------------------------------------------- CBT

def read_cbt(path, limit: int | None = None) -> list[ClozeItem]:
    """Children's Book Test: per example 20 numbered context lines, then line
    21 ``query<TAB>answer<TAB><TAB>cand|cand|...``, then a blank line."""
    path = Path(path)
    items: list[ClozeItem] = []
    context: list[str] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        num, _, rest = line.partition(" ")
        if not num.isdigit():
            raise ValueError(f"data: {path} line {line_no}: expected a line number first")
        if int(num) != len(context) + 1:
            raise ValueError(f"data: {path} line {line_no}: line {num} out of order (expected {len(context) + 1})")
        if "\t" not in rest:
            context.append(rest)
            continue
        fields = rest.split("\t")
        if len(fields) != 4 or "XXXXX" not in fields[0]:
            raise ValueError(f"data: {path} line {line_no}: expected query<TAB>answer<TAB><TAB>candidates "
                             f"with XXXXX in the query")
        candidates = [c for c in fields[3].split("|") if c]
        if fields[1] not in candidates:
            raise ValueError(f"data: {path} line {line_no}: the answer {fields[1]!r} is not a candidate")
        items.append(ClozeItem(context, fields[0], fields[1], candidates))
        context = []
        if limit and len(items) == limit:
            break
    if context:
        raise ValueError(f"data: {path} ends inside an example (no query line after line {len(context)})")
    return items


def write_cbt(path, items: list[ClozeItem]) -> None:
    """The inverse of :func:`read_cbt` (for cloze sets built from other text)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            for i, line in enumerate(item.context, start=1):
                f.write(f"{i} {line}\n")
            f.write(f"{len(item.context) + 1} {item.query}\t{item.answer}\t\t{'|'.join(item.candidates)}\n\n")
