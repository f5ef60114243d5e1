"""A domain corpus from what a machine already has: the paragraphs of the
docstrings of its installed Python packages (``prism data docstrings``).

Distillation needs no labels, so any text of the domain trains a student
(bench/FINETUNE.md). The source files are parsed with :mod:`ast` and never
imported: importing every installed package would run its code (a window,
a network call, a ``SystemExit``). A paragraph is a run of non-blank lines
of a cleaned docstring (module, class or function), joined with single
spaces; doctests (``>>>``) and paragraphs that are mostly not words (tables,
signatures, reST directives) are left out, and so is any paragraph outside
[min_words, max_words]. Each paragraph is given once, in the order of the
sorted file paths.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["default_roots", "paragraphs", "normalise"]

_MAX_FILE_BYTES = 2 << 20  # generated modules (tables, vendored data) are not prose
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_WORD = re.compile(r"^[A-Za-z][a-z'-]*[.,;:!?)]*$|^\(?[a-z]+[.,;:)]*$")


def default_roots(stdlib: bool = False) -> list[Path]:
    """Every site-packages folder this Python imports from (sysconfig's
    purelib and platlib, and those on ``sys.path``: a virtual environment
    may chain another's), each once; with ``stdlib`` the standard library
    first."""
    paths = sysconfig.get_paths()
    candidates = ([paths["stdlib"]] if stdlib else []) + [paths["purelib"], paths["platlib"]]
    candidates += [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")]
    roots: list[Path] = []
    for c in candidates:
        p = Path(c).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def normalise(text: str) -> str:
    """One line, single spaces: how paragraphs are compared and written."""
    return " ".join(text.split())


def _prose(words: list[str]) -> bool:
    """Mostly plain words: at least 70% look like words of a sentence."""
    return sum(bool(_WORD.match(w)) for w in words) >= 0.7 * len(words)


def _python_files(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        for folder, dirs, files in os.walk(root):  # symbolic links to folders are not followed: no cycles
            # a site-packages inside a root (the standard library's) is a root of its own, or not wanted
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
            for name in sorted(files):
                if name.endswith(".py"):
                    yield Path(folder, name)


def _docstrings(path: Path) -> Iterator[str]:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences of old code
            tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return  # unreadable, or Python that this interpreter does not parse: not prose we can use
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def paragraphs(roots: Iterable[Path], *, min_words: int = 20, max_words: int = 300,
               exclude: Iterable[str] = ()) -> Iterator[str]:
    """The distinct docstring paragraphs under ``roots`` of ``min_words`` to
    ``max_words`` words, none of ``exclude`` (compared after
    :func:`normalise`)."""
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"max-words: expected min-words ({min_words}) <= max-words ({max_words}), both >= 1")
    excluded = {normalise(t) for t in exclude}
    seen: set[bytes] = set()  # digests: a large corpus is not held twice in memory
    for path in _python_files(roots):
        for doc in _docstrings(path):
            for block in re.split(r"\n\s*\n", doc):
                words = block.split()
                if not min_words <= len(words) <= max_words or block.lstrip().startswith(">>>"):
                    continue
                if ">>>" in block or not _prose(words):
                    continue
                text = " ".join(words)
                if not text.isprintable():  # a NUL or another control character: a line no text tool reads
                    continue
                digest = hashlib.sha256(text.encode()).digest()[:16]
                if text in excluded or digest in seen:
                    continue
                seen.add(digest)
                yield text
