"""Progress bars for long work (zoo training, benchmarks, evaluation, batched runs).

One helper so every command behaves alike: a tqdm bar on stderr, shown only
when stderr is a terminal and the command was not given ``--quiet``; stdout
(results, JSON Lines) is never touched.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress", "write"]


def progress(iterable=None, desc: str | None = None, total: int | None = None, quiet: bool = False, **kwargs):
    """A tqdm bar over ``iterable`` (or a manual one: ``bar.update(n)``), or a
    silent pass-through with the same methods when ``quiet`` or when stderr
    is not a terminal. Extra keyword arguments go to tqdm (``unit``, ``leave``)."""
    show = not quiet and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, disable=not show, dynamic_ncols=True, **kwargs)


def write(text: str, file=None) -> None:
    """Print ``text`` (to stdout by default) above any bar on the screen, so a
    result line and a bar on the same terminal do not run into each other."""
    stream = file or sys.stdout
    tqdm.write(text, file=stream)
    stream.flush()
