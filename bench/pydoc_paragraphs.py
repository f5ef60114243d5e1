"""The text data of bench/FINETUNE.md's MiniLM run (``prism finetune --data``,
``--held-out-data``), from what every Python installation has.

* The paragraphs of ``pydoc_data.topics`` (the language reference): a
  paragraph is a run of non-blank lines joined with spaces; only those of at
  least ``--min-words`` words are kept (headings and code fragments are
  shorter), each once, in the order of the sorted topic names. A fixed
  shuffle (``--seed``) holds out ``--held-out`` of them: the held-out file.
* The training file: the other paragraphs, and with ``--docstrings`` the
  paragraphs of the standard library's docstrings (modules, classes,
  functions; ``pydoc_data`` itself excluded; at least
  ``--docstring-min-words`` words), minus any held-out paragraph.
  Distillation needs no labels, so any text of the domain teaches the
  student; with the topics alone (~400 paragraphs) it learns them by heart.

    python bench/pydoc_paragraphs.py --train /tmp/train.txt --held /tmp/held.txt --docstrings
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import sys
import warnings

# Modules whose import has side effects (a browser, a window, a printed poem)
# or that are not text: left out of the docstrings.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "__phello__",
         "_pyrepl", "ensurepip", "venv", "lib2to3", "test", "unittest.__main__"}


def _paragraphs(text: str, min_words: int) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        words = block.split()
        if len(words) >= min_words:
            out.append(" ".join(words))
    return out


def topic_paragraphs(min_words: int) -> list[str]:
    from pydoc_data.topics import topics

    seen, out = set(), []
    for name in sorted(topics):
        for text in _paragraphs(topics[name], min_words):
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out


def docstring_paragraphs(min_words: int) -> list[str]:
    """Paragraphs of the standard library's docstrings, in module-name order."""
    seen, out = set(), []

    def add(doc) -> None:
        if isinstance(doc, str):
            for text in _paragraphs(inspect.cleandoc(doc), min_words):
                if text not in seen:
                    seen.add(text)
                    out.append(text)

    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # not built here (e.g. a platform's own module)
            continue
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated members are still text
        add(module.__doc__)
        for _, member in inspect.getmembers(module):
            if getattr(member, "__module__", None) != name:
                continue  # re-exported from elsewhere: counted there
            add(getattr(member, "__doc__", None))
            if inspect.isclass(member):
                for _, attr in vars(member).items():
                    add(getattr(attr, "__doc__", None) if callable(attr) else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="the training text file to write")
    parser.add_argument("--held", required=True, help="the held-out text file to write")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of the topic paragraphs held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=40)
    parser.add_argument("--docstrings", action="store_true", help="add the standard library's docstrings")
    parser.add_argument("--docstring-min-words", type=int, default=20, help="docstrings are terser than the topics")
    args = parser.parse_args()
    topics = topic_paragraphs(args.min_words)
    order = list(range(len(topics)))
    random.Random(args.seed).shuffle(order)
    n_held = max(1, round(args.held_out * len(topics)))
    held = [topics[i] for i in sorted(order[:n_held])]
    train = [topics[i] for i in sorted(order[n_held:])]
    if args.docstrings:
        held_set = set(held)
        train += [p for p in docstring_paragraphs(args.docstring_min_words) if p not in held_set]
    for path, lines in ((args.train, train), (args.held, held)):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    print(f"{len(train)} training paragraphs -> {args.train}; {len(held)} held-out topic paragraphs -> {args.held}")


if __name__ == "__main__":
    main()
