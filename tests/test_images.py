"""Tests for ingest.images: pass-through, conversion, rejection, resize."""

from __future__ import annotations

import io
import pickle
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ingest.images import (
    MAX_PIXELS,
    REJECT_REASONS,
    Normalized,
    RejectedImage,
    normalize,
    sniff,
)


def _noise(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _jpeg(width: int = 32, height: int = 32, **params) -> bytes:
    return _encode(_noise(width, height), "JPEG", quality=90, **params)


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _scan_start(data: bytes) -> int:
    sos = data.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def _rejected(data: bytes, **kwargs) -> RejectedImage:
    with pytest.raises(RejectedImage) as info:
        normalize(data, **kwargs)
    assert info.value.reason in REJECT_REASONS
    return info.value


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- sniffing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "jpeg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp"), ("TIFF", "tiff")],
)
def test_sniff_by_magic(fmt: str, expected: str) -> None:
    assert sniff(_encode(_noise(8, 8), fmt)) == expected


def test_sniff_unknown() -> None:
    assert sniff(b"hello") is None
    assert sniff(b"") is None


# --- pass-through ---------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
def test_rgb_jpeg_passes_through(progressive: bool) -> None:
    data = _jpeg(40, 24, progressive=progressive)
    result = normalize(data)
    assert result == Normalized(data, 40, 24, None, 1.0)
    assert result.data is data


def test_trailing_padding_after_eoi_passes_through() -> None:
    data = _jpeg() + b"\x00" * 512
    assert normalize(data).data == data


def test_full_validation_passes_good_jpeg_unchanged() -> None:
    data = _jpeg(progressive=True)
    assert normalize(data, validate="full") == Normalized(data, 32, 32, None)


# --- conversion ------------------------------------------------------------------


def _assert_rgb_jpeg(result: Normalized, size: tuple[int, int]) -> Image.Image:
    image = _decoded(result.data)
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert len(image.getbands()) == 3
    assert image.size == size == (result.width, result.height)
    return image


def test_grayscale_jpeg_converted() -> None:
    data = _encode(_noise().convert("L"), "JPEG")
    result = normalize(data)
    assert result.reencoded == "grayscale"
    _assert_rgb_jpeg(result, (32, 32))


def test_cmyk_jpeg_converted_with_right_colours() -> None:
    data = _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    result = normalize(data)
    assert result.reencoded == "cmyk"
    red = np.asarray(_assert_rgb_jpeg(result, (32, 32))).astype(int)
    assert np.abs(red - [255, 0, 0]).max() <= 8


def test_cmyk_reencode_is_deterministic() -> None:
    data = _encode(_noise().convert("CMYK"), "JPEG")
    assert normalize(data).data == normalize(data).data


def test_png_named_jpeg_converted() -> None:
    result = normalize(_encode(_noise(30, 20), "PNG"))
    assert result.reencoded == "png"
    _assert_rgb_jpeg(result, (30, 20))


def test_transparent_png_composited_on_white() -> None:
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half: fully transparent black
    result = normalize(_encode(rgba, "PNG"))
    pixels = np.asarray(_assert_rgb_jpeg(result, (32, 32))).astype(int)
    assert np.abs(pixels[:, :12] - 255).max() <= 8
    assert np.abs(pixels[:, 20:] - [0, 0, 255]).max() <= 8


def test_palette_gif_converted() -> None:
    result = normalize(_encode(_noise().convert("P"), "GIF"))
    assert result.reencoded == "gif"
    _assert_rgb_jpeg(result, (32, 32))


@pytest.mark.parametrize(("fmt", "cause"), [("BMP", "bmp"), ("WEBP", "webp"), ("TIFF", "tiff")])
def test_other_formats_converted(fmt: str, cause: str) -> None:
    result = normalize(_encode(_noise(), fmt))
    assert result.reencoded == cause
    _assert_rgb_jpeg(result, (32, 32))


def test_sixteen_bit_png_scaled_not_clipped() -> None:
    gradient = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    result = normalize(_encode(Image.fromarray(gradient), "PNG"))
    pixels = np.asarray(_assert_rgb_jpeg(result, (32, 32))).astype(int)
    assert pixels[0, 0].max() <= 8  # clipping would make almost everything white
    assert pixels[16, 16].min() >= 100


def test_non_standard_jpeg_that_pillow_cannot_decode_rejected() -> None:
    data = bytearray(_jpeg())
    data[data.find(b"\xff\xc0") + 4] = 12  # precision 12: jpeg_other, Pillow cannot decode
    assert _rejected(bytes(data)).reason == "corrupt"


# --- rejection -------------------------------------------------------------------


def test_empty_rejected() -> None:
    assert _rejected(b"").reason == "empty"


