"""Errors a user can act on.

Each carries a stable machine `code`, a sentence for a person (`message`), the request `field`
it is about (or None) and the HTTP status the farm answers with. The HTTP layer turns them into
`{"error": {"code", "message", "field"}}`; the CLI prints `error: <message>` and exits non-zero.
"""

from __future__ import annotations


class I2VError(Exception):
    """Base class: something the caller can fix or must know about."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


class InvalidRequest(I2VError):
    """A request field is missing, of the wrong type or out of range."""

    code = "invalid_request"
    http_status = 422


class InvalidImage(I2VError):
    """The input image is empty, corrupt, not an image, too small or too large."""

    code = "invalid_image"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message, field="image", code=code)
        if http_status is not None:
            self.http_status = http_status


class ModelLoadError(I2VError):
    """The model could not be found or loaded (missing directory, broken weights, not cached)."""

    code = "model_unavailable"
    http_status = 503


class GenerationCanceled(I2VError):
    """The job was canceled between denoising steps."""

    code = "canceled"
    http_status = 409


class OutOfMemory(I2VError):
    """The accelerator ran out of memory; the farm retries such a job on a larger class."""

    code = "out_of_memory"
    http_status = 507
