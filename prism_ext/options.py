"""How a request runs: one :class:`RunOptions`, declared, documented and
checked here, and nowhere else.

``PrismModel`` and ``Cluster`` calls, :func:`prism_ext.executor.request.plan`, the
jobs behind ``prism run``, the server's per-request knobs and the settings a
torchrun rank pins in the handshake all take or derive from it; keyword
arguments (``m(ids, cr=4)``) are a convenience that builds one. What depends
on the model (the number of layers a per-layer CR must match, the special
token ids of ``exact_rows="special"``, the number of positions) is checked by
``plan``; everything else is checked once, when the object is made.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .comm.wire import WIRE_DTYPES
from .method.engine import OUTPUTS, ExactRows, RunConfig
from .method.partition import cr_schedule
from .models.common import DEFAULT

__all__ = ["RunOptions", "MODES", "DEFAULT", "run_options"]

# DEFAULT: a setting whose default depends on the model family (``Network.defaults``),
# resolved by ``Network.resolve``.

# single: rank 0 alone; prism / voltage: position-wise over every device; tp: tensor parallel.
MODES = ("single", "prism", "voltage", "tp")


@dataclass(frozen=True)
class RunOptions:
    """The settings of one run (forward pass or generation) besides its
    inputs and its number of devices. Frozen; :meth:`replace` makes a variant."""

    mode: str = "prism"
    """``prism`` (segment means), ``voltage`` (full rows, the exact
    position-wise baseline; ignores ``cr``), ``tp`` (tensor parallelism over
    heads and MLP columns) or ``single`` (rank 0 alone)."""
    cr: int | tuple[int, ...] = 1
    """Compression rate: rows per segment mean, one int or one per layer."""
    wire_dtype: str = "fp32"
    """How rows travel: ``fp32``, ``fp16``, ``bf16`` or ``int8`` (per-row scales)."""
    compression_point: str = DEFAULT
    """What is averaged: the attention input (``attn_input``, exact keys of a
    mean for position-free keys; RoPE models rotate a mean's keys at the mean
    of its positions), the layer input (``hidden``; the receiver applies LN1)
    or the rotated keys and values (``kv``: receivers project nothing).
    ``default``: the family's (``attn_input``; ``kv`` for Llama, Qwen, Mistral)."""
    mean_weighting: str = "count"
    """``count`` weights a mean by the positions it stands for (the method);
    ``none`` weighs it as one row (the ablation)."""
    exact_rows: str | ExactRows = DEFAULT
    """Rows sent as their own rows instead of averaged: ``none``, or parts
    ``first``, ``special``, ``top<K>``, ``adaptive`` joined by ``+`` (see
    :class:`prism_ext.method.engine.ExactRows`); prism mode only.
    ``default``: the family's (``none``; ``first`` for Llama, Qwen, Mistral,
    whose first position is an attention sink)."""
    device_weights: tuple[float, ...] | None = None
    """Relative speed of each device (positions are split in proportion);
    None splits evenly."""
    outputs: tuple[str, ...] = ("rows", "cls")
    """What comes back to rank 0: ``rows`` (every row output), ``cls`` (the
    [CLS] heads), ``pooled`` (the mean over valid positions), ``last`` (the
    last position's row outputs)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        cr = self.cr
        if isinstance(cr, (list, tuple)):
            if not cr:
                raise ValueError("cr: a per-layer schedule needs at least one value")
            object.__setattr__(self, "cr", tuple(cr_schedule(list(cr), len(cr))))
        else:
            object.__setattr__(self, "cr", cr_schedule(cr, 1)[0])  # an int in [1, MAX_COUNT]
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype: expected one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        # the engine's own checks of the settings it shares with these
        RunConfig(compression_point="attn_input" if self.compression_point == DEFAULT else self.compression_point,
                  mean_weighting=self.mean_weighting)
        if self.exact_rows != DEFAULT:
            ExactRows.parse(self.exact_rows)  # the spec's syntax; special ids are the model's (plan)
        weights = self.device_weights
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
                raise TypeError(f"device_weights: expected a sequence of numbers or None, got "
                                f"{type(weights).__name__}")
            weights = tuple(weights)
            if not weights or not all(not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w)
                                      and w > 0 for w in weights):
                raise ValueError(f"device_weights: every weight must be a finite number > 0, got {list(weights)}")
            object.__setattr__(self, "device_weights", tuple(float(w) for w in weights))
        outputs = self.outputs
        if isinstance(outputs, str) or not hasattr(outputs, "__iter__"):
            raise TypeError(f"outputs: expected a sequence of {', '.join(OUTPUTS)}, got {outputs!r}")
        outputs = tuple(outputs)
        if not outputs or not set(outputs) <= set(OUTPUTS):
            raise ValueError(f"outputs: expected a non-empty subset of {', '.join(OUTPUTS)}, got {outputs!r}")
        object.__setattr__(self, "outputs", outputs)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The setting names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "RunOptions":
        """A copy with ``changes`` (checked again); an unknown name is a TypeError naming it."""
        unknown = sorted(set(changes) - set(self.fields()))
        if unknown:
            raise TypeError(f"{unknown[0]}: not a run option (options: {', '.join(self.fields())})")
        return dataclasses.replace(self, **changes)

    def to_meta(self) -> dict:
        """JSON-ready form (the handshake's pinned settings, results' ``options``)."""
        meta = dataclasses.asdict(self)
        meta["cr"] = list(self.cr) if isinstance(self.cr, tuple) else self.cr
        meta["exact_rows"] = self.exact_rows if isinstance(self.exact_rows, str) else self.exact_rows.to_meta()
        meta["device_weights"] = None if self.device_weights is None else list(self.device_weights)
        meta["outputs"] = list(self.outputs)
        return meta


def run_options(options: RunOptions | None = None, **changes) -> RunOptions:
    """``options`` (default: the defaults) with keyword ``changes``: how every
    entry point turns its keyword convenience into one :class:`RunOptions`."""
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"options: expected a RunOptions or None, got {type(options).__name__}")
    base = RunOptions() if options is None else options
    return base.replace(**changes) if changes else base
