"""prism_ext: PRISM distributed Transformer inference for edge devices."""

from __future__ import annotations

import torch as _torch

from ._version import __version__

from . import kernels
from .api import PrismModel, PrismOutput, load
from .kernels import get_num_threads, set_num_threads
from .options import RunOptions
from .runtime import Cluster, ClusterError, cluster


# Kernel threads follow torch's setting unless the user sets them.
set_num_threads(max(1, _torch.get_num_threads()))

__all__ = ["kernels", "load", "cluster", "Cluster", "ClusterError", "PrismModel", "PrismOutput", "RunOptions",
           "get_num_threads", "set_num_threads", "__version__"]
