"""Images for ViT checkpoints: a small PNG reader/writer and the image
processor described by a checkpoint's ``preprocessor_config.json``.

PNG is read and written here with zlib + struct, so neither ``prism run
--image x.png`` nor the demo's figure needs an imaging package; other formats
(JPEG, BMP, ...) are read through Pillow when it is installed.

The processor follows Hugging Face's ``ViTImageProcessor`` keys (``do_resize``
+ ``size``, ``do_rescale`` + ``rescale_factor``, ``do_normalize`` +
``image_mean``/``image_std``; resizing is bilinear). A ``prism_digits`` entry
(the bundled ``vit-tiny-digits``) adds one step in front: an image file is
first reduced to the format of scikit-learn's digits, the way that data set
was made (grayscale, ink bright, cropped to the ink and centred on a square,
32x32 binary bitmap, "on" pixels counted in 4x4 blocks -> 8x8 values 0..16).
Raw 8x8 digit arrays are already in that format, so both kinds of input take
the same steps from there on.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["read_png", "write_png", "read_image", "ImageProcessor"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-row PNG filters (None, Sub, Up, Average, Paeth)."""
    if len(raw) < height * (stride + 1):
        raise ValueError("image: PNG data is truncated")
    rows = np.frombuffer(raw, np.uint8, height * (stride + 1)).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1 and stride % bpp == 0:  # Sub: a running sum per byte lane
            cur = np.cumsum(line.reshape(-1, bpp), axis=0).reshape(-1) & 0xFF
        elif kind == 2:
            cur = (line + prev) & 0xFF
        elif kind in (1, 3, 4):
            cur = line.copy()
            for i in range(stride):  # these depend on the byte just decoded
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(prev[i])
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) >> 1
                else:
                    c = int(prev[i - bpp]) if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) & 0xFF
        else:
            raise ValueError(f"image: PNG row {y} has unknown filter type {kind}")
        out[y] = cur
        prev = cur
    return out


