"""Normalise sample bytes to 3-channel RGB JPEG.

Valid 8-bit, 3-component Huffman JPEGs pass through byte-for-byte after a
pure-Python walk of their marker segments (no decode, so ingest runs at I/O
speed). Anything else Pillow can read is decoded and re-encoded, with the cause
reported; unusable bytes raise `RejectedImage` with a reason. Formats are
detected from magic bytes, never from file names.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image

# "unreadable": the source bytes could not be read at all (I/O error), raised by the reader.
REJECT_REASONS = ("empty", "not_an_image", "truncated", "corrupt", "bad_dimensions", "too_large", "unreadable")
VALIDATION_MODES = ("header", "full")
MAX_PIXELS = 100_000_000  # decompression-bomb guard on declared width * height

# Magic prefix -> format name; JPEG first because it is by far the most common.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)

# Sniffed format -> the only Pillow plugin allowed to open it (so arbitrary bytes
# can never reach plugins such as EPS that shell out).
_PILLOW_PLUGINS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "webp": "WEBP", "tiff": "TIFF"}

# JPEG markers (second byte after 0xFF).
_SOS, _EOI, _SOI = 0xDA, 0xD9, 0xD8
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_HUFFMAN_8BIT_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive
# TEM, RST0-7 carry no length; 0x00 is a stuffed byte, skipped like libjpeg does.
_NO_LENGTH_MARKERS = frozenset({0x00, 0x01, *range(0xD0, 0xD8)})
_EOI_BYTES = b"\xff\xd9"

_COMPONENT_CAUSES = {1: "grayscale", 4: "cmyk"}
# Every cause `Normalized.reencoded` can hold (metrics initialise a series for each).
REENCODE_CAUSES = (*_COMPONENT_CAUSES.values(), "jpeg_other", *(f for f in _PILLOW_PLUGINS if f != "jpeg"), "resized")
_WHITE = (255, 255, 255, 255)


class RejectedImage(Exception):
    """A sample that cannot be stored. .reason is one of REJECT_REASONS, .detail a short human text."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        # Both in args so the exception pickles across worker processes.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class Normalized:
    data: bytes  # the RGB JPEG bytes to store
    width: int  # of the stored image
    height: int
    reencoded: str | None  # None when `data` is the input passed through byte-for-byte, else the cause
    scale: float = 1.0  # stored size / source size (!= 1.0 only when resized)


class _JpegFrame(NamedTuple):
    marker: int
    precision: int
    height: int
    width: int
    components: int


def sniff(data: bytes) -> str | None:
    """Format from magic bytes: 'jpeg','png','gif','bmp','webp','tiff', or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def normalize(
    data: bytes, *, resize: int | None = None, validate: str = "header", quality: int = 95
) -> Normalized:
    """Raise RejectedImage for unusable input; ValueError for a bad `validate`/`resize` argument."""
    _check_arguments(resize, validate, quality)
    if not data:
        raise RejectedImage("empty", "no bytes")
    fmt = sniff(data)
    if fmt is None:
        raise RejectedImage("not_an_image", f"unknown magic bytes {data[:8].hex()}")
    if fmt != "jpeg":
        return _reencode(data, fmt, fmt, resize, quality)
    frame = _parse_jpeg(data)
    cause = _jpeg_cause(frame)
    if cause is None and _shrunk_size((frame.width, frame.height), resize) is None:
        if validate == "full":
            _decode(data, fmt)
        return Normalized(data, frame.width, frame.height, None)
    return _reencode(data, fmt, cause or "resized", resize, quality)


def _check_arguments(resize: int | None, validate: str, quality: int) -> None:
    if validate not in VALIDATION_MODES:
        raise ValueError(f"validate={validate!r}; expected one of {VALIDATION_MODES}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize <= 0):
        raise ValueError(f"resize={resize!r}; expected a positive int or None")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r}; expected 1..100")


def _check_dimensions(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise RejectedImage("bad_dimensions", f"{width}x{height}")
    if width * height > MAX_PIXELS:
        raise RejectedImage("too_large", f"{width}x{height} exceeds {MAX_PIXELS} pixels")


# --- JPEG header walk (pure Python; the pass-through hot path) -----------------


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header; RejectedImage when its headers are not a JPEG's."""
    if not data.startswith(b"\xff\xd8"):
        raise RejectedImage("not_an_image", "no JPEG start marker")
    frame = _parse_jpeg(data)
    return frame.height, frame.width


def _parse_jpeg(data: bytes) -> _JpegFrame:
    """Walk marker segments to the first scan; check the frame and that an EOI follows."""
    size = len(data)
    pos = 2  # past SOI
    frame = None
    while True:
        pos = data.find(b"\xff", pos)  # stray bytes between segments are skipped, as libjpeg does
        while 0 <= pos < size - 1 and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos < 0 or pos >= size - 1:
            raise RejectedImage("truncated", "data ends before the first scan")
        marker = data[pos + 1]
        if marker in _NO_LENGTH_MARKERS:
            pos += 2
            continue
        if marker in (_SOI, _EOI):
            raise RejectedImage("corrupt", f"marker 0x{marker:02X} before the first scan")
        end = _segment_end(data, pos, marker)
        if marker in _SOF_MARKERS:
            if frame is not None:
                raise RejectedImage("corrupt", "two frame headers")
            frame = _read_frame(data, pos, end, marker)
        elif marker == _SOS:
            if frame is None:
                raise RejectedImage("corrupt", "scan before frame header")
            # Entropy-coded data never holds FF D9 (0xFF is stuffed or an RST), so any
            # FF D9 after the scan header is an EOI; trailing padding after it is fine.
            if data.rfind(_EOI_BYTES, end) < 0:
                raise RejectedImage("truncated", "no EOI marker after the scan")
            return frame
        pos = end


