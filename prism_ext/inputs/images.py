"""Images for ViT checkpoints: opening any format Pillow reads, safely, and
the image processor a checkpoint's ``preprocessor_config.json`` describes.

:func:`open_image` takes a path, bytes, a binary file object, a PIL image or
a uint8 array and returns a decoded PIL image with its EXIF orientation
applied. It refuses, in one line naming the file, what is not an image, an
empty file, and an image of more than ``max_pixels`` pixels (default
:data:`MAX_PIXELS`) -- read from the header, before anything is decoded.

:class:`ImageProcessor` follows Hugging Face's ``ViTImageProcessor`` keys
(``do_resize`` + ``size`` + ``resample``, ``do_rescale`` + ``rescale_factor``,
``do_normalize`` + ``image_mean``/``image_std``). Colour is converted the way
transformers does: transparency composited on white, palette and grayscale
expanded to RGB for 3-channel checkpoints, luma (ITU-R 601) for 1-channel
ones; 16-bit grayscale keeps its high byte. Resizing is Pillow's, on the
8-bit image, so pixel values match transformers'.

A ``prism_digits`` entry (the bundled ``vit-tiny-digits``) adds one step in
front: an image is first reduced to the format of scikit-learn's digits, the
way that data set was made (grayscale, ink bright, cropped to the ink and
centred on a square, 32x32 binary bitmap, "on" pixels counted in 4x4 blocks
-> 8x8 values 0..16). Raw 8x8 digit arrays are already in that format, so both
kinds of input take the same steps from there on.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import BmpImagePlugin, IcnsImagePlugin, IcoImagePlugin, Image, ImageOps, UnidentifiedImageError

__all__ = ["MAX_PIXELS", "open_image", "check_image", "image_files", "ImageProcessor"]

# 50 megapixels: above the photos of most phone cameras (12-50 MP), far below what would
# exhaust a small board's memory (a decoded RGB image takes 3 bytes a pixel).
MAX_PIXELS = 50_000_000


def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    return getattr(source, "name", None) or f"{type(source).__name__} image"


def open_image(source, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PIL image, upright (EXIF orientation applied), from a path,
    bytes, a binary file object, a PIL image or a uint8 array [H, W(, C)]."""
    im, name = _open_checked(source, max_pixels)
    try:
        im.load()
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for truncated or corrupt data
        raise ValueError(f"image: {name} is truncated or corrupt ({exc})") from None
    _check_size(im.size, name, max_pixels)  # what was decoded (a container's frame may differ from its header)
    return ImageOps.exif_transpose(im)


def check_image(source, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image after the checks of :func:`open_image` that
    need only its header (exists, not empty, an image, within ``max_pixels``);
    nothing is decoded."""
    im, _ = _open_checked(source, max_pixels)
    size = im.size
    if hasattr(im, "close") and not isinstance(source, Image.Image):
        im.close()
    return size


def _open_checked(source, max_pixels: int) -> tuple[Image.Image, str]:
    """A lazily opened image (header read, pixels not decoded) and its name for errors."""
    name = _name(source)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image: an array must be uint8 [H, W] or [H, W, 1|3|4], got {source.dtype} "
                             f"{list(source.shape)}")
        source = Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    if isinstance(source, Image.Image):
        im = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"image: {name!r} does not exist or is not a file")
            if path.stat().st_size == 0:
                raise ValueError(f"image: {name} is empty (0 bytes)")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise ValueError("image: the image bytes are empty")
            source = io.BytesIO(bytes(source))
        _check_frames(source, name, max_pixels)
        try:
            im = Image.open(source)  # reads the header only
        except UnidentifiedImageError:
            raise ValueError(f"image: {name} is not an image Pillow can read") from None
        except Image.DecompressionBombError as exc:  # Pillow's own header check, far above ours
            found = re.search(r"\((\d+) pixels\)", str(exc))
            count = f"{found.group(1)} pixels" if found else "too many pixels"
            raise ValueError(f"image: {name} has {count}, more than the limit of {max_pixels}; "
                             f"scale it down first") from None
        except OSError as exc:
            raise ValueError(f"image: {name} could not be read ({exc})") from None
    _check_size(im.size, name, max_pixels)
    return im, name


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image: {name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"image: {name} is {width}x{height} = {width * height} pixels, more than the limit of "
                         f"{max_pixels}; scale it down first")


_PNG, _JP2 = b"\x89PNG\r\n\x1a\n", (b"\0\0\0\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")


def _check_frames(source, name: str, max_pixels: int) -> None:
    """The icon containers hold whole images whose own headers say their
    size, not the container's directory: Pillow decodes an ICO's largest
    frame while opening it, and an ICNS's PNG or JPEG 2000 at that image's
    size. Every such frame's header is read (nothing decoded) and checked
    before Pillow sees the file. Other formats' headers give the size decoded."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            _check_frames(f, name, max_pixels)
        return
    start = source.tell()
    magic = source.read(4)
    source.seek(start)
    if magic not in (b"\0\0\1\0", b"icns"):
        return
    raw = source.read()
    source.seek(start)
    try:
        if magic == b"icns":
            frames = [raw[at:at + n] for at, n in IcnsImagePlugin.IcnsFile(io.BytesIO(raw)).dct.values()]
        else:
            frames = [raw[e.offset:e.offset + e.size] for e in IcoImagePlugin.IcoFile(io.BytesIO(raw)).entry]
    except (OSError, ValueError, SyntaxError, IndexError) as exc:
        raise ValueError(f"image: {name} could not be read ({exc})") from None
    for frame in frames:
        try:
            if frame.startswith(_PNG) or frame.startswith(_JP2):
                with warnings.catch_warnings():  # Pillow's bomb warning: our own limit is checked below
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    size = Image.open(io.BytesIO(frame), formats=("PNG", "JPEG2000")).size  # the header only
            elif magic == b"icns":
                continue  # a raw ICNS element: its size is fixed by its type, as the directory says
            else:  # an ICO's BMP frame: its own header; the height counts the XOR and AND masks
                width, height = BmpImagePlugin.DibImageFile(io.BytesIO(frame)).size
                size = (width, height // 2)
        except Image.DecompressionBombError:
            raise ValueError(f"image: {name} holds an image of too many pixels, more than the limit of "
                             f"{max_pixels}; scale it down first") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"image: {name} has a frame that could not be read ({exc})") from None
        _check_size(size, name, max_pixels)


def image_files(folder) -> list[Path]:
    """The files of ``folder`` whose extension Pillow reads, sorted by name."""
    known = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in known)


