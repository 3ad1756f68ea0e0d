"""Unit tests for pipeline.images: every accepted and refused kind of input image.

Every image is built in memory with PIL (or byte by byte, for the malformed ones), so the tests
need no fixtures on disk and no network.
"""

from __future__ import annotations

import io
import random
import struct
import time
import warnings
import zlib
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from pipeline.errors import InvalidImage
from pipeline.images import (
    ALLOWED_FORMATS,
    MAX_IMAGE_BYTES,
    encode_png,
    load_image,
    load_image_file,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORIENTATION = 0x0112  # EXIF tag


# --- helpers ----------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image that does not compress well, so truncating its file cuts into pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def refused(data: bytes, **limits) -> InvalidImage:
    with pytest.raises(InvalidImage) as info:
        load_image(data, **limits)
    err = info.value
    assert err.field == "image"
    assert err.message and err.message == str(err)
    return err


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


@cache
def png_bomb(width: int, height: int) -> bytes:
    """A valid, tiny 1-bit greyscale PNG of width x height black pixels (a decompression bomb).

    The pixel data is streamed through zlib a block of rows at a time, so building a 400
    megapixel bomb costs a few tens of KB, not the image's memory.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = max(1, (1 << 20) // len(row))
    z = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(z.compress(row * min(rows_per_block, height - start)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        PNG_MAGIC
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


# --- accepted images --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_accepts_each_allowed_format(fmt: str) -> None:
    src = noise(96, 80)
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(encode(src, fmt, **params))
    assert out.size == (96, 80)
    assert out.mode == "RGB"
    if fmt != "JPEG":  # lossless: exactly the same pixels
        assert np.array_equal(np.asarray(out), np.asarray(src))


def test_result_is_a_fresh_rgb_image_without_metadata() -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 1
    exif[0x010F] = "Camera maker"
    data = encode(noise(80, 80), "JPEG", exif=exif.tobytes(), quality=90)
    out = load_image(data)
    assert type(out) is Image.Image  # not a lazily-decoding ImageFile tied to the bytes
    assert out.mode == "RGB"
    assert out.info == {}
    assert len(out.getexif()) == 0


def test_exif_orientation_6_rotates_jpeg_upright() -> None:
    # Stored 128 wide, 64 high, with a red marker in the top-left corner; orientation 6 means
    # "rotate 90 degrees clockwise to display", which puts the marker top-right, 64x128.
    src = Image.new("RGB", (128, 64), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    out = load_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95))

    assert out.size == (64, 128)
    r, g, b = out.getpixel((56, 8))  # top-right: the marker
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    r, g, b = out.getpixel((8, 8))  # top-left: background now
    assert b > 200 and r < 60, (r, g, b)
    assert out.getexif().get(ORIENTATION) is None


def test_size_checks_use_the_upright_size() -> None:
    # 256x64 stored, 64x256 upright: 4:1 either way is allowed.
    exif = Image.Exif()
    exif[ORIENTATION] = 8
    out = load_image(encode(noise(256, 64), "JPEG", exif=exif.tobytes()))
    assert out.size == (64, 256)


def test_rgba_transparency_is_composited_over_white() -> None:
    src = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent
    src.paste((255, 0, 0, 255), (0, 0, 32, 64))  # opaque red left half
    src.paste((0, 0, 0, 128), (0, 48, 64, 64))  # half-transparent black bottom strip
    out = np.asarray(load_image(encode(src, "PNG"))).astype(int)

    assert out[10, 10].tolist() == [255, 0, 0]
    assert out[10, 50].tolist() == [255, 255, 255]
    assert np.all(np.abs(out[56, 10] - 127) <= 1), out[56, 10]


def test_la_and_webp_alpha_are_composited_over_white() -> None:
    la = Image.new("LA", (64, 64), (0, 0))
    assert np.asarray(load_image(encode(la, "PNG"))).min() == 255
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    out = load_image(encode(rgba, "WEBP", lossless=True))
    assert out.getpixel((5, 5)) == (255, 255, 255)


def test_palette_png_with_and_without_transparency() -> None:
    src = Image.new("P", (64, 64), 0)
    src.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    src.paste(1, (0, 0, 32, 64))
    src.paste(2, (0, 0, 64, 16))

    out = load_image(encode(src, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (0, 0, 255)
    assert out.getpixel((5, 40)) == (0, 255, 0)
    assert out.getpixel((50, 40)) == (255, 0, 0)

    see_through = load_image(encode(src, "PNG", transparency=0))  # palette entry 0 transparent
    assert see_through.getpixel((50, 40)) == (255, 255, 255)
    assert see_through.getpixel((5, 40)) == (0, 255, 0)


def test_rgb_png_colour_key_transparency() -> None:
    src = Image.new("RGB", (64, 64), (1, 2, 3))
    src.paste((200, 100, 50), (0, 0, 32, 64))
    out = load_image(encode(src, "PNG", transparency=(1, 2, 3)))
    assert out.getpixel((50, 5)) == (255, 255, 255)
    assert out.getpixel((5, 5)) == (200, 100, 50)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    src = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    out = load_image(encode(src, "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    values = np.zeros((64, 64), dtype=np.uint16)
    values[:, :16] = 65535
    values[:, 16:32] = 32768
    values[:, 32:48] = 257 * 100
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # what PIL hands load_image

    out = np.asarray(load_image(data))
    assert out.shape == (64, 64, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert abs(int(out[0, 20, 0]) - 128) <= 1
    assert out[0, 40].tolist() == [100, 100, 100]
    assert out[0, 60].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_greyscale_become_rgb(mode: str) -> None:
    src = Image.new(mode, (64, 64), 0)
    src.paste(255 if mode == "L" else 1, (0, 0, 32, 64))
    out = load_image(encode(src, "PNG"))
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((50, 5)) == (0, 0, 0)


@pytest.mark.parametrize("fmt,params", [("WEBP", {"lossless": True}), ("PNG", {})])
def test_animated_image_uses_first_frame(fmt: str, params: dict) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert load_image(data).getpixel((10, 10)) == (255, 0, 0)


def test_multi_picture_jpeg_from_a_phone_uses_first_picture() -> None:
    pictures = [Image.new("RGB", (80, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    assert data.startswith(b"\xff\xd8\xff") and Image.open(io.BytesIO(data)).format == "MPO"
    r, g, b = load_image(data).getpixel((5, 5))
    assert r > 240 and g < 15 and b < 15


def test_exactly_the_limits_is_accepted() -> None:
    assert load_image(encode(noise(256, 64), "PNG")).size == (256, 64)  # 4:1, 64 px
    assert load_image(encode(noise(64, 64), "PNG"), max_pixels=64 * 64).size == (64, 64)


def test_encode_png_is_lossless() -> None:
    out = load_image(encode(noise(80, 72), "JPEG"))
    png = encode_png(out)
    assert png.startswith(PNG_MAGIC)
    assert np.array_equal(np.asarray(load_image(png)), np.asarray(out))


def test_load_image_file(tmp_path) -> None:
    path = tmp_path / "photo.webp"
    path.write_bytes(encode(noise(64, 96), "WEBP", lossless=True))
    assert load_image_file(path).size == (64, 96)
    assert load_image_file(str(path)).size == (64, 96)


# --- refused images ---------------------------------------------------------------------------


def test_empty_bytes() -> None:
    err = refused(b"")
    assert (err.code, err.http_status) == ("empty_image", 400)
    assert "empty" in err.message


def test_too_many_bytes() -> None:
    data = encode(noise(128, 128), "PNG")
    err = refused(data, max_bytes=1000)
    assert (err.code, err.http_status) == ("image_too_large", 413)
    assert "limit" in err.message and "1,000 bytes" in err.message

    err = refused(PNG_MAGIC + b"\x00" * MAX_IMAGE_BYTES)  # one byte over 20 MiB by default
    assert (err.code, err.http_status) == ("image_too_large", 413)
    assert "20.0 MiB" in err.message


@pytest.mark.parametrize(
    "fmt,name",
    [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")],
)
def test_formats_pil_reads_but_we_do_not_accept(fmt: str, name: str) -> None:
    err = refused(encode(noise(64, 64), fmt))
    assert (err.code, err.http_status) == ("unsupported_image_type", 415)
    assert name in err.message and "JPEG, PNG or WebP" in err.message


@pytest.mark.parametrize(
    "data",
    [
        random.Random(0).randbytes(4096),
        b"<html><body>not an image</body></html>",
        b"\x00" * 100,
        b"RIFF\x00\x00\x00\x00WAVEfmt ",  # RIFF, but audio
        b"\xff\xd8",  # shorter than any JPEG signature
    ],
    ids=["random", "html", "zeros", "riff-wave", "two-bytes"],
)
def test_not_an_image(data: bytes) -> None:
    err = refused(data)
    assert (err.code, err.http_status) == ("unsupported_image_type", 415)
    assert "JPEG, PNG or WebP" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_file_is_corrupt(fmt: str) -> None:
    data = encode(noise(256, 256), fmt)
    err = refused(data[: len(data) // 2])
    assert (err.code, err.http_status) == ("corrupt_image", 400)
    assert "corrupt" in err.message


def test_damaged_header_is_corrupt() -> None:
    err = refused(PNG_MAGIC + b"garbage that is not an IHDR chunk at all")
    assert (err.code, err.http_status) == ("corrupt_image", 400)
    assert "PNG" in err.message and "corrupt" in err.message


def test_crafted_bomb_is_valid_when_small() -> None:
    """The bomb helper writes real PNGs: a small one decodes (to black)."""
    out = load_image(png_bomb(64, 64))
    assert out.size == (64, 64)
    assert np.asarray(out).max() == 0


@pytest.mark.parametrize(
    "side",
    [
        7_000,  # over our limit, under PIL's own: refused by our header check
        10_000,  # over PIL's MAX_IMAGE_PIXELS: PIL warns (the warning must not escape)
        20_000,  # over twice PIL's limit: PIL raises DecompressionBombError (must not escape)
    ],
)
def test_decompression_bomb_is_refused_from_the_header(side: int, monkeypatch) -> None:
    data = png_bomb(side, side)
    assert len(data) < 100_000  # a few KB that would decode to side*side pixels

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping load_image fails the test
        err = refused(data)
    assert time.perf_counter() - start < 2.0
    assert (err.code, err.http_status) == ("image_too_large", 413)
    assert "36,000,000 pixels" in err.message


def test_max_pixels_limit_is_configurable() -> None:
    err = refused(encode(noise(128, 128), "PNG"), max_pixels=10_000)
    assert (err.code, err.http_status) == ("image_too_large", 413)
    assert "128x128" in err.message and "10,000" in err.message


def test_too_small() -> None:
    err = refused(encode(noise(10, 10), "PNG"))
    assert (err.code, err.http_status) == ("image_too_small", 400)
    assert "10x10" in err.message and "64" in err.message
    assert refused(encode(noise(200, 63), "PNG")).code == "image_too_small"
    assert load_image(encode(noise(16, 16), "PNG"), min_side=16).size == (16, 16)


@pytest.mark.parametrize("size", [(1000, 100), (100, 1000), (257, 64)])
def test_bad_aspect_ratio(size: tuple[int, int]) -> None:
    err = refused(encode(noise(*size), "PNG"))
    assert (err.code, err.http_status) == ("bad_aspect_ratio", 400)
    assert f"{size[0]}x{size[1]}" in err.message and "4:1" in err.message


def test_missing_file(tmp_path) -> None:
    for path in (tmp_path / "nope.png", tmp_path / "nope" / "deeper.png", tmp_path):
        with pytest.raises(InvalidImage) as info:
            load_image_file(path)
        assert info.value.code == "image_not_found"
        assert info.value.field == "image"
        assert str(path) in info.value.message


def test_file_limits_are_the_same(tmp_path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(noise(128, 128), "PNG"))
    with pytest.raises(InvalidImage) as info:
        load_image_file(path, max_bytes=1000)
    assert (info.value.code, info.value.http_status) == ("image_too_large", 413)
    (tmp_path / "a.gif").write_bytes(encode(noise(64, 64), "GIF"))
    with pytest.raises(InvalidImage) as info:
        load_image_file(tmp_path / "a.gif")
    assert info.value.code == "unsupported_image_type"


def test_non_bytes_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        load_image("image.png")  # type: ignore[arg-type]


# --- property ---------------------------------------------------------------------------------


def _samples() -> list[bytes]:
    small = noise(64, 64, seed=1)
    return [
        encode(small, "PNG"),
        encode(small, "JPEG"),
        encode(small, "WEBP"),
        encode(small.convert("RGBA"), "WEBP", lossless=True),
        encode(small.convert("P"), "PNG", transparency=3),
        png_bomb(64, 64),
    ]


SAMPLES = _samples()
MAGICS = [
    PNG_MAGIC,
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"RIFF\x00\x00\x00\x00WEBP",
]


@st.composite
def damaged(draw) -> bytes:
    """A valid small image with a few bytes overwritten and maybe cut short."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


arbitrary_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGICS), st.binary(max_size=512)),
    damaged(),
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(arbitrary_bytes)
def test_arbitrary_bytes_raise_only_invalid_image(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL may warn about odd EXIF; only exceptions matter
        try:
            out = load_image(data)
        except InvalidImage as err:
            assert err.field == "image" and err.code and err.message
            return
    assert out.mode == "RGB" and min(out.size) >= 64
