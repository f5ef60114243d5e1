"""The demo's figure, drawn into a numpy array and written with the package's
own PNG writer (:func:`prism_ext.images.write_png`): the figure is part of the
out-of-the-box job, so it must not depend on an optional plotting package.
Text uses a built-in 5x7 bitmap font holding only the characters it needs."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F

from .images import write_png

__all__ = ["digits_figure"]

_FONT = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "C": (" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "),
    "D": ("#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "I": (" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "=": ("     ", "     ", "#####", "     ", "#####", "     ", "     "),
    ":": ("     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "),
    "/": ("     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "),
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    " ": ("     ",) * 7,
    "?": (" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "),
}
_GLYPHS = {ch: np.array([[c == "#" for c in row] for row in rows]) for ch, rows in _FONT.items()}
_SCALE = 2  # font pixels per glyph dot
_ADVANCE = 6 * _SCALE
_LINE = 9 * _SCALE


def _text(img: np.ndarray, x: int, y: int, text: str, color) -> int:
    """Draw ``text`` with its top-left at (x, y); returns the x after it."""
    for ch in text.upper():
        glyph = np.kron(_GLYPHS.get(ch, _GLYPHS["?"]), np.ones((_SCALE, _SCALE), bool))
        h, w = glyph.shape
        region = img[y:y + h, x:x + w]
        region[glyph[:region.shape[0], :region.shape[1]]] = color
        x += _ADVANCE
    return x


def _palette(n: int) -> np.ndarray:
    """n well-separated device colours (RGB in 0..1)."""
    base = [(0.25, 0.55, 1.0), (1.0, 0.55, 0.1), (0.2, 0.85, 0.35), (0.8, 0.35, 1.0)]
    extra = [colorsys.hsv_to_rgb((0.13 + i / max(1, n - 4)) % 1.0, 0.7, 1.0) for i in range(max(0, n - 4))]
    return np.array((base + extra)[:n], np.float32)


def digits_figure(path, digits: np.ndarray, partition, cr: int, grid: int, exact, prism, labels,
                  zoom: int = 4) -> None:
    """Each digit upsampled as the model sees it, every patch tinted by the
    device that owns it (alternating shades mark the segments one mean row
    stands for), with the true label (T), the single-device prediction (E)
    and the PRISM prediction (P, green if it matches E, red if not)."""
    digits = np.asarray(digits, np.float32)
    devices = len(partition)
    colors = _palette(devices)
    side = grid * 4 * zoom  # the model's image is grid * 4 pixels across
    ink = F.interpolate(torch.from_numpy(digits)[:, None] / 16.0, size=(side, side), mode="bilinear",
                        align_corners=False)[:, 0].clamp(0, 1).numpy() ** 1.5  # gamma: crisper strokes
    cell = side // grid
    # owner device and segment parity of each patch (position p + 1: [CLS] is position 0)
    owner = np.zeros(grid * grid, int)
    shade = np.zeros(grid * grid, np.float32)
    for rank, (start, stop) in enumerate(partition):
        for pos in range(max(start, 1), stop):
            owner[pos - 1] = rank
            shade[pos - 1] = 0.34 if ((pos - start) // cr) % 2 == 0 else 0.17
    per_row = min(len(digits), 10)
    rows = -(-len(digits) // per_row)
    margin, gap = 16, 20
    header = 2 * _LINE + 12
    panel_h = side + 2 * _LINE + 8
    width = 2 * margin + per_row * side + (per_row - 1) * gap
    img = np.full((header + rows * panel_h + margin, max(width, 2 * margin + 60 * _ADVANCE), 3), 255, np.uint8)

    x = _text(img, margin, margin // 2, f"PRISM  P={devices}  CR={cr}  ", (0, 0, 0))
    for rank in range(devices):
        img[margin // 2:margin // 2 + 7 * _SCALE, x:x + 7 * _SCALE] = (colors[rank] * 255).astype(np.uint8)
        x = _text(img, x + 8 * _SCALE, margin // 2, f"D{rank}  ", (0, 0, 0))
    _text(img, x, margin // 2, "CLS ON D0", (0, 0, 0))
    _text(img, margin, margin // 2 + _LINE, "T=TRUE  E=EXACT 1 DEVICE  P=PRISM", (90, 90, 90))

    hue = colors[owner].reshape(grid, grid, 3).repeat(cell, 0).repeat(cell, 1)
    tint = hue * shade.reshape(grid, grid, 1).repeat(cell, 0).repeat(cell, 1)  # dark device colour behind the ink
    lines = np.zeros((side, side), bool)
    lines[::cell, :] = lines[:, ::cell] = True
    lines[-1, :] = lines[:, -1] = True
    for i, digit_ink in enumerate(ink):
        r, c = divmod(i, per_row)
        y0, x0 = header + r * panel_h, margin + c * (side + gap)
        pixel = tint * (1 - digit_ink[..., None]) + (0.9 + 0.1 * hue) * digit_ink[..., None]
        pixel = (pixel.clip(0, 1) * 255).astype(np.uint8)
        pixel[lines] = 24
        img[y0:y0 + side, x0:x0 + side] = pixel
        ty = y0 + side + 6
        tx = _text(img, x0, ty, f"T{labels[i]} E{exact[i]} ", (0, 0, 0))
        _text(img, tx, ty, f"P{prism[i]}", (0, 150, 0) if prism[i] == exact[i] else (220, 0, 0))
    write_png(path, img)