def test_text_rejected() -> None:
    assert _rejected(b"hello").reason == "not_an_image"


def test_truncated_jpeg_rejected() -> None:
    data = _jpeg()
    scan = _scan_start(data)
    for cut in (3, 4, 20, scan - 5, scan, scan + 50, len(data) - 10, len(data) - 1):
        assert _rejected(data[:cut]).reason == "truncated", cut


def test_truncated_png_rejected() -> None:
    data = _encode(_noise(), "PNG")
    assert _rejected(data[: len(data) // 2]).reason == "truncated"


@pytest.mark.parametrize("pillow_limit", [Image.MAX_IMAGE_PIXELS, None], ids=["pillow-limit", "no-pillow-limit"])
def test_png_bomb_rejected_without_decoding(monkeypatch, pillow_limit) -> None:
    # Decoding 100_000 x 100_000 pixels means allocating 40 GB: the declared size must reject it before
    # any pixel is decoded, so a decode (every one goes through ImageFile.load) fails the test whatever
    # the machine's speed. With Pillow's own bomb limit lifted, MAX_PIXELS alone must stop it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    decoded = []

    def refuse_to_decode(image: ImageFile.ImageFile) -> None:
        decoded.append(image.size)
        raise RuntimeError("the bomb reached the decoder")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    reason = _rejected(data).reason
    assert decoded == [] and reason == "too_large"


def test_pillow_bomb_warning_does_not_escape() -> None:
    # 95 Mpx: above Pillow's default warning limit, below MAX_PIXELS, so Pillow gets to open it.
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 9_500 <= MAX_PIXELS
    ihdr = struct.pack(">IIBBBBB", 10_000, 9_500, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rejected(data).reason == "truncated"


def test_jpeg_bomb_rejected() -> None:
    data = bytearray(_jpeg())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    assert 65000 * 65000 > MAX_PIXELS
    assert _rejected(bytes(data)).reason == "too_large"


def test_zero_width_jpeg_rejected() -> None:
    data = bytearray(_jpeg())
    sof = data.find(b"\xff\xc0")
    data[sof + 7 : sof + 9] = b"\x00\x00"
    assert _rejected(bytes(data)).reason == "bad_dimensions"


def test_full_validation_rejects_corrupt_scan_data() -> None:
    # libjpeg treats bad Huffman codes in a *baseline* scan as warnings, so Pillow
    # decodes random baseline entropy data without error; in a progressive scan the
    # same garbage makes Pillow fail, so that is what is corrupted here.
    data = bytearray(_jpeg(progressive=True))
    start = _scan_start(data)
    rng = random.Random(0)
    data[start + 5 : start + 200] = bytes(rng.randrange(0, 0xFF) for _ in range(195))  # no 0xFF
    assert normalize(bytes(data)).reencoded is None  # structure is intact
    assert _rejected(bytes(data), validate="full").reason == "corrupt"


def test_full_validation_rejects_undefined_huffman_table() -> None:
    data = bytearray(_jpeg())
    sos = data.find(b"\xff\xda")
    data[sos + 6] = 0x33  # first component uses tables 3/3, which are never defined
    assert normalize(bytes(data)).reencoded is None
    assert _rejected(bytes(data), validate="full").reason == "corrupt"


def test_rejected_image_pickles() -> None:
    error = pickle.loads(pickle.dumps(RejectedImage("corrupt", "bad")))
    assert (error.reason, error.detail, str(error)) == ("corrupt", "bad", "corrupt: bad")


# --- resize ------------------------------------------------------------------------


def test_resize_downscales_shorter_side() -> None:
    result = normalize(_jpeg(100, 50), resize=20)
    assert (result.reencoded, result.scale) == ("resized", 0.4)
    _assert_rgb_jpeg(result, (40, 20))


def test_resize_does_not_upscale() -> None:
    data = _jpeg(10, 10)
    assert normalize(data, resize=20) == Normalized(data, 10, 10, None)


def test_resize_reports_conversion_cause() -> None:
    result = normalize(_encode(_noise(100, 50).convert("L"), "JPEG"), resize=20)
    assert (result.reencoded, result.scale) == ("grayscale", 0.4)
    _assert_rgb_jpeg(result, (40, 20))


# --- arguments ---------------------------------------------------------------------


def test_bad_validate_argument() -> None:
    with pytest.raises(ValueError, match="bogus.*header.*full"):
        normalize(_jpeg(), validate="bogus")


@pytest.mark.parametrize("resize", [0, -5, 2.5, True])
def test_bad_resize_argument(resize) -> None:
    with pytest.raises(ValueError, match="resize"):
        normalize(_jpeg(), resize=resize)
