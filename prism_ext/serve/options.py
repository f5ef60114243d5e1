"""What the operator sets (``prism serve`` flags) and the per-request knobs
derived from :class:`~prism_ext.options.RunOptions`."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_count, check_number
from ..options import MODES, RunOptions
from ..runtime import DEFAULT_TIMEOUT

# The per-request knobs: every run option the server does not set itself (a
# field added to RunOptions is a knob here as it is). cr and mode are fields
# of every request, within the operator's limits.
_SET_BY_SERVER = {"mode", "cr", "device_weights", "outputs"}
KNOBS = tuple(name for name in RunOptions.fields() if name not in _SET_BY_SERVER)


@dataclass
class ServeOptions:
    """What the operator sets (``prism serve`` flags); requests may choose
    ``cr`` in [1, max_cr], a mode of ``modes`` and the knobs in ``knobs``."""

    model: str
    weight_dtype: str = "fp32"  # how every device holds the weights (prism_ext.models.quant)
    devices: int | None = 2
    master: str | None = None
    world: int | None = None
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    threads: int | None = None
    ifname: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cr: int | list[int] = 4
    mode: str = "prism"
    max_cr: int = 128
    modes: tuple[str, ...] = MODES
    knobs: tuple[str, ...] = KNOBS
    max_batch: int = 8
    batch_wait: float = 0.005  # seconds the dispatcher waits for more requests to batch
    max_tokens: int = 256
    max_inputs: int = 32
    max_body: int = 1 << 20
    body_timeout: float = 30.0  # seconds a request body may take to arrive, whatever its framing
    max_queue: int = 64
    max_image_pixels: int = 4096 * 4096
    drain_timeout: float = 30.0
    quiet: bool = False

    def check(self) -> None:
        for name in ("max_cr", "max_batch", "max_tokens", "max_inputs", "max_body", "max_queue", "max_image_pixels"):
            check_count(getattr(self, name), name)
        if check_number(self.body_timeout, "body_timeout", 0, 3600) == 0:
            raise ValueError("body_timeout: must be > 0 seconds")
        check_number(self.batch_wait, "batch_wait", 0, 10)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes: expected some of {', '.join(MODES)}, got {', '.join(self.modes) or 'none'}")
        if self.mode not in self.modes:
            raise ValueError(f"mode: the default mode {self.mode!r} must be one of the allowed modes "
                             f"({', '.join(self.modes)})")
        bad = [k for k in self.knobs if k not in KNOBS]
        if bad:
            raise ValueError(f"knobs: {', '.join(bad)} is not a knob (knobs: {', '.join(KNOBS)})")
        crs = self.cr if isinstance(self.cr, list) else [self.cr]
        if any(c > self.max_cr for c in crs):
            raise ValueError(f"cr: the default {self.cr} exceeds max_cr {self.max_cr}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: must not be empty")

