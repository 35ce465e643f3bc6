"""Small hostile images, made here rather than shipped: each one a class of input that once made the
service answer 500, spend unbounded time or memory, or kill a scoring run (issue 12's attack run);
and decoder processes stalled on purpose, the decode that never ends."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import zlib
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

GREY = np.arange(64, dtype=np.uint8).reshape(8, 8)


def encoded(fmt: str, array: np.ndarray = GREY, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_with_chunk(kind: bytes, payload: bytes, array: np.ndarray = GREY) -> bytes:
    """A valid PNG with one more chunk, CRC and all, before its pixel data."""
    data = encoded("PNG", array)
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def jpeg_with_app1(payload: bytes) -> bytes:
    """A valid JPEG with an APP1 (EXIF) segment holding ``payload``."""
    data = encoded("JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


def progressive_jpeg_with_scans(extra: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``extra`` times: libjpeg only warns, and decodes
    every one of them (how a 731 KB file took 29 s)."""
    data = encoded("JPEG", np.tile(GREY, (8, 8)), progressive=True)
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # SOS header and entropy-coded data, up to EOI
    return data[:-2] + scan * extra + data[-2:]


def two_page_tiff_without_dimensions() -> bytes:
    """Two TIFF pages, the second one's width and height tags renamed to a private tag."""
    buffer = io.BytesIO()
    first, second = Image.fromarray(GREY), Image.fromarray(GREY[::-1].copy())
    first.save(buffer, format="TIFF", save_all=True, append_images=[second])
    data = bytearray(buffer.getvalue())
    second_ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[second_ifd : second_ifd + 2])[0]
    second_ifd = struct.unpack("<I", data[second_ifd + 2 + 12 * count : second_ifd + 6 + 12 * count])[0]
    entries = struct.unpack("<H", data[second_ifd : second_ifd + 2])[0]
    for i in range(entries):
        at = second_ifd + 2 + 12 * i
        if struct.unpack("<H", data[at : at + 2])[0] in (256, 257):  # ImageWidth, ImageLength
            data[at : at + 2] = struct.pack("<H", 65000)
    return bytes(data)


def tall_png(height: int) -> bytes:
    """1 x ``height`` pixels of one grey: a few KB that decode to rows of per-row overhead."""
    return encoded("PNG", np.zeros((height, 1), np.uint8))


def crafted() -> dict[str, bytes]:
    """Each class of small crafted file that raised past the image checks (a 500), by name."""
    return {
        "png-exif-not-tiff": png_with_chunk(b"eXIf", b"not tiff data at all"),
        "png-exif-bad-hex": png_with_chunk(b"tEXt", b"Raw profile type exif\x00\nexif\n      10\nzz\n"),
        "webp-exif-not-tiff": encoded("WEBP", exif=b"Exif\x00\x00garbage!"),
        "tiff-second-page-without-size": two_page_tiff_without_dimensions(),
    }


@contextlib.contextmanager
def stalled(pids: Iterable[int]) -> Iterator[None]:
    """Decoder processes stopped (SIGSTOP) while inside: every decode sent to them never ends, as a
    decoder stuck in C code on a crafted file, on any machine however fast. The ones still alive
    are let go (SIGCONT) on the way out; a SIGKILL reaches a stopped process all the same."""
    pids = list(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
