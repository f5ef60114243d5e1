"""matplotlib for the package's figures (the demo's, the benchmarks', the
evaluation's), from the ``plot`` extra: ``pip install 'prism-ext[plot]'``.

Figures are made with matplotlib's object API (``Figure``, no pyplot): no
backend or display is chosen, nothing global changes in a caller's own
matplotlib session, and two threads may draw at once."""

from __future__ import annotations

__all__ = ["PLOT_HINT", "new_figure"]

PLOT_HINT = "figures need matplotlib: pip install 'prism-ext[plot]'"


def new_figure(**kwargs):
    """A ``matplotlib.figure.Figure`` (keyword arguments as for it: ``figsize``,
    ``layout``...); save it with ``fig.savefig(path)``. ImportError with
    :data:`PLOT_HINT` when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(PLOT_HINT) from None
    return Figure(**kwargs)


def digits_figure(path, digits, partition, cr: int, grid: int, exact, prism, labels) -> None:
    """The demo's figure: each digit as the model sees it (8x8 values
    upsampled to the model's grid of patches), every patch tinted by the
    device that holds it -- alternating shades mark the CR patches one mean
    row stands for -- with the true label, the single-device prediction and
    the PRISM prediction (red when it differs from the single-device one)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from matplotlib.patches import Patch

    digits = np.asarray(digits, np.float32)
    devices = len(partition)
    fig = new_figure(figsize=(1.45 * min(len(digits), 10) + 0.4, 2.0 * -(-len(digits) // 10) + 1.3), layout="constrained")
    colours = _device_colours(devices)
    side = grid * 4
    ink = F.interpolate(torch.from_numpy(digits)[:, None] / 16.0, size=(side, side), mode="bilinear",
                        align_corners=False)[:, 0].clamp(0, 1).numpy()
    cell = side // grid
    # owner device and segment parity of each patch (position p + 1: [CLS] is position 0)
    tint = np.zeros((grid * grid, 4), np.float32)
    for rank, (start, stop) in enumerate(partition):
        for pos in range(max(start, 1), stop):
            tint[pos - 1, :3] = colours[rank][:3]
            tint[pos - 1, 3] = 0.55 if ((pos - start) // cr) % 2 == 0 else 0.3
    tint = tint.reshape(grid, grid, 4).repeat(cell, 0).repeat(cell, 1)
    per_row = min(len(digits), 10)
    axes = fig.subplots(-(-len(digits) // per_row), per_row, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(digits):
            continue
        ax.imshow(ink[i], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(tint, interpolation="nearest")
        ax.set_xticks(np.arange(-0.5, side, cell), minor=True)
        ax.set_yticks(np.arange(-0.5, side, cell), minor=True)
        ax.set_title(f"label {labels[i]}", fontsize=10)
        agree = prism[i] == exact[i]
        ax.text(0.5, -0.04, f"exact {exact[i]} · PRISM {prism[i]}", transform=ax.transAxes, ha="center", va="top",
                fontsize=9, color="black" if agree else "red", fontweight="normal" if agree else "bold")
    handles = [Patch(color=colours[r], label=f"device {r}" + (" (+[CLS])" if r == 0 else "")) for r in range(devices)]
    fig.legend(handles=handles, loc="outside lower center", ncol=devices, frameon=False, fontsize=9)
    fig.suptitle(f"PRISM on vit-tiny-digits: {grid}x{grid} patches over P = {devices} devices, CR = {cr}\n"
                 f"each patch tinted by its device; alternating shades: the {cr} patches one mean row stands for",
                 fontsize=10)
    fig.savefig(path, dpi=120)


def _device_colours(n: int):
    """n well-separated colours (matplotlib's tab10, then tab20)."""
    from matplotlib import colormaps

    table = colormaps["tab10"].colors if n <= 10 else colormaps["tab20"].colors
    return [table[i % len(table)] for i in range(n)]
