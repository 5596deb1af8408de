"""Hostile and broken image files for the loader fuzz tests (tests/test_data_fuzz.py) and the
longer fuzz run (tests/fuzz_data.py). Everything is made here, in memory, from PIL and a few
hand-assembled headers: no file comes from outside.

``hostile_files()`` maps a file name to (bytes, expected): expected is "load" (the image
decodes and is converted to RGB as guard_fast.data.folder documents) or "bad" (the loader
must refuse it, or skip and count it, naming the file).
"""
from __future__ import annotations

import functools
import io
import random
import struct
import zlib

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(w: int, h: int, bit_depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with one tiny IDAT: a decompression bomb's
    header (PIL reads the size from IHDR before any pixel)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real baseline JPEG with its SOF0 frame header patched to claim w x h pixels."""
    buf = encode(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG")
    i = buf.index(b"\xff\xc0")  # SOF0: FF C0, length (2), precision (1), height (2), width (2)
    return buf[:i + 5] + struct.pack(">HH", h, w) + buf[i + 9:]


def png_text_bomb() -> bytes:
    """A small valid PNG carrying a zTXt chunk that inflates to 16 MiB (PIL caps text chunks
    at PngImagePlugin.MAX_TEXT_CHUNK, 1 MiB)."""
    base = encode(Image.new("RGB", (8, 8)), "PNG")
    ztxt = b"Comment\x00\x00" + zlib.compress(b"A" * (16 << 20), 9)
    end = base.rindex(b"IEND") - 4
    return base[:end] + _png_chunk(b"zTXt", ztxt) + base[end:]


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _pattern(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1),
                     (x + y) * 127 // max(1, w + h - 2)], -1).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def convertible_images(side: int = 24) -> dict[str, tuple[bytes, Image.Image]]:
    """name -> (encoded bytes, the PIL image it holds) for every mode the loader converts."""
    rgb = Image.fromarray(_pattern(side, side))
    grey16 = Image.fromarray((np.arange(side * side, dtype=np.uint16).reshape(side, side)
                              * (65535 // (side * side))))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((side, side), 128, np.uint8)))
    la = rgb.convert("L")
    la.putalpha(Image.fromarray(np.full((side, side), 64, np.uint8)))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    ims = {
        "rgb.png": (rgb, "PNG"), "rgb.jpg": (rgb, "JPEG"), "cmyk.jpg": (rgb.convert("CMYK"), "JPEG"),
        "grey.png": (rgb.convert("L"), "PNG"), "grey16.png": (grey16, "PNG"),
        "bilevel.png": (rgb.convert("1"), "PNG"), "palette.png": (pal, "PNG"),
        "palette_transparent.png": (pal_t, "PNG"), "rgba.png": (rgba, "PNG"), "la.png": (la, "PNG"),
        "rgb.bmp": (rgb, "BMP"), "rgb.webp": (rgb, "WEBP"), "cmyk.tif": (rgb.convert("CMYK"), "TIFF"),
        "upper.JPG": (rgb, "JPEG"), "png_named.jpg": (rgb, "PNG"),
    }
    out = {}
    for name, (im, fmt) in ims.items():
        data = encode(im, fmt, **({"transparency": 0} if name == "palette_transparent.png" else {}))
        out[name] = (data, Image.open(io.BytesIO(data)))
    return out


@functools.lru_cache(maxsize=None)
def bad_files(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, why it is bad) for files every loader must refuse or skip."""
    rng = random.Random(seed)
    jpg = encode(Image.fromarray(_pattern(64, 64)), "JPEG", quality=90)
    png = encode(Image.fromarray(_pattern(64, 64)), "PNG")
    return {
        "empty.jpg": (b"", "zero bytes"),
        "empty.png": (b"", "zero bytes"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated JPEG"),
        "truncated.png": (png[: len(png) // 2], "truncated PNG"),
        "header_only.jpg": (jpg[:20], "JPEG header only"),
        "garbage.jpg": (bytes(rng.randrange(256) for _ in range(4096)), "random bytes"),
        "garbage_png_magic.png": (b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(512)),
                                  "PNG signature then random bytes"),
        "text.png": (b"this is not an image\n" * 10, "a text file"),
        "bomb_60k.png": (png_header_only(60000, 60000), "PNG header claims 60000 x 60000"),
        "bomb_60k.jpg": (jpeg_claiming(60000, 60000), "JPEG header claims 60000 x 60000"),
        "bomb_10k.jpg": (jpeg_claiming(10000, 10000), "JPEG header claims 10000 x 10000 "
                         "(between PIL's warning and error limits)"),
        "text_bomb.png": (png_text_bomb(), "zTXt chunk inflating to 16 MiB"),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "1 x 1 pixels"),
        "one_row.png": (encode(Image.new("RGB", (300, 1)), "PNG"), "300 x 1 pixels"),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of a valid file: truncation, flipped bytes, an inserted or
    deleted run, or a patched header field."""
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and len(b) > 1:
        return bytes(b[: rng.randrange(len(b))])
    if op == 1:
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + b[i:])
    if op == 3 and len(b) > 8:
        i = rng.randrange(len(b) - 1)
        return bytes(b[:i] + b[i + rng.randint(1, min(64, len(b) - i)):])
    # header field: overwrite 4 bytes among the first 40 with large values
    i = rng.randrange(min(36, max(1, len(b) - 4)))
    b[i:i + 4] = struct.pack(">I", rng.choice([0, 1, 0xFFFF, 60000, 0x7FFFFFFF, 0xFFFFFFFF]))
    return bytes(b)
