"""GGUF files (llama.cpp's checkpoint format), read through the ``gguf``
package (the ``gguf`` extra): which file a path names, opening one with one
clear error for a bad file, and its metadata as plain Python values.

The model (config and tensors) is read by :mod:`prism_ext.models.gguf`, the
tokenizer by :func:`prism_ext.inputs.tokenizer.gguf_tokenizer`.

A GGUF file's header states counts and lengths; the ``gguf`` reader maps the
file and takes every array as a view of it, so a header value larger than the
file never allocates anything: it ends in a short read, reported here as a
truncated or corrupt file."""

from __future__ import annotations

import os
from pathlib import Path

MAGIC = b"GGUF"
SUFFIX = ".gguf"


def is_gguf(path: Path) -> bool:
    """A file named ``*.gguf``, or any file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_in(directory: Path) -> Path | None:
    """The one ``*.gguf`` file of a checkpoint directory that has no
    config.json; None when it has none; an error naming them when it has
    several (which one is meant cannot be guessed)."""
    if (directory / "config.json").is_file():
        return None
    found = sorted(p for p in directory.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise ValueError(f"path: {directory} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                         f"pass the one to load")
    return found[0] if found else None


def open_gguf(path):
    """A ``gguf.GGUFReader`` of ``path``, or one line ``gguf: PATH ...``
    saying why not (the package missing, wrong magic, truncated, corrupt)."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"gguf: reading {path} needs the gguf package: pip install 'prism-ext[gguf]'") from None
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ValueError(f"gguf: {path} cannot be read ({exc.strerror or exc})") from None
    if head != MAGIC:
        raise ValueError(f"gguf: {path} is not a GGUF file (its first bytes are {head!r}, not {MAGIC!r})")
    try:
        return gguf.GGUFReader(os.fspath(path), "r")
    except Exception as exc:  # the reader raises IndexError, ValueError, KeyError, OverflowError... on bad bytes
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ValueError(f"gguf: {path} is truncated or corrupt ({type(exc).__name__}: {first[:200]})") from None


def metadata(reader, path) -> dict:
    """Every key/value of the file as plain values (str, int, float, bool, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header itself (version, counts)
            continue
        try:
            value = field.contents()
        except Exception as exc:  # a value whose bytes do not decode (bad UTF-8, short array)
            raise ValueError(f"gguf: {path}: metadata {key!r} is corrupt ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
        out[key] = value
    return out
