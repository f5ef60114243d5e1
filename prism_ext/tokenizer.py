"""Text tokenizers for ``prism run --text`` and the bundled models.

A checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers`` format) is read
here. A byte-level tokenizer with no merges (every UTF-8 byte is one token, the
scheme of the bundled ``gpt2-tiny``) needs no package at all; any other
tokenizer (GPT-2 BPE, BERT WordPiece) is handed to the ``tokenizers`` package,
which is then required.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ByteTokenizer", "load_tokenizer", "byte_level_tokenizer_json"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ByteTokenizer:
    """One token per UTF-8 byte; ``ids[b]`` is the id of byte ``b``."""

    def __init__(self, ids: list[int]):
        if sorted(ids) != sorted(set(ids)) or len(ids) != 256:
            raise ValueError("tokenizer: a byte-level vocabulary must give 256 distinct ids")
        self.ids = list(ids)
        self.bytes = {i: b for b, i in enumerate(ids)}
        self.vocab_size = max(ids) + 1

    def encode(self, text: str, special: bool = False) -> list[int]:
        """``special`` is accepted for symmetry: a byte-level vocabulary has no special tokens."""
        return [self.ids[b] for b in check_text(text).encode("utf-8")]

    def decode(self, ids) -> str:
        try:
            raw = bytes(self.bytes[int(i)] for i in ids)
        except KeyError as exc:
            raise ValueError(f"ids: {exc.args[0]} is not a byte token") from None
        return raw.decode("utf-8", errors="replace")


def check_text(text) -> str:
    """``text`` as a str that encodes as UTF-8. A command line with invalid
    UTF-8 bytes reaches Python as lone surrogates, which no tokenizer can take."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text: is not valid UTF-8 (undecodable byte at character {exc.start}); "
                         "pass the text in UTF-8") from None
    return text


class _HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the same two methods (no special tokens added)."""

    def __init__(self, tok):
        # A checkpoint's tokenizer.json may pad or truncate to a fixed length; a run
        # wants the text's own tokens (and an error, not a cut, when they do not fit).
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str, special: bool = False) -> list[int]:
        """``special``: add the tokenizer's special tokens (BERT's [CLS] ... [SEP])."""
        return self.tok.encode(check_text(text), add_special_tokens=special).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def byte_level_tokenizer_json() -> dict:
    """tokenizer.json of a byte-level BPE with no merges where id = byte value:
    readable by ``tokenizers``/transformers and by :class:`ByteTokenizer`."""
    table = _bytes_to_unicode()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {table[b]: b for b in range(256)}, "merges": []},
    }


def _as_byte_level(spec: dict) -> ByteTokenizer | None:
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("merges") or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        return None
    if spec.get("normalizer") or spec.get("added_tokens"):
        return None
    table = _bytes_to_unicode()
    vocab = model.get("vocab") or {}
    if len(vocab) != 256 or any(table[b] not in vocab for b in range(256)):
        return None
    return ByteTokenizer([vocab[table[b]] for b in range(256)])


def load_tokenizer(directory) -> ByteTokenizer | _HFTokenizer:
    """The tokenizer of a checkpoint directory (its ``tokenizer.json``)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: {directory} has no tokenizer.json; so text cannot be encoded; "
                                f"copy the checkpoint's tokenizer.json there (from Python, pass input_ids instead)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"tokenizer: {path} is not valid JSON ({exc})") from None
    byte_level = _as_byte_level(spec) if isinstance(spec, dict) else None
    if byte_level is not None:
        return byte_level
    try:
        from tokenizers import Tokenizer
    except ImportError:
        kind = (spec.get("model") or {}).get("type", "unknown") if isinstance(spec, dict) else "unknown"
        raise ImportError(f"tokenizer: {path} is a {kind} tokenizer; reading it needs the `tokenizers` package "
                          f"(pip install tokenizers)") from None
    try:
        return _HFTokenizer(Tokenizer.from_file(str(path)))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ValueError(f"tokenizer: {path} could not be read ({exc})") from None
