"""Whose `s3://` keys a manifest may name: the caller's own, asked of the farm (`GET /v1/me`,
`GET /v1/jobs/<id>`).

Design: docs/design/batch.md ("Image sources").
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from ..client import FarmClientError
from .common import RowError, invalid
from .farm import _message

_JOB_KEY = re.compile(r"jobs/\d{4}/\d\d/\d\d/([0-9a-f]{1,64})/")


def _forbidden(key: str, why: str) -> RowError:
    return invalid("image_forbidden", f"s3://{key} is not yours to render: {why}", "image")


class StorageScope:
    """Which `s3://KEY`s a manifest may name: its caller's own, asked of the farm.

    The caller is the batch's token (`I2V_TOKEN`), as the farm knows it (`GET /v1/me` ->
    `{name, admin}`). An admin may name any key; anyone else only keys under `uploads/<name>/`
    and under the prefix of one of their own jobs (`jobs/YYYY/MM/DD/<job id>/`, checked with
    `GET /v1/jobs/<id>`: another caller's job answers 404). With access control off the farm's
    caller is the admin `anonymous`. The check comes before storage is read, so a refusal says
    nothing about whether the key exists.

    This guards a farm's storage against manifests written by others; it is not a boundary
    against whoever submits the batch as a Ray job (that is running code on the cluster).
    """

    def __init__(self, client: Any = None, caller: dict[str, Any] | None = None, *, tries: int = 3,
                 retry_s: float = 1.0):
        self.client = client
        self._caller = caller
        self._owned: dict[str, tuple[str, ...] | None] = {}  # job id -> its prefix(es), None: not theirs
        self._lock = threading.Lock()
        self.tries, self.retry_s = tries, retry_s

    @classmethod
    def nobody(cls) -> "StorageScope":
        """No caller: no key is allowed."""
        return cls(None, {"name": "", "admin": False})

    @classmethod
    def admin(cls, name: str = "anonymous") -> "StorageScope":
        return cls(None, {"name": name, "admin": True})

    def _get(self, path: str) -> tuple[int, Any]:
        last = ""
        for attempt in range(self.tries):
            try:
                status, payload, _ = self.client.request("GET", path)
                if status < 500 and status != 429:
                    return status, payload
                last = f"HTTP {status}: {_message(payload, status)}"
            except FarmClientError as exc:
                last = exc.message
            except ValueError as exc:
                last = f"unreadable answer: {exc}"
            if attempt + 1 < self.tries:
                time.sleep(self.retry_s * (attempt + 1))
        raise RowError("failed", "farm_unreachable", f"cannot ask the farm {path}: {last}", "image")

    def caller(self) -> dict[str, Any]:
        with self._lock:
            if self._caller is not None:
                return self._caller
            if self.client is None:
                self._caller = {"name": "", "admin": False}
                return self._caller
            status, me = self._get("/v1/me")
            if status == 200 and isinstance(me, dict) and isinstance(me.get("name"), str):
                self._caller = {"name": me["name"], "admin": me.get("admin") is True}
                return self._caller
        if status == 401:
            raise invalid("image_forbidden", "s3:// images need a valid token (I2V_TOKEN): the farm answered 401 "
                                             "to GET /v1/me", "image")
        raise invalid("image_forbidden", f"the farm does not say who this batch runs as (GET /v1/me answered "
                                         f"HTTP {status}), so it cannot read s3:// images", "image")

    def _job_prefixes(self, job_id: str, name: str) -> tuple[str, ...] | None:
        with self._lock:
            if job_id in self._owned:
                return self._owned[job_id]
        status, job = self._get(f"/v1/jobs/{job_id}")
        if status == 200 and isinstance(job, dict) and job.get("id") == job_id \
                and job.get("owner", name) == name:
            prefixes = tuple(p for p in (job.get("prefix"),) if isinstance(p, str) and p) or None
            if prefixes is None:  # a farm that does not show the prefix: the day it was created
                from ..storage import job_prefix

                try:
                    prefixes = (job_prefix(job_id, job["created_at"]),)
                except (KeyError, TypeError, ValueError):
                    prefixes = None
        elif status in (403, 404):
            prefixes = None
        else:
            raise RowError("failed", "farm_unreachable",
                           f"cannot check job {job_id} with the farm: HTTP {status}: {_message(job, status)}", "image")
        with self._lock:
            self._owned[job_id] = prefixes
        return prefixes

    def check(self, key: str) -> None:
        """Raise `RowError(invalid, image_forbidden)` unless the caller may render `key`."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in key):
            raise invalid("bad_image_source", f"bad storage key {key!r}: write s3://uploads/<you>/NAME.png "
                                              "(no empty, '.' or '..' parts)", "image")
        me = self.caller()
        if me["admin"]:
            return
        name = me["name"]
        mine = f"uploads/{name}/"
        if name and key.startswith(mine) and len(key) > len(mine):
            return
        m = _JOB_KEY.match(key)
        if m and name:
            prefixes = self._job_prefixes(m.group(1), name)
            if prefixes and any(key.startswith(p) for p in prefixes):
                return
            raise _forbidden(key, f"job {m.group(1)} is not one of {name!r}'s jobs")
        raise _forbidden(key, f"a manifest may name keys under {mine} and under its own jobs' prefixes "
                              "(jobs/YYYY/MM/DD/<job id>/) unless the token is an admin's")
