"""Request bodies as the API reads them: sized up before they are read (`read_body`: 411 without a
Content-Length, 413 past the limit, never read past it), the one JSON body parser (`json_body`:
400 `invalid_json`), and a job submission as fields plus image bytes from a multipart form or a
JSON body with the image in base64 (`read_submission`). Errors are `I2VError`s with their HTTP
status, answered by `serving.api`'s handler as `{"error": {"code", "message", "field"}}`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request

from pipeline.errors import I2VError, InvalidRequest


async def read_body(request: Request, limit: int, too_large: str, field: str | None = None,
                    chunked: bool = False) -> bytes:
    """The whole body, sized up before it is read: refused without a Content-Length (411; Ray
    Serve's proxy would buffer a chunked upload of any size; `chunked=True`: read, but never past
    `limit`) or above `limit` bytes (413), and never read past `limit` whatever the header said."""
    length = request.headers.get("content-length", "")
    code = "image_too_large" if field == "image" else "request_too_large"
    if chunked and not length:
        length = "0"  # no size announced: read, never past `limit`
    if not length.isdigit():
        raise I2VError("send the request with a Content-Length header (chunked uploads are not accepted)",
                       code="length_required", http_status=411)
    if int(length) > limit:
        raise I2VError(f"the request is {int(length) / 2**20:.1f} MiB; {too_large}", code=code, http_status=413,
                       field=field)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise I2VError(f"the request is over {limit / 2**20:.1f} MiB; {too_large}", code=code, http_status=413,
                           field=field)
        chunks.append(chunk)
    request._body = body = b"".join(chunks)  # Starlette's cache of the body: request.form() parses it
    return body


def json_body(body: bytes, *, empty: Any = None, invalid: str | None = None, objects: bool = True) -> Any:
    """The one JSON body parser: the object a body holds (`empty` for an empty body); a body that is
    not JSON, or (`objects`) not an object, is refused with 400 `invalid_json` (`invalid`: the
    message for the first, instead of the decoder's)."""
    data = empty
    if body:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise I2VError(invalid or f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise I2VError(invalid or "the body is not valid JSON: nested too deeply", code="invalid_json") from None
    if objects and not isinstance(data, dict):
        raise I2VError("the JSON body must be an object", code="invalid_json")
    return data


async def read_submission(request: Request, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """(fields, image bytes) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "")
    media = ctype.partition(";")[0].strip().lower()  # media types are case-insensitive; no prefixes
    # base64 grows the image by 4/3; the other fields are small
    limit = max_bytes * 4 // 3 + 2**20
    too_large = f"images may be at most {max_bytes / 2**20:.0f} MiB"
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        await read_body(request, limit, too_large, "image")
        try:
            form = await request.form(max_part_size=max_bytes + 1)
        except Exception as exc:  # noqa: BLE001 - a malformed body is the client's error
            raise I2VError(f"could not read the form: {exc}", code="bad_form") from None
        fields: dict[str, Any] = {}
        image = None
        for key, value in form.multi_items():
            if key == "image":
                if isinstance(value, str):
                    raise InvalidRequest("image must be a file upload", field="image")
                image = await value.read()
            else:
                fields[key] = value
        if image is None:
            raise InvalidRequest("image is required (a JPEG, PNG or WEBP file)", field="image")
        return fields, image
    if media == "application/json" or not media:
        data = json_body(await read_body(request, limit, too_large, "image"))
        encoded = data.pop("image", None)
        if not isinstance(encoded, str) or not encoded:
            raise InvalidRequest("image is required: base64 of a JPEG, PNG or WEBP file", field="image")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            image = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise I2VError("image is not valid base64", code="invalid_base64", field="image") from None
        return data, image
    raise I2VError(f"unsupported content type {ctype!r}: send multipart/form-data or application/json",
                   code="unsupported_media_type", http_status=415)


def image_format(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    return "webp"
