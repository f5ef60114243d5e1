"""prism_ext: PRISM distributed Transformer inference for edge devices."""

from __future__ import annotations

__version__ = "0.1.0"

import torch as _torch

from . import kernels
from .api import PrismModel, PrismOutput
from .api import load as _load_path
from .kernels import get_num_threads, set_num_threads


def load(path_or_name) -> PrismModel:
    """Load a checkpoint: a bundled model's name (``gpt2-tiny``,
    ``vit-tiny-digits``; see ``prism zoo list``), a Hugging Face checkpoint
    directory, or a hub name already in the local cache. Never downloads."""
    from .zoo import resolve

    return _load_path(resolve(path_or_name))


# Kernel threads follow torch's setting unless the user sets them.
set_num_threads(max(1, _torch.get_num_threads()))

__all__ = ["kernels", "load", "PrismModel", "PrismOutput", "get_num_threads", "set_num_threads", "__version__"]