def read_png(data: bytes) -> np.ndarray:
    """Decode a non-interlaced PNG (any colour type, bit depth 1-16) into
    uint8 [H, W, C] with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)."""
    if not data.startswith(_SIGNATURE):
        raise ValueError("image: not a PNG file")
    pos, header, palette, idat = len(_SIGNATURE), None, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("image: PNG has no IHDR or no image data")
    width, height, depth, ctype, _, _, interlace = header
    if ctype not in _CHANNELS or depth not in (1, 2, 4, 8, 16) or width < 1 or height < 1:
        raise ValueError(f"image: unsupported PNG (colour type {ctype}, bit depth {depth})")
    if interlace:
        raise ValueError("image: interlaced PNGs are not supported; save it non-interlaced")
    if ctype == 3 and palette is None:
        raise ValueError("image: palette PNG without a PLTE chunk")
    channels = _CHANNELS[ctype]
    bits = channels * depth
    stride = (width * bits + 7) // 8
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ValueError(f"image: corrupt PNG data ({exc})") from None
    rows = _unfilter(raw, height, stride, max(1, bits // 8))
    if depth == 16:
        samples = rows.reshape(height, width * channels, 2)[..., 0]  # big-endian: keep the high byte
    elif depth == 8:
        samples = rows
    else:
        samples = np.unpackbits(rows, axis=1).reshape(height, -1, depth)[:, :width]
        samples = (samples * (1 << np.arange(depth - 1, -1, -1))).sum(-1).astype(np.uint8)
        if ctype == 0:
            samples = (samples.astype(np.uint32) * 255 // ((1 << depth) - 1)).astype(np.uint8)
    samples = samples.reshape(height, width, channels)
    if ctype == 3:
        if int(samples.max()) >= len(palette):
            raise ValueError("image: palette index out of range")
        samples = palette[samples[..., 0]]
    return np.ascontiguousarray(samples)


def write_png(path, rgb: np.ndarray) -> None:
    """Write uint8 [H, W, 3] as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected shape [H, W, 3], got {rgb.shape}")
    h, w, _ = rgb.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)
    Path(path).write_bytes(_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def read_image(path) -> np.ndarray:
    """An image file as uint8 [H, W, C]: PNG natively, other formats via Pillow."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image: {str(path)!r} does not exist or is not a file")
    data = path.read_bytes()
    if data.startswith(_SIGNATURE):
        return read_png(data)
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"image: {path} is not a PNG; reading other formats needs Pillow "
                          f"(pip install pillow), or convert it to PNG") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA" if "A" in im.getbands() else "RGB"))
    except Exception as exc:  # Pillow raises many types for unreadable files
        raise ValueError(f"image: {path} could not be read ({exc})") from None


def _to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> float [H, W] in 0..255; transparency composited on white."""
    x = img.astype(np.float32)
    c = x.shape[2]
    if c in (2, 4):
        alpha = x[..., -1:] / 255.0
        x = x[..., :-1] * alpha + 255.0 * (1 - alpha)
    return x[..., 0] if x.shape[2] == 1 else x @ np.array([0.299, 0.587, 0.114], np.float32)


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, C] -> float [channels, H, W] in 0..255."""
    if channels == 1:
        return _to_gray(img)[None]
    x = img.astype(np.float32)
    if x.shape[2] in (2, 4):
        alpha = x[..., -1:] / 255.0
        x = x[..., :-1] * alpha + 255.0 * (1 - alpha)
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    if channels != 3:
        raise ValueError(f"image: cannot make {channels} channels from an image file")
    return x.transpose(2, 0, 1)


class ImageProcessor:
    """``preprocessor_config.json`` as a callable: images -> ``pixel_values``."""

    def __init__(self, config: dict, num_channels: int, image_size: int):
        self.config = config
        self.channels = num_channels
        size = config.get("size") or {"height": image_size, "width": image_size}
        self.size = (int(size.get("height", image_size)), int(size.get("width", image_size))) if isinstance(size, dict) \
            else (int(size), int(size))
        self.do_resize = bool(config.get("do_resize", True))
        self.rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        self.do_normalize = bool(config.get("do_normalize", True))
        self.mean = torch.tensor(config.get("image_mean", [0.5] * num_channels), dtype=torch.float32)
        self.std = torch.tensor(config.get("image_std", [0.5] * num_channels), dtype=torch.float32)
        if self.do_normalize and (len(self.mean) != num_channels or len(self.std) != num_channels):
            raise ValueError(f"preprocessor_config.json: image_mean/image_std need {num_channels} values")
        self.digits = config.get("prism_digits")
        if self.digits is not None and num_channels != 1:
            raise ValueError("preprocessor_config.json: prism_digits needs num_channels=1")

    def digit_from_image(self, img: np.ndarray) -> np.ndarray:
        """An image (uint8 [H, W, C]) in the digits data set's format: float [8, 8], 0..16, ink bright."""
        grid, levels = int(self.digits.get("grid", 8)), int(self.digits.get("levels", 16))
        block = int(round(levels ** 0.5))
        g = _to_gray(img) / 255.0
        border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
        if border.mean() > 0.5:  # dark ink on a light background: make the ink bright
            g = 1.0 - g
        ink = g > 0.5
        if not ink.any():
            return np.zeros((grid, grid), np.float32)
        ys, xs = np.nonzero(ink)
        g = g[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        side = max(g.shape)
        square = np.zeros((side, side), np.float32)
        top, left = (side - g.shape[0]) // 2, (side - g.shape[1]) // 2
        square[top:top + g.shape[0], left:left + g.shape[1]] = g
        bitmap = F.interpolate(torch.from_numpy(square)[None, None], size=(grid * block, grid * block),
                               mode="bilinear", align_corners=False, antialias=True)[0, 0] > 0.5
        return bitmap.reshape(grid, block, grid, block).sum(dim=(1, 3)).numpy().astype(np.float32)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] raw values -> pixel_values: resize, rescale, normalize."""
        if self.do_resize and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size[1])
        x = x * self.rescale
        if self.do_normalize:
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return x.contiguous()

    def digits_to_pixels(self, digits) -> torch.Tensor:
        """Raw 8x8 digits ([8, 8] or [B, 8, 8], values 0..16) -> pixel_values [B, 1, H, W]."""
        if self.digits is None:
            raise ValueError("digits: this checkpoint's processor has no prism_digits entry")
        x = torch.as_tensor(np.asarray(digits, dtype=np.float32))
        grid = int(self.digits.get("grid", 8))
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or tuple(x.shape[1:]) != (grid, grid):
            raise ValueError(f"digits: expected shape [{grid}, {grid}] or [batch, {grid}, {grid}], got {tuple(x.shape)}")
        return self._finish(x[:, None])

    def images_to_pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """Decoded images (uint8 [H, W, C]) -> pixel_values [B, C, H, W]."""
        if self.digits is not None:
            return self.digits_to_pixels(np.stack([self.digit_from_image(im) for im in images]))
        out = []
        for im in images:
            x = torch.from_numpy(np.ascontiguousarray(_to_channels(im, self.channels)))[None]
            out.append(self._finish(x))
        if len({tuple(x.shape) for x in out}) > 1:
            raise ValueError("image: images of different sizes with do_resize=false in preprocessor_config.json")
        return torch.cat(out)

    def files_to_pixels(self, paths) -> torch.Tensor:
        return self.images_to_pixels([read_image(p) for p in paths])
