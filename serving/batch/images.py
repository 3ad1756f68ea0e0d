"""A row's image: a path inside the working directory, `s3://KEY` in the farm's storage (the
caller's own, `StorageScope`), or an http(s) URL within the egress rules; the farm's size limits.

Design: docs/design/batch.md ("Image sources").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

from ..egress import EgressPolicy, EgressRefused, FetchError, fetch
from .common import RowError, invalid
from .scope import StorageScope


@dataclass(frozen=True)
class ImageLimits:
    """What the farm accepts (`GET /v1/info` -> `image`); the batch refuses the rest up front."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    min_side: int = MIN_IMAGE_SIDE

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "ImageLimits":
        image = info.get("image") or {}
        return cls(max_bytes=int(image.get("max_bytes", MAX_IMAGE_BYTES)),
                   max_pixels=int(image.get("max_pixels", MAX_IMAGE_PIXELS)),
                   min_side=int(image.get("min_side", MIN_IMAGE_SIDE)))


def _too_large(size: int, limits: ImageLimits) -> RowError:
    return invalid("image_too_large", f"the image is {size / 2**20:.1f} MiB; the farm accepts at most "
                                      f"{limits.max_bytes / 2**20:.0f} MiB", "image")


def read_image(ref: Any, *, root: Path, storage: Any, limits: ImageLimits, timeout: float = 30.0,
               egress: EgressPolicy | None = None, scope: "StorageScope | None" = None) -> bytes:
    """The bytes of a row's image: a path inside `root`, `s3://KEY` in `storage`, or an http(s) URL.

    An `s3://KEY` must be the caller's (`scope`: none given, none is); an http(s) URL and each of its
    redirects must pass the egress rules (`egress`: none given, the defaults, nothing allowed).
    Raises `RowError`: `invalid` for a source that cannot work (bad reference, not found, outside
    the working directory, not the caller's, refused by the egress rules, too large), `failed` for
    one that may work later (network, storage).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise invalid("invalid_request", "'image' is required: a path in the working directory, "
                                         "s3://KEY or an http(s):// URL", "image")
    ref = ref.strip()
    scheme, sep, rest = ref.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme in ("http", "https"):
            return _download(ref, limits, timeout, egress or EgressPolicy())
        if scheme == "s3":
            key = rest.lstrip("/")
            (scope or StorageScope.nobody()).check(key)
            return _read_storage(key, storage, limits)
        raise invalid("bad_image_source", f"unsupported image source {ref!r}: use a path in the working "
                                          "directory, s3://KEY or an http(s):// URL", "image")
    return _read_local(ref, root, limits)


def _read_local(ref: str, root: Path, limits: ImageLimits) -> bytes:
    root = root.resolve()
    try:
        path = (root / ref).resolve()  # an absolute `ref` replaces root; links are followed
    except (ValueError, OSError) as exc:  # a NUL byte, a link loop
        raise invalid("bad_image_source", f"bad image path {ref!r}: {exc}", "image") from None
    if path != root and root not in path.parents:
        raise invalid("image_outside_working_dir",
                      f"image path {ref!r} leads outside the working directory; paths must stay inside it", "image")
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise invalid("image_not_found", f"image path {ref!r} is a directory", "image")
        if size > limits.max_bytes:
            raise _too_large(size, limits)
        return path.read_bytes()
    except FileNotFoundError:
        raise invalid("image_not_found", f"no image file {ref!r} in the working directory", "image") from None
    except (OSError, ValueError) as exc:
        raise invalid("image_unreadable", f"image file {ref!r} cannot be read: "
                                          f"{getattr(exc, 'strerror', None) or exc}", "image") from None


def _read_storage(key: str, storage: Any, limits: ImageLimits) -> bytes:
    from ..storage import StorageUnavailable

    key = key.lstrip("/")
    try:
        data = storage.get_bytes(key)
    except KeyError:
        hint = ""
        bucket = getattr(storage, "bucket", None)
        if bucket and key.split("/", 1)[0] == bucket:
            hint = f" (s3:// names a key in the farm's bucket {bucket}: write s3://{key.split('/', 1)[-1]})"
        raise invalid("image_not_found", f"no object s3://{key} in the farm's storage{hint}", "image") from None
    except ValueError as exc:  # a key with `..` or that leaves a file:// root
        raise invalid("bad_image_source", f"bad storage key {key!r}: {exc}", "image") from None
    except StorageUnavailable as exc:
        raise RowError("failed", "image_unreachable", f"cannot read s3://{key}: {exc}", "image") from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits)
    return data


def _download(url: str, limits: ImageLimits, timeout: float, egress: EgressPolicy) -> bytes:
    """GET an image URL within the egress rules (`serving.egress`: every hop's resolved address
    checked, redirects followed by hand, the connection made to the checked address)."""
    try:
        resp = fetch(url, policy=egress, timeout=timeout, max_bytes=limits.max_bytes,
                     headers={"User-Agent": "i2v-farm-batch"}, too_large=lambda size: _too_large(size, limits))
    except EgressRefused as exc:
        hop = f" (a redirect led to {exc.url})" if exc.url and exc.url != url else ""
        raise invalid("egress_refused", f"cannot download {url}{hop}: {exc.message}", "image") from None
    except FetchError as exc:
        if exc.status in (401, 403, 404, 410):
            raise invalid("image_not_found", exc.message, "image") from None
        raise RowError("failed", "image_unreachable", exc.message, "image") from None
    return resp.body
