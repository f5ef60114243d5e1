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
    colours = np.array([c[:3] for c in _device_colours(devices)], np.float32)
    side = grid * 4
    ink = F.interpolate(torch.from_numpy(digits)[:, None] / 16.0, size=(side, side), mode="bilinear",
                        align_corners=False)[:, 0].clamp(0, 1).numpy() ** 1.5  # gamma: crisper strokes
    cell = side // grid
    # background of each patch: its device's colour, darker and lighter for alternate segments
    # (position p + 1 is patch p: [CLS] is position 0, held by device 0)
    paper = np.ones((grid * grid, 3), np.float32)
    for rank, (start, stop) in enumerate(partition):
        for pos in range(max(start, 1), stop):
            strength = 0.55 if ((pos - start) // cr) % 2 == 0 else 0.3
            paper[pos - 1] = 1 - strength * (1 - colours[rank])
    paper = paper.reshape(grid, grid, 3).repeat(cell, 0).repeat(cell, 1)
    per_row = min(len(digits), 10)
    rows = -(-len(digits) // per_row)
    width = max(1.3 * per_row + 0.3, 7.0)
    panel = (width - 0.3) / per_row
    fig = new_figure(figsize=(width, rows * (panel + 0.45) + 0.9), layout="constrained")
    axes = fig.subplots(rows, per_row, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(digits):
            continue
        ax.imshow(paper * (1 - ink[i][..., None]), interpolation="nearest")  # dark ink on the device colours
        for k in range(1, grid):  # patch borders
            ax.axhline(k * cell - 0.5, color="white", lw=0.6)
            ax.axvline(k * cell - 0.5, color="white", lw=0.6)
        ax.set_title(f"label {labels[i]}", fontsize=10, pad=3)
        agree = prism[i] == exact[i]
        ax.text(0.5, -0.03, f"exact {exact[i]} · PRISM {prism[i]}", transform=ax.transAxes, ha="center", va="top",
                fontsize=8.5, color="black" if agree else "red", fontweight="normal" if agree else "bold")
    handles = [Patch(color=tuple(colours[r]), label=f"device {r}" + (" (+[CLS])" if r == 0 else ""))
               for r in range(devices)]
    fig.legend(handles=handles, loc="outside lower center", ncol=devices, frameon=False, fontsize=9)
    fig.suptitle(f"PRISM on vit-tiny-digits: {grid}x{grid} patches over P = {devices} devices, CR = {cr}\n"
                 f"a patch's colour: its device; darker and lighter runs: the {cr} patches one mean row stands for",
                 fontsize=9.5)
    fig.savefig(path, dpi=120)


def _device_colours(n: int):
    """n well-separated colours (matplotlib's tab10, then tab20)."""
    from matplotlib import colormaps

    table = colormaps["tab10"].colors if n <= 10 else colormaps["tab20"].colors
    return [table[i % len(table)] for i in range(n)]
