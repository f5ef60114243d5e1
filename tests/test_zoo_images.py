"""The PNG reader/writer and the image processor (no model needed)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from prism_ext.images import ImageProcessor, read_image, read_png, write_png

DIGITS = {"do_resize": True, "size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 16,
          "do_normalize": True, "image_mean": [0.5], "image_std": [0.5], "prism_digits": {"grid": 8, "levels": 16}}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encode(rows: np.ndarray, width: int, ctype: int, depth: int, filt: int, bpp: int, palette=None) -> bytes:
    """A PNG whose every row uses filter ``filt``, encoded independently of the reader."""
    out, prev = b"", np.zeros(rows.shape[1], np.int64)
    for line in rows.astype(np.int64):
        f = np.zeros_like(line)
        for i in range(len(line)):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if filt == 0:
                pred = 0
            elif filt == 1:
                pred = a
            elif filt == 2:
                pred = b
            elif filt == 3:
                pred = (a + b) >> 1
            else:
                p = a + b - c
                pred = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
            f[i] = (line[i] - pred) & 0xFF
        out += bytes([filt]) + bytes(f.astype(np.uint8))
        prev = line
    body = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, rows.shape[0], depth, ctype, 0, 0, 0))
    if palette is not None:
        body += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IDAT", zlib.compress(out)) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("ctype,channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
@pytest.mark.parametrize("filt", range(5))
def test_png_8bit_every_filter(ctype, channels, filt):
    img = np.random.default_rng(ctype * 5 + filt).integers(0, 256, (6, 7, channels), dtype=np.uint8)
    data = _encode(img.reshape(6, -1), 7, ctype, 8, filt, channels)
    np.testing.assert_array_equal(read_png(data), img)


def test_png_16bit_keeps_high_byte():
    img = np.random.default_rng(1).integers(0, 65536, (5, 4, 3)).astype(">u2")
    data = _encode(img.view(np.uint8).reshape(5, -1), 4, 2, 16, 4, 6)
    np.testing.assert_array_equal(read_png(data), (img >> 8).astype(np.uint8))


def test_png_low_bit_depths():
    bits = np.random.default_rng(2).integers(0, 2, (3, 11)).astype(np.uint8)
    rows = np.packbits(bits, axis=1)
    np.testing.assert_array_equal(read_png(_encode(rows, 11, 0, 1, 0, 1))[..., 0], bits * 255)
    palette = np.array([[10, 20, 30], [200, 100, 0], [1, 2, 3], [9, 9, 9]])
    idx = np.random.default_rng(3).integers(0, 4, (4, 5)).astype(np.uint8)
    packed = np.packbits(np.unpackbits(idx[..., None], axis=2)[..., 6:].reshape(4, -1), axis=1)
    np.testing.assert_array_equal(read_png(_encode(packed, 5, 3, 2, 1, 1, palette)), palette[idx])


def test_png_roundtrip_and_errors(tmp_path):
    img = np.random.default_rng(4).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), img)
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(b"GIF89a")
    interlaced = _encode(img.reshape(9, -1), 13, 2, 8, 0, 3).replace(
        struct.pack(">IIBBBBB", 13, 9, 8, 2, 0, 0, 0), struct.pack(">IIBBBBB", 13, 9, 8, 2, 0, 0, 1))
    with pytest.raises(ValueError, match="IHDR|interlaced"):
        read_png(interlaced)
    with pytest.raises(FileNotFoundError, match="image"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Pillow"):
            read_image(tmp_path / "x.jpg")
    else:
        with pytest.raises(ValueError, match="could not be read"):
            read_image(tmp_path / "x.jpg")


def test_digits_processor_raw_and_file_paths_agree():
    proc = ImageProcessor(DIGITS, 1, 32)
    digit = np.random.default_rng(5).integers(0, 17, (8, 8)).astype(np.float32)
    px = proc.digits_to_pixels(digit)
    assert px.shape == (1, 1, 32, 32)
    # the raw path: bilinear upsampling, then (v / 16 - 0.5) / 0.5
    up = torch.nn.functional.interpolate(torch.from_numpy(digit)[None, None], size=(32, 32), mode="bilinear",
                                         align_corners=False)
    torch.testing.assert_close(px, (up / 16 - 0.5) / 0.5)
    # a file whose ink fills the frame: a 32x32 bitmap, "on" pixels counted in 4x4 blocks
    bitmap = np.random.default_rng(6).random((32, 32)) > 0.6
    bitmap[0, :] = bitmap[-1, :] = bitmap[:, 0] = bitmap[:, -1] = False  # a dark border: ink is bright
    bitmap[0, 9] = bitmap[-1, 20] = bitmap[13, 0] = bitmap[7, -1] = True  # ink touches every edge
    counts = bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.float32)
    light_on_dark = (bitmap * 255).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(proc.digit_from_image(light_on_dark), counts)
    dark_on_light_rgb = np.repeat(255 - light_on_dark, 3, axis=2)
    border = np.full((40, 40, 3), 255, np.uint8)  # with a white margin the crop finds the same ink
    border[4:36, 4:36] = dark_on_light_rgb
    np.testing.assert_array_equal(proc.digit_from_image(border), counts)
    torch.testing.assert_close(proc.images_to_pixels([border]), proc.digits_to_pixels(counts))
    assert not proc.digit_from_image(np.full((10, 10, 1), 255, np.uint8)).any()


def test_processor_rejects_bad_shapes():
    proc = ImageProcessor(DIGITS, 1, 32)
    with pytest.raises(ValueError, match="digits"):
        proc.digits_to_pixels(np.zeros((7, 8)))
    with pytest.raises(ValueError, match="prism_digits"):
        ImageProcessor({**DIGITS, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, 3, 32)
    plain = ImageProcessor({"size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, 3, 16)
    px = plain.images_to_pixels([np.zeros((20, 30, 4), np.uint8)])
    assert px.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="digits"):
        plain.digits_to_pixels(np.zeros((8, 8)))
