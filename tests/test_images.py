"""Decoding odd images: every case becomes RGB or a clear reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import encode, photo
from labelmill.io.images import ImageDecodeError, decode_caption, decode_image
from labelmill.teachers.base import ImageRequest

BIG = ImageRequest(short_side=10_000, max_long_side=10_000)
LIMIT = 10_000_000


def test_rgb_jpeg_keeps_size_and_content():
    arr = photo(80, 60)
    out = decode_image(encode(arr, "PNG"), BIG, LIMIT)
    assert out.orig_hw == (60, 80)
    assert out.pixels.shape == (60, 80, 3)
    assert np.array_equal(out.pixels, arr)  # lossless PNG round trip


def test_downscale_respects_request_and_reports_original_size():
    arr = photo(400, 300)
    out = decode_image(encode(arr, "JPEG", quality=95), ImageRequest(64, 64), LIMIT)
    assert out.orig_hw == (300, 400)
    assert max(out.pixels.shape[:2]) == 64
    assert out.pixels.shape[:2] == (48, 64)
    # the JPEG draft path must not distort colours: compare with a plain resize
    ref = np.asarray(Image.fromarray(arr).resize((64, 48), Image.BILINEAR)).astype(int)
    assert np.abs(out.pixels.astype(int) - ref).mean() < 12


def test_greyscale_becomes_three_equal_channels():
    grey = photo(40, 30)[..., 0]
    out = decode_image(encode(grey, "PNG"), BIG, LIMIT)
    assert out.pixels.shape == (30, 40, 3)
    assert np.array_equal(out.pixels[..., 0], grey) and np.array_equal(out.pixels[..., 2], grey)
    assert out.warnings == ["greyscale converted to RGB"]  # as the README's bad-input table promises


def test_palette_without_transparency_is_converted_with_a_warning():
    img = Image.fromarray(photo(20, 20)).convert("P", palette=Image.ADAPTIVE, colors=8)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = decode_image(buf.getvalue(), BIG, LIMIT)
    assert out.pixels.shape == (20, 20, 3) and out.warnings == ["palette converted to RGB"]


def test_cmyk_jpeg_is_converted_with_a_warning():
    img = Image.fromarray(photo(40, 30)).convert("CMYK")
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    out = decode_image(buf.getvalue(), BIG, LIMIT)
    assert out.pixels.shape == (30, 40, 3)
    assert any("CMYK" in w for w in out.warnings)


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), BIG, LIMIT)
    row = out.pixels[0, :, 0].astype(int)
    # a clipping conversion would saturate almost everything at 255
    assert row[0] == 0 and row[-1] == 255
    assert 100 < out.pixels[..., 0].mean() < 155
    assert any("8 bits" in w for w in out.warnings)


def test_alpha_is_composited_over_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 5:, 3] = 255
    out = decode_image(encode(rgba, "PNG"), BIG, LIMIT)
    assert tuple(out.pixels[0, 0]) == (255, 255, 255)
    assert tuple(out.pixels[0, 9]) == (255, 0, 0)


def test_palette_with_transparency():
    img = Image.fromarray(photo(20, 20)).convert("P", palette=Image.ADAPTIVE, colors=8)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    out = decode_image(buf.getvalue(), BIG, LIMIT)
    assert out.pixels.shape == (20, 20, 3)


def test_exif_rotation_is_applied_and_reported_in_original_size():
    arr = photo(60, 20)  # wide
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), BIG, LIMIT)
    assert out.orig_hw == (60, 20)  # displayed tall
    assert out.pixels.shape == (60, 20, 3)
    # the downscaled path agrees on orientation
    small = decode_image(buf.getvalue(), ImageRequest(10, 30), LIMIT)
    assert small.orig_hw == (60, 20) and small.pixels.shape[0] > small.pixels.shape[1]


def test_decompression_bomb_guard_checks_header_before_decoding():
    data = encode(np.zeros((200, 300, 3), np.uint8), "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, BIG, max_pixels=200 * 300 - 1)
    assert decode_image(data, BIG, max_pixels=200 * 300).orig_hw == (200, 300)


def test_labelmills_pixel_limit_is_the_one_that_speaks(monkeypatch):
    """PIL's own bomb limit must neither fire first nor refuse images below a raised labelmill limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses > 2000 px outright
    data = encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(ImageDecodeError, match=r"10000 pixels > limit 5000 \(decompression-bomb guard, input.max_image_pixels\)"):
        decode_image(data, BIG, max_pixels=5000)
    assert decode_image(data, BIG, max_pixels=LIMIT).orig_hw == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's setting is left as it was


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty image file"),
        (b"this is not an image at all", "not a recognised format"),
        (encode(photo(64, 64), "JPEG")[:300], "undecodable image"),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, BIG, LIMIT)


def test_captions():
    assert decode_caption(b" a dog \n") == ("a dog", [])
    text, warns = decode_caption(b"caf\xe9 au lait")
    assert text == "caf\ufffd au lait" and "not valid UTF-8" in warns[0]
    assert decode_caption(None) == (None, ["missing caption"])
