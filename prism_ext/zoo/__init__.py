"""The bundled models: small checkpoints trained here from data every
machine has (``prism zoo train NAME``) and shipped as package data, so the
package does something real with no network and no checkpoint of the user's.

``prism_ext.load("gpt2-tiny")`` reads ``prism_ext/zoo/gpt2-tiny/`` like any
Hugging Face checkpoint directory (the loader looks names up in ``NAMES``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["NAMES", "model_dir", "metrics", "topic_split", "text_split", "HELD_OUT_EVERY"]

_HERE = Path(__file__).resolve().parent

# name -> what it is (``prism zoo list``)
NAMES = {
    "gpt2-tiny": "GPT-2 over UTF-8 bytes, trained on Python's pydoc_data.topics",
    "llama-tiny": "Llama (RoPE, GQA, RMSNorm, SwiGLU) with a BPE tokenizer and a chat template, trained on "
                  "Python's pydoc_data.topics",
    "vit-tiny-digits": "ViT classifier for scikit-learn's 8x8 handwritten digits (upsampled to 32x32)",
}


def model_dir(name: str) -> Path:
    """The folder of the bundled model ``name``."""
    if name not in NAMES:
        raise ValueError(f"model: unknown bundled model {name!r} (bundled: {', '.join(NAMES)})")
    path = _HERE / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: the bundled {name} is missing from {path}; "
                                f"rebuild it with `prism zoo train {name}`")
    return path


def metrics(name: str) -> dict:
    """What ``prism zoo train`` recorded for the bundled ``name``."""
    return json.loads((model_dir(name) / "metrics.json").read_text())


HELD_OUT_EVERY = 8  # the language models' held-out topics: every 8th, sorted by name


def topic_split() -> tuple[dict[str, str], dict[str, str]]:
    """(train topics, held-out topics) of pydoc_data.topics, name -> text, sorted by name."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = set(keys[::HELD_OUT_EVERY])
    return {k: topics[k] for k in keys if k not in held}, {k: topics[k] for k in keys if k in held}


def text_split() -> tuple[bytes, bytes, list[str]]:
    """The language models' data: (train bytes, held-out bytes, held-out topic names), each split's
    topics joined by blank lines."""
    train, held = topic_split()
    return "\n\n".join(train.values()).encode("utf-8"), "\n\n".join(held.values()).encode("utf-8"), list(held)
