"""Unlabelled text corpora larger than memory, for ``prism finetune --data``.

A corpus is one or more UTF-8 text files, one example per line: given as
files, folders (their ``*.txt`` files, recursively) or glob patterns
(``**`` crosses folders). Lines are read lazily, file after file; a
bounded shuffle buffer (:func:`shuffled`) mixes them without holding the
corpus. Which texts are held out is decided by a hash of the text itself
(:func:`is_held_out`), not by its place in the files: the split needs no
pass over the corpus to be known, is the same whatever the order or the
number of files, and a text that occurs twice falls on one side only.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["text_files", "read_lines", "is_held_out", "shuffled", "TextCorpus"]


def text_files(specs: Iterable[str], name: str = "data") -> list[Path]:
    """The files of ``specs`` (files, folders, glob patterns), in order, each
    once; errors name the argument ``name``."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            hits = [path]
        elif path.is_dir():
            hits = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not hits:
                raise ValueError(f"{name}: the folder {path} holds no .txt files")
        elif glob.has_magic(str(spec)):
            hits = sorted(Path(m) for m in glob.glob(str(spec), recursive=True) if Path(m).is_file())
            if not hits:
                raise ValueError(f"{name}: {spec} matches no file")
        else:
            raise FileNotFoundError(f"{name}: {path} does not exist")
        found += [h for h in hits if h not in found]
    return found


def read_lines(paths: Iterable[Path], name: str = "data") -> Iterator[str]:
    """The non-blank lines of ``paths``, stripped, read lazily; errors name the argument ``name``."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
            except UnicodeDecodeError as exc:
                raise ValueError(f"{name}: {path} is not UTF-8 text ({exc})") from None


def _key(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the text and the seed."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_held_out(text: str, share: float, seed: int = 0) -> bool:
    """Whether ``text`` belongs to the held-out ``share`` of any corpus."""
    return _key(text, seed) < share


def shuffled(items: Iterable, buffer: int, rng: random.Random) -> Iterator:
    """``items`` in a random order, holding at most ``buffer`` of them: each
    one read replaces a random one of the buffer, which is yielded."""
    if buffer < 1:
        raise ValueError(f"buffer: expected an int >= 1, got {buffer!r}")
    held: list = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        i = rng.randrange(buffer)
        yield held[i]
        held[i] = item
    rng.shuffle(held)
    yield from held


@dataclass(frozen=True)
class TextCorpus:
    """Text files read lazily, split by a hash of each text: those with
    :func:`is_held_out` (``held_out``, ``seed``) never train, and at most
    ``held_out_max`` of them (the smallest hashes: still fixed by the texts)
    are reported on; ``exclude`` holds texts that never train either (a
    held-out set of its own)."""

    paths: tuple[Path, ...]
    held_out: float = 0.0
    seed: int = 0
    held_out_max: int | None = None
    exclude: frozenset = field(default_factory=frozenset)

    @classmethod
    def from_specs(cls, specs: Iterable[str], **kwargs) -> "TextCorpus":
        return cls(tuple(text_files(specs)), **kwargs)

    def lines(self) -> Iterator[str]:
        return read_lines(self.paths)

    def held_out_texts(self) -> list[str]:
        """The reported held-out texts, each once, in the order of their hashes
        (so neither the order nor the number of files changes the report)."""
        if not self.held_out:
            return []
        chosen: dict[str, float] = {}
        heap: list[tuple[float, str]] = []  # the largest kept key on top (negated), when capped
        for text in self.lines():
            if text in chosen or not is_held_out(text, self.held_out, self.seed):
                continue
            key = _key(text, self.seed)
            if self.held_out_max is not None and len(chosen) >= self.held_out_max:
                if not heap or key >= -heap[0][0]:
                    continue
                _, dropped = heapq.heappushpop(heap, (-key, text))
                del chosen[dropped]
            elif self.held_out_max is not None:
                heapq.heappush(heap, (-key, text))
            chosen[text] = key
        return sorted(chosen, key=chosen.__getitem__)

    def train_lines(self) -> Iterator[str]:
        """Every line that may train, in file order, lazily."""
        for text in self.lines():
            if text not in self.exclude and not (self.held_out and is_held_out(text, self.held_out, self.seed)):
                yield text

    def source(self) -> dict:
        """The files, their sizes and SHA-256 (read in blocks), for the report."""
        files = []
        for path in self.paths:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            files.append({"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()})
        return {"files": files} if len(files) > 1 else files[0]