def _segment_end(data: bytes, pos: int, marker: int) -> int:
    if pos + 4 > len(data):
        raise RejectedImage("truncated", f"segment 0x{marker:02X} cut in its length field")
    length = (data[pos + 2] << 8) | data[pos + 3]
    if length < 2:
        raise RejectedImage("corrupt", f"segment 0x{marker:02X} has length {length}")
    end = pos + 2 + length
    if end > len(data):
        raise RejectedImage("truncated", f"segment 0x{marker:02X} runs past the end of data")
    return end


def _read_frame(data: bytes, pos: int, end: int, marker: int) -> _JpegFrame:
    body = pos + 4
    if end - body < 6 or end - body < 6 + 3 * data[body + 5]:
        raise RejectedImage("corrupt", f"frame header 0x{marker:02X} too short")
    frame = _JpegFrame(
        marker=marker,
        precision=data[body],
        height=(data[body + 1] << 8) | data[body + 2],
        width=(data[body + 3] << 8) | data[body + 4],
        components=data[body + 5],
    )
    # Height 0 means "defined later by DNL": rare, so it goes to Pillow as jpeg_other.
    _check_dimensions(frame.width, frame.height or 1)
    return frame


def _jpeg_cause(frame: _JpegFrame) -> str | None:
    """Re-encode cause for a JPEG frame, or None when it may pass through."""
    if frame.components in _COMPONENT_CAUSES:
        return _COMPONENT_CAUSES[frame.components]
    standard = frame.marker in _HUFFMAN_8BIT_SOF and frame.precision == 8 and frame.height > 0
    return None if standard and frame.components == 3 else "jpeg_other"


# --- Pillow decode / re-encode (the slow path) ------------------------------------


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Map Pillow failures onto RejectedImage."""
    with warnings.catch_warnings():
        # MAX_PIXELS is the bomb guard, and the outcome must not depend on the caller's
        # warning filters (e.g. -W error turning "Corrupt EXIF data" into a failure).
        warnings.simplefilter("ignore")
        try:
            yield
        except RejectedImage:
            raise
        except Image.DecompressionBombError as exc:
            raise RejectedImage("too_large", str(exc)) from exc
        except Exception as exc:  # Pillow plugins raise many types on malformed input
            raise _decode_failure(exc) from exc


def _decode_failure(exc: Exception) -> RejectedImage:
    if isinstance(exc, Image.UnidentifiedImageError):
        # Its message embeds the BytesIO repr (an address): keep details reproducible.
        return RejectedImage("corrupt", "Pillow cannot parse the header")
    text = str(exc)
    truncated = isinstance(exc, EOFError) or "truncated" in text.lower()
    return RejectedImage("truncated" if truncated else "corrupt", f"{type(exc).__name__}: {text}"[:200])


def _open(data: bytes, fmt: str) -> Image.Image:
    """Open lazily and check the declared size before any pixel is decoded."""
    image = Image.open(io.BytesIO(data), formats=[_PILLOW_PLUGINS[fmt]])
    _check_dimensions(*image.size)
    return image


def _decode(data: bytes, fmt: str) -> None:
    with _pillow_errors():
        _open(data, fmt).load()


def _reencode(data: bytes, fmt: str, cause: str, resize: int | None, quality: int) -> Normalized:
    with _pillow_errors():
        image = _open(data, fmt)
        source_size = image.size
        target = _shrunk_size(source_size, resize)
        if target is not None:
            # JPEG DCT scaling (a no-op for other formats); 2x headroom keeps quality.
            image.draft(None, (2 * target[0], 2 * target[1]))
        image.load()  # first frame only for multi-frame GIF/TIFF
        rgb = _to_rgb(image)
        if target is not None:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    scale = 1.0 if target is None else min(target) / min(source_size)
    return Normalized(_encode(rgb, quality), rgb.width, rgb.height, cause, scale)


def _shrunk_size(size: tuple[int, int], resize: int | None) -> tuple[int, int] | None:
    """Size with the shorter side == resize, or None when no downscale is needed."""
    width, height = size
    short = min(width, height)
    if resize is None or short <= resize:
        return None
    factor = resize / short
    if width <= height:
        return resize, max(1, round(height * factor))
    return max(1, round(width * factor)), resize


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.has_transparency_data:
        # Composite onto white: dropping alpha would expose arbitrary (often black) colour.
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit samples: convert() would clip them to 255, so scale to 8 bits first.
        image = image.point(lambda value: value * (1 / 256))
    return image.convert("RGB")


def _encode(image: Image.Image, quality: int) -> bytes:
    # Fixed settings and no EXIF/ICC so identical input gives identical bytes.
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=False)
    return buffer.getvalue()