def _flatten(im: Image.Image, channels: int) -> Image.Image:
    """``im`` as an 8-bit image of ``channels`` channels (1: "L", 3: "RGB")."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale: keep the high byte
        im = Image.fromarray((np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        # transformers' convert_to_rgb: transparent pixels are shown on white
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("L" if channels == 1 else "RGB")


class ImageProcessor:
    """``preprocessor_config.json`` as a callable: images -> ``pixel_values``.

    ``processor(images)`` returns ``{"pixel_values": tensor [B, C, H, W]}``
    (like transformers' processors); ``processor.to_pixels(images)`` the
    tensor alone. ``images``: one or a list of paths, bytes, PIL images or
    uint8 arrays (see :func:`open_image`)."""

    def __init__(self, config: dict, num_channels: int, image_size: int, *, max_pixels: int = MAX_PIXELS):
        self.config = config
        self.channels = num_channels
        self.max_pixels = max_pixels
        if num_channels not in (1, 3):
            raise ValueError(f"config.json: num_channels={num_channels}; images give 1 (gray) or 3 (RGB) channels")
        size = config.get("size") or {"height": image_size, "width": image_size}
        self.size = (int(size.get("height", image_size)), int(size.get("width", image_size))) if isinstance(size, dict) \
            else (int(size), int(size))
        self.do_resize = bool(config.get("do_resize", True))
        self.resample = int(config.get("resample", Image.Resampling.BILINEAR))
        self.rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        self.do_normalize = bool(config.get("do_normalize", True))
        self.mean = torch.tensor(config.get("image_mean", [0.5] * num_channels), dtype=torch.float32)
        self.std = torch.tensor(config.get("image_std", [0.5] * num_channels), dtype=torch.float32)
        if self.do_normalize and (len(self.mean) != num_channels or len(self.std) != num_channels):
            raise ValueError(f"preprocessor_config.json: image_mean/image_std need {num_channels} values")
        self.digits = config.get("prism_digits")
        if self.digits is not None and num_channels != 1:
            raise ValueError("preprocessor_config.json: prism_digits needs num_channels=1")

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        return {"pixel_values": self.to_pixels(images)}

    def to_pixels(self, images) -> torch.Tensor:
        """One image or a list of them -> pixel_values [B, C, H, W] (float32)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images: the list is empty")
        else:
            images = [images]
        pictures = [_flatten(open_image(im, max_pixels=self.max_pixels), self.channels) for im in images]
        if self.digits is not None:
            return self.digits_to_pixels(np.stack([self.digit_from_image(p) for p in pictures]))
        out = []
        for p in pictures:
            if self.do_resize and p.size != (self.size[1], self.size[0]):
                p = p.resize((self.size[1], self.size[0]), resample=self.resample)
            x = torch.from_numpy(np.asarray(p, dtype=np.float32).copy())
            out.append(x[None] if x.dim() == 2 else x.permute(2, 0, 1))
        if len({tuple(x.shape) for x in out}) > 1:
            raise ValueError("image: images of different sizes with do_resize=false in preprocessor_config.json")
        return self._rescale_normalize(torch.stack(out))

    def digit_from_image(self, picture: Image.Image) -> np.ndarray:
        """A grayscale image in the digits data set's format: float [8, 8], 0..16, ink bright."""
        grid, levels = int(self.digits.get("grid", 8)), int(self.digits.get("levels", 16))
        block = int(round(levels ** 0.5))
        g = np.asarray(picture, dtype=np.float32) / 255.0
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

    def _rescale_normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.rescale
        if self.do_normalize:
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return x.contiguous()

    def digits_to_pixels(self, digits) -> torch.Tensor:
        """Raw 8x8 digits ([8, 8] or [B, 8, 8], values 0..16) -> pixel_values [B, 1, H, W]
        (upsampled bilinearly, as the bundled model was trained)."""
        if self.digits is None:
            raise ValueError("digits: this checkpoint's processor has no prism_digits entry")
        x = torch.as_tensor(np.asarray(digits, dtype=np.float32))
        grid = int(self.digits.get("grid", 8))
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or tuple(x.shape[1:]) != (grid, grid):
            raise ValueError(f"digits: expected shape [{grid}, {grid}] or [batch, {grid}, {grid}], got {tuple(x.shape)}")
        x = x[:, None]
        if self.do_resize and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self._rescale_normalize(x)
