"""Input image files an attacker or an unlucky user sends, built byte for byte (faults.md #33)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **options)
    return buf.getvalue()


def broken_chunk_png() -> bytes:
    """An 8x8 PNG whose image data is split by a chunk with an invalid type: Pillow opens it and
    raises ``SyntaxError`` ("broken PNG file") while decoding."""
    data = png(Image.new("RGB", (8, 8), (1, 2, 3)))
    idat = data[41:61]  # the one IDAT chunk's 20 bytes of zlib data
    bad = struct.pack(">I", 10) + b"\x00\x01\x02\x03" + idat[10:] + b"\0\0\0\0"
    return data[:33] + _chunk(b"IDAT", idat[:10]) + bad + _chunk(b"IEND", b"")


def dds() -> bytes:
    """A DirectDraw Surface header without a pixel format (Pillow raises ``NotImplementedError``)."""
    return b"DDS " + struct.pack("<I", 124) + bytes(120)


def ccitt_tiff(width: int = 4096, height: int = 4096) -> bytes:
    """A 1-bit CCITT G4 TIFF: a few hundred bytes for ``width`` x ``height`` pixels."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="TIFF", compression="group4")
    return buf.getvalue()


def bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    return buf.getvalue()


def one_bit_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG: ~4 KB for 33 M pixels, decoded into hundreds of MB as RGB."""
    return png(Image.new("1", (width, height)), optimize=True)


def grey16_png(value: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit greyscale PNG (Pillow mode ``I;16``) filled with ``value`` in 0..65535."""
    return png(Image.fromarray(np.full(size[::-1], value, np.uint16)))


def exif_rotated_jpeg(width: int = 160, height: int = 96, orientation: int = 6) -> bytes:
    """A JPEG stored ``width`` x ``height`` with EXIF ``Orientation`` (6: show rotated 90 degrees
    clockwise, as phones write portrait photos); the pixels are a gradient, so rotation shows."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 40.0),
        ],
        axis=2,
    ).astype(np.uint8)
    stored = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()
