"""Talking to the farm through its HTTP client (`serving.client.FarmClient`): retries of `429`,
an unreachable farm and `500`s, the farm's error answers, the check at start (`GET /v1/info`).

Design: docs/design/batch.md ("The HTTP API, not Serve handles", "Transient errors").
"""

from __future__ import annotations

import datetime
import email.utils
import threading
import time
from typing import Any, Callable

from ..client import FarmClientError
from .common import RowError, Stopped, UsageError


class FarmLink:
    """Calls to the farm with the batch's rules for transient errors (shared by the row threads).

    `429`: wait `Retry-After`, retry. Unreachable (no connection, timeout, 502/503/504): retry
    with backoff; once the farm has been unreachable for `unreachable_timeout` seconds, calls fail
    at once with `RowError(failed, farm_unreachable)` until it answers again. A `500` is retried
    3 times. Anything else is returned as (status, payload).
    """

    def __init__(self, client: Any, stop: threading.Event, unreachable_timeout: float = 300.0,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 max_backoff: float = 30.0):
        self.client = client
        self.stop = stop
        self.unreachable_timeout = unreachable_timeout
        self.log = log
        self.clock = clock
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._busy_noted: float | None = None

    def sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()

    def _down(self, reason: str) -> None:
        with self._lock:
            now = self.clock()
            if self._down_since is None:
                self._down_since = now
                self.log(f"the farm at {self.client.url} is unreachable ({reason}); retrying")
            down_for = now - self._down_since
        if down_for >= self.unreachable_timeout:
            raise RowError("failed", "farm_unreachable",
                           f"the farm at {self.client.url} has been unreachable for {down_for:.0f} s: {reason}")

    def _note_busy(self, message: str) -> None:
        """Log a 429 wait, at most once a minute (a full backlog answers every row the same)."""
        with self._lock:
            now = self.clock()
            if self._busy_noted is not None and now - self._busy_noted < 60:
                return
            self._busy_noted = now
        self.log(message)

    def _up(self) -> None:
        with self._lock:
            if self._down_since is not None:
                self.log(f"the farm at {self.client.url} answers again")
            self._down_since = None

    def call(self, method: str, path: str, body: dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        backoff, server_errors = 1.0, 0
        while True:
            if self.stop.is_set():
                raise Stopped()
            try:
                status, payload, hdrs = self.client.request(method, path, body, headers)
            except FarmClientError as exc:  # request() raises only when it got no answer
                self._down(exc.message)
                self.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            except ValueError as exc:  # an answer that is not the JSON it claims to be
                status, payload, hdrs = 502, f"unreadable answer: {exc}", {}
            if status == 429:
                self._up()
                wait = _retry_after(hdrs)
                self._note_busy(f"the farm is busy ({_message(payload, status)}); waiting {wait:.0f} s and retrying")
                self.sleep(wait)
                continue
            if status in (502, 503, 504):
                self._down(f"HTTP {status}: {_message(payload, status)}")
                self.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if status >= 500 and server_errors < 3:
                server_errors += 1
                self.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self._up()
            return status, payload


def _job_error(job: dict[str, Any]) -> dict[str, Any]:
    err = job.get("error") or {}
    return {"code": err.get("code") or job["status"], "message": err.get("message") or f"job {job['status']}",
            "field": None}


def _retry_after(headers: dict[str, str]) -> float:
    """Seconds to wait before retrying a `429`: its `Retry-After`, in seconds (the farm's) or as an
    HTTP date (a proxy's), kept within 1-60 s; 5 s when absent or unreadable."""
    value = (headers.get("Retry-After") or headers.get("retry-after") or "5").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return 5.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if seconds != seconds:  # NaN
        return 5.0
    return min(60.0, max(1.0, seconds))


def _message(payload: Any, status: int) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload["error"].get("message") or f"HTTP {status}"
    if isinstance(payload, (bytes, str)):
        text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
        return text.strip()[:200] or f"HTTP {status}"
    return f"HTTP {status}"


def _error(payload: Any, status: int) -> dict[str, Any]:
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        return {"code": err.get("code") or "http_error", "message": err.get("message") or f"HTTP {status}",
                "field": err.get("field")}
    return {"code": "http_error", "message": _message(payload, status), "field": None}


def check_farm(client: Any, timeout: float) -> dict[str, Any]:
    """`GET /v1/info` of the farm, retried for up to `timeout` s; `UsageError` if it never answers."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            status, payload, _ = client.request("GET", "/v1/info")
            if status == 200 and isinstance(payload, dict):
                return payload
            last = f"HTTP {status}: {_message(payload, status)}"
        except FarmClientError as exc:
            last = exc.message
        except ValueError as exc:
            last = f"unreadable answer: {exc}"
        if time.monotonic() >= deadline:
            raise UsageError(f"the farm at {client.url} does not answer: {last}")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
