"""Decoding and validating the image a user sends.

The image is the only binary input of a job and it comes from strangers, so it is checked here,
once, before anything is queued: the ingress calls :func:`load_image` and answers the request
with the :class:`~pipeline.errors.InvalidImage` it raises (each with a stable ``code``, a sentence
a person can act on, ``field="image"`` and the HTTP status). What comes out is always the same
kind of thing, whatever came in: a fresh 8-bit RGB :class:`PIL.Image.Image`, upright (EXIF
orientation applied), transparency flattened onto white, first frame of an animation, with no
metadata that could change how it is read later. :func:`encode_png` stores that normalized image
losslessly, so what a worker renders from is exactly what was validated.

Checks, in the order they run:

1. size in bytes (``empty_image``; ``image_too_large``, 413);
2. the magic bytes say JPEG, PNG or WebP (``unsupported_image_type``, 415) -- PIL is never
   asked to guess among its ~40 formats, and a GIF/BMP/TIFF is refused even though PIL reads it;
3. the pixel count from the header, *before* any pixel is decoded (``image_too_large``, 413).
   PIL's own decompression-bomb warning/error is turned into the same error;
4. the full decode (``corrupt_image`` for a truncated or damaged file);
5. the upright size: each side at least ``min_side`` (``image_too_small``) and at most
   ``MAX_ASPECT_RATIO`` to 1 either way (``bad_aspect_ratio``).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Final

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import InvalidImage

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "encode_png",
    "load_image",
    "load_image_file",
]

ALLOWED_FORMATS: Final = ("JPEG", "PNG", "WEBP")
"""Container formats accepted, as PIL names them."""

MAX_IMAGE_BYTES: Final = 20 * 1024 * 1024
"""Largest encoded image accepted (20 MiB)."""

MAX_IMAGE_PIXELS: Final = 36_000_000
"""Decompression-bomb guard: width * height above this is refused from the header (6000x6000)."""

MIN_IMAGE_SIDE: Final = 64
"""Smallest width or height accepted, in pixels (after EXIF orientation)."""

MAX_ASPECT_RATIO: Final = 4.0
"""Longest side over shortest side, at most; e.g. 1024x256 is fine, 1025x256 is not."""

_ALLOWED_NAMES: Final = "JPEG, PNG or WebP"

# PIL opens a multi-picture JPEG (what many phone cameras write) as "MPO": it is a JPEG file
# whose first picture is the photo, so it is accepted as one.
_DECODED_FORMATS: Final = frozenset(ALLOWED_FORMATS) | {"MPO"}

# Formats people commonly send by mistake, recognised only to word the refusal better.
_OTHER_SIGNATURES: Final = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
)

# 16-bit (and 32-bit integer) grey modes; their values are taken as 0..65535.
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE: Final = (255, 255, 255)


def load_image(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> Image.Image:
    """Decode and validate an encoded JPEG, PNG or WebP image.

    Args:
        data: the encoded file, as sent by the user.
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted width * height, checked from the header before decoding.
        min_side: smallest accepted width or height of the upright image.

    Returns:
        A new 8-bit RGB image, upright, transparency composited over white, with empty ``info``.

    Raises:
        InvalidImage: with ``code`` one of ``empty_image``, ``image_too_large`` (413),
            ``unsupported_image_type`` (415), ``corrupt_image``, ``image_too_small``,
            ``bad_aspect_ratio``.
        TypeError: ``data`` is not bytes-like (a programming error, not a user's).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_image expects bytes, not {type(data).__name__}")
    data = bytes(data)
    _check_byte_size(len(data), max_bytes)
    _check_signature(data)
    with _open(data, max_pixels) as img:
        _decode(img, max_pixels)
        upright = _upright(img)
    _check_dimensions(upright.size, min_side)
    try:
        return _to_rgb(upright)
    except Exception:  # no mode JPEG/PNG/WebP decode to is expected here; refuse, don't crash
        raise InvalidImage(
            f"The image's colour mode ({upright.mode}) is not supported; "
            "save it as an 8-bit RGB or greyscale image.",
            code="unsupported_image_type",
            http_status=415,
        ) from None


def load_image_file(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> Image.Image:
    """Read an image file from disk and validate it exactly like :func:`load_image`.

    The size is checked from the file system before the file is read, so a huge file is refused
    without loading it into memory.

    Raises:
        InvalidImage: ``image_not_found`` when there is no such file (or it is a directory),
            ``image_unreadable`` when it cannot be read (permissions, I/O error), otherwise as
            :func:`load_image`.
    """
    name = os.fspath(path)
    try:
        if os.path.isdir(name):
            raise IsADirectoryError(name)
        _check_byte_size(os.path.getsize(name), max_bytes)
        with open(name, "rb") as f:
            # One byte more than allowed: enough to notice a file that grew since stat().
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidImage(f"No image file at {name!r}.", code="image_not_found") from None
    except IsADirectoryError:
        raise InvalidImage(
            f"{name!r} is a directory, not an image file.", code="image_not_found"
        ) from None
    except OSError as e:
        raise InvalidImage(
            f"The image file {name!r} could not be read: {e.strerror or e}.",
            code="image_unreadable",
        ) from None
    return load_image(data, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side)


def encode_png(image: Image.Image) -> bytes:
    """Encode ``image`` (normally :func:`load_image`'s result) as PNG: a lossless copy to store."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- checks -----------------------------------------------------------------------------------


def _check_byte_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise InvalidImage("The image is empty (0 bytes).", code="empty_image")
    if size > max_bytes:
        raise InvalidImage(
            f"The image is {_mib(size)}; the limit is {_mib(max_bytes)}. "
            "Send a smaller file (a JPEG or WebP is usually much smaller than a PNG).",
            code="image_too_large",
            http_status=413,
        )


def _sniff(data: bytes) -> str | None:
    """The allowed format the magic bytes announce, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_signature(data: bytes) -> None:
    if _sniff(data) is not None:
        return
    other = next((name for magic, name in _OTHER_SIGNATURES if data.startswith(magic)), None)
    if other is None and data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            other = "AVIF"
        elif brand.startswith(b"hei") or brand in (b"mif1", b"msf1"):
            other = "HEIC"
    what = f"a {other} file" if other else "not a JPEG, PNG or WebP image"
    raise InvalidImage(
        f"The file is {what}; send the image as {_ALLOWED_NAMES}.",
        code="unsupported_image_type",
        http_status=415,
    )


def _too_many_pixels(detail: str, max_pixels: int) -> InvalidImage:
    return InvalidImage(
        f"The image is {detail}; the limit is {max_pixels:,} pixels "
        f"(about {int(max_pixels**0.5)}x{int(max_pixels**0.5)}). Send a smaller image.",
        code="image_too_large",
        http_status=413,
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image and read its header only; refuse it if it has too many pixels.

    ``Image.open`` is lazy: it reads the header, not the pixels. It also applies PIL's own
    (process-wide, larger) decompression-bomb limit, warning above ``Image.MAX_IMAGE_PIXELS``
    and raising above twice that; both are turned into ``image_too_large`` here so neither a
    warning nor PIL's exception reaches the caller.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels("far too large to decode safely", max_pixels) from None
    except MemoryError:
        raise _too_many_pixels("too large to decode", max_pixels) from None
    except Exception:
        # The magic bytes matched but PIL cannot make sense of the header.
        raise InvalidImage(
            f"The {_sniff(data)} image is corrupt: its header could not be read.",
            code="corrupt_image",
        ) from None

    if img.format not in _DECODED_FORMATS:  # defensive: `formats=` already restricts this
        img.close()
        raise InvalidImage(
            f"The file is a {img.format} image; send the image as {_ALLOWED_NAMES}.",
            code="unsupported_image_type",
            http_status=415,
        )
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise _too_many_pixels(f"{width}x{height} ({width * height:,} pixels)", max_pixels)
    return img


def _decode(img: Image.Image, max_pixels: int) -> None:
    """Decode every pixel of the first frame now, so a truncated or damaged file fails here.

    Any exception from the decoder means the file is broken: PIL raises OSError, SyntaxError,
    ValueError, EOFError, struct.error and others depending on the plugin and the damage.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.seek(0)  # animated WebP/PNG: the first frame
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise _too_many_pixels("too large to decode", max_pixels) from None
    except Exception as e:
        truncated = "truncated" in str(e).lower()
        reason = "the file is truncated" if truncated else "it could not be decoded"
        raise InvalidImage(
            f"The {img.format} image is corrupt: {reason}. Re-export or re-download it.",
            code="corrupt_image",
        ) from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (a phone photo taken sideways is stored sideways)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # Broken EXIF must not cost the user their upload: keep the pixels as stored.
        return img.copy()


def _check_dimensions(size: tuple[int, int], min_side: int) -> None:
    width, height = size
    if min(width, height) < min_side:
        raise InvalidImage(
            f"The image is {width}x{height}; each side must be at least {min_side} pixels.",
            code="image_too_small",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidImage(
            f"The image is {width}x{height}, an aspect ratio of {ratio:.1f}:1; "
            f"at most {MAX_ASPECT_RATIO:g}:1 either way is supported. Crop it first.",
            code="bad_aspect_ratio",
        )


# --- normalization ----------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to a fresh 8-bit RGB image with no metadata."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's convert() clips 16-bit values to 0..255; scale instead so 65535 -> 255.
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        rgb = Image.fromarray(grey).convert("RGB")
    elif mode in _ALPHA_MODES or "transparency" in img.info:
        # P/L/RGB with a transparent palette entry or colour key, or a real alpha channel.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        # RGB, L, 1, P, CMYK (Adobe's inverted CMYK is undone by the JPEG reader), YCbCr.
        rgb = img.convert("RGB")
    # A new image from the raw pixels: no EXIF, ICC profile, palette or other `info` left over.
    return Image.frombytes("RGB", rgb.size, rgb.tobytes())


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB" if size >= 1024 * 1024 else f"{size:,} bytes"
