"""Opening images through Pillow (formats, EXIF orientation, modes, refusals,
the pixel limit) and the image processor (no model needed). Every file is
written by the test."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from PIL import Image

from prism_ext.inputs.images import ImageProcessor, check_image, image_files, open_image

DIGITS = {"do_resize": True, "size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 16,
          "do_normalize": True, "image_mean": [0.5], "image_std": [0.5], "prism_digits": {"grid": 8, "levels": 16}}


def _rgb(h=9, w=13, seed=4):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("WEBP", "webp"),
                                     ("TIFF", "tif"), ("GIF", "gif")])
def test_any_format_pillow_reads(tmp_path, fmt, ext):
    img = _rgb(16, 20)
    path = tmp_path / f"a.{ext}"
    Image.fromarray(img).save(path, format=fmt)
    got = np.asarray(open_image(path).convert("RGB"))
    assert got.shape == img.shape
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        np.testing.assert_array_equal(got, img)
    assert open_image(path.read_bytes()).size == (20, 16)  # bytes as well as paths


def test_exif_orientation_is_honoured(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :5] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "phone.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    upright = np.asarray(open_image(path).convert("L"))
    assert upright.shape == (30, 10)  # rotated: as a viewer shows it
    assert upright[:5].mean() > 200 and upright[-5:].mean() < 50  # the band is now on top


def test_modes_converted_as_the_processor_expects(tmp_path):
    rgb3 = ImageProcessor({"size": {"height": 8, "width": 8}, "do_normalize": False}, 3, 8)
    gray1 = ImageProcessor({"size": {"height": 8, "width": 8}, "do_normalize": False}, 1, 8)
    g = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    # grayscale -> three equal channels; RGB -> luma for a 1-channel checkpoint
    px = rgb3.to_pixels(Image.fromarray(g, "L"))
    assert px.shape == (1, 3, 8, 8) and torch.equal(px[0, 0], px[0, 2])
    torch.testing.assert_close(px[0, 0], torch.from_numpy(g).float() / 255)
    c = _rgb(8, 8).astype(np.int64)
    luma = (c[..., 0] * 299 + c[..., 1] * 587 + c[..., 2] * 114) / 1000
    assert (gray1.to_pixels(c.astype(np.uint8))[0, 0] * 255 - torch.from_numpy(luma).float()).abs().max() <= 1.0
    # transparency on white: a fully transparent black pixel reads as white, an opaque one keeps its colour
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, 3] = 255
    px = rgb3.to_pixels(Image.fromarray(rgba, "RGBA"))[0]
    assert px[:, :4].max() == 0 and px[:, 4:].min() == 1
    # a palette image gives its colours
    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4, "P")
    colours = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]
    pal.putpalette(colours + [0] * (768 - len(colours)))
    px = rgb3.to_pixels(pal)[0]
    torch.testing.assert_close(px[:, 0, 1] * 255, torch.tensor([0.0, 255, 0]))
    # 16-bit grayscale keeps its high byte
    deep = (g.astype(np.uint16) << 8) | 0x7F
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    torch.testing.assert_close(gray1.to_pixels(path)[0, 0] * 255, torch.from_numpy(g).float())


def test_processor_matches_transformers_vit_image_processor():
    import transformers  # the `test` extra
    try:
        hf = transformers.ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.5, 0.4, 0.3],
                                            image_std=[0.2, 0.3, 0.4])
    except ImportError as exc:  # an image processor needs its own optional packages in some versions
        pytest.skip(f"transformers' ViTImageProcessor is unavailable here: {exc}")
    ours = ImageProcessor(hf.to_dict(), 3, 24)
    for im in (Image.fromarray(_rgb(40, 50)), Image.fromarray(_rgb(10, 7)).convert("L")):
        want = hf(im.convert("RGB"), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours(im)["pixel_values"], want, rtol=0, atol=1e-5)


def test_refusals_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(ValueError, match=r"empty\.png is empty"):
        open_image(tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"text\.png is not an image"):
        open_image(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="empty"):
        open_image(b"")
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(64, 64)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.png is truncated or corrupt"):
        open_image(cut)


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    """PNGs whose headers claim 30000 x 30000 and 9000 x 9000 pixels (2.7 GB / 243 MB decoded) are refused
    from the header: Pillow's decoder (ImageFile.load) is never entered."""
    import zlib

    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def png(path, width, height):  # the header says width x height; a few rows of data follow
        rows = zlib.compressobj(9)
        data = b"".join(rows.compress(b"\0" * (width * 3 + 1)) for _ in range(64)) + rows.flush()
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                         + chunk(b"IDAT", data) + chunk(b"IEND", b""))
        return path

    huge = png(tmp_path / "bomb.png", 30000, 30000)  # beyond Pillow's own bomb check too
    large = png(tmp_path / "large.png", 9000, 9000)  # 81 MP: between our limit and Pillow's
    with pytest.raises(ValueError, match=r"bomb\.png has 900000000 pixels, more than the limit of 50000000"):
        open_image(huge)
    with pytest.raises(ValueError, match=r"large\.png is 9000x9000 = 81000000 pixels, more than the limit of 50000000"):
        open_image(large)
    for path in (huge, large):
        with pytest.raises(ValueError, match=path.name):
            check_image(path)
    assert decoded == []
    small = tmp_path / "small.png"
    Image.fromarray(_rgb(100, 100)).save(small)
    with pytest.raises(ValueError, match="10000 pixels, more than the limit of 9999"):
        open_image(small, max_pixels=9999)
    assert open_image(small, max_pixels=10000).size == (100, 100)
    assert decoded and set(decoded) == {(100, 100)}  # the spy sees a decode when there is one


def test_image_files_of_a_folder(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp"):
        Image.fromarray(_rgb()).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in image_files(tmp_path)] == ["a.JPG", "b.png", "c.webp"]


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
    np.testing.assert_array_equal(proc.digit_from_image(Image.fromarray(light_on_dark[..., 0])), counts)
    dark_on_light_rgb = np.repeat(255 - light_on_dark, 3, axis=2)
    border = np.full((40, 40, 3), 255, np.uint8)  # with a white margin the crop finds the same ink
    border[4:36, 4:36] = dark_on_light_rgb
    torch.testing.assert_close(proc.to_pixels(border), proc.digits_to_pixels(counts))
    assert not proc.digit_from_image(Image.new("L", (10, 10), 255)).any()


def test_processor_rejects_bad_shapes():
    proc = ImageProcessor(DIGITS, 1, 32)
    with pytest.raises(ValueError, match="digits"):
        proc.digits_to_pixels(np.zeros((7, 8)))
    with pytest.raises(ValueError, match="prism_digits"):
        ImageProcessor({**DIGITS, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, 3, 32)
    plain = ImageProcessor({"size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, 3, 16)
    px = plain.to_pixels([np.zeros((20, 30, 4), np.uint8)])
    assert px.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        plain.to_pixels(np.zeros((20, 30, 2), np.float32))
    with pytest.raises(ValueError, match="images"):
        plain.to_pixels([])
    with pytest.raises(ValueError, match="digits"):
        plain.digits_to_pixels(np.zeros((8, 8)))
