"""Errors a user can act on: the farm's one error type.

Each carries a stable machine `code`, a sentence for a person (`message`), the request `field`
it is about (or None), the HTTP status the farm answers with (`http_status`) and, for a refusal
worth retrying, `retry_after` seconds. The HTTP layer (`serving.api`) turns any of them into
`{"error": {"code", "message", "field"}}` with that status (and a `Retry-After` header); the job
manager raises them and sends them across Ray as `reply()` dicts that `from_reply` reads back; the
CLI prints `error: <message>` and exits non-zero.
"""

from __future__ import annotations

from typing import Any


class I2VError(Exception):
    """Base class: something the caller can fix or must know about."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None,
                 http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = int(http_status)

    def to_dict(self) -> dict:
        """The JSON error body's `error` object."""
        return {"code": self.code, "message": self.message, "field": self.field}

    def headers(self) -> dict[str, str] | None:
        """HTTP headers of the answer: `Retry-After` when the refusal is worth retrying later."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None

    def reply(self) -> dict[str, Any]:
        """As a reply that crosses a process boundary (the job manager's answers):
        `{"error", "status"[, "retry_after"]}`; `from_reply` makes the error again."""
        out: dict[str, Any] = {"error": self.to_dict(), "status": self.http_status}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> I2VError:
        err = reply["error"]
        return cls(err["message"], field=err.get("field"), code=err["code"], http_status=reply["status"],
                   retry_after=reply.get("retry_after"))


class InvalidRequest(I2VError):
    """A request field is missing, of the wrong type or out of range."""

    code = "invalid_request"
    http_status = 422


class InvalidImage(I2VError):
    """The input image is empty, corrupt, not an image, too small or too large."""

    code = "invalid_image"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message, field="image", code=code, http_status=http_status)


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
