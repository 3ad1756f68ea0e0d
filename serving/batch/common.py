"""What every part of the batch shares: the row statuses and exit codes, the errors that decide
them (`UsageError`: exit 2; `RowError`: one row `invalid` or `failed`), and two small helpers.

Design: docs/design/batch.md.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from ..jobs import FINISHED

#: Row statuses in the summary (`running`/`pending` only in the summary of a stopped run).
STATUSES = ("succeeded", "failed", "invalid", "skipped", "running", "pending")
#: Rewrite the summary at most this often while rows finish (and always at the end or on stop).
SUMMARY_EVERY_S = 2.0
#: A row in flight this long is mentioned in the log (and again each time as long again).
SLOW_ROW_LOG_S = 600.0
MAX_ID_CHARS = 200
#: The shortest `--poll`: each poll is one request to the farm per row in flight (0 would busy-loop).
MIN_POLL_S = 0.1
TERMINAL = FINISHED  # a farm job's finished statuses (serving.jobs)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Nothing can run (bad manifest path, bad settings, farm or storage unreachable): exit 2."""


class RowError(Exception):
    """One row cannot run (`invalid`) or did not finish (`failed`)."""

    def __init__(self, status: str, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}


def invalid(code: str, message: str, field: str | None = None) -> RowError:
    return RowError("invalid", code, message, field)


class Stopped(Exception):
    """The run was asked to stop (SIGTERM / SIGINT)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
