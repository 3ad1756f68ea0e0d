"""A manifest row on its way through the batch: validation (fields, then the image), digest and
stable id, Idempotency-Key, and what an earlier run of the batch already did (resume).

Design: docs/design/batch.md ("Stable row ids", "Resumable, nothing rendered twice").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import I2VError
from pipeline.images import load_image
from pipeline.request import parse_params

from ..egress import EgressPolicy
from ..files import atomic_write
from ..reuse import pop_reuse
from ..webhooks import pop_webhook
from .common import MAX_ID_CHARS, RowError, _sha256, invalid
from .images import ImageLimits, read_image
from .manifest import ManifestRow
from .scope import StorageScope


@dataclass
class Row:
    """A manifest row on its way through the batch; `record()` is its summary line."""

    line: int
    id: str = ""
    image: Any = None
    status: str = "pending"
    fields: dict[str, Any] = field(default_factory=dict)  # validated request fields to submit (+ reuse, webhook)
    digest: str | None = None
    image_sha256: str | None = None
    image_path: Path | None = None  # where the bytes are read again at submission
    attempt: int = 0  # Idempotency-Key counter of the row's latest farm job (0: none yet)
    failures: int = 0  # farm jobs of this row (this content) that ended failed or canceled, all runs
    job_id: str | None = None
    job_status: str | None = None  # the farm job's status as last seen
    vram_class: str | None = None
    video_key: str | None = None
    seed: int | None = None
    error: dict[str, Any] | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    timings: dict[str, Any] | None = None
    note: str | None = None

    def fail(self, exc: RowError) -> None:
        self.status, self.error = exc.status, exc.to_dict()

    def record(self) -> dict[str, Any]:
        return {
            "line": self.line, "id": self.id, "status": self.status,
            "image": self.image if isinstance(self.image, (str, type(None))) else repr(self.image),
            "job_id": self.job_id, "job_status": self.job_status, "vram_class": self.vram_class,
            "video_key": self.video_key, "seed": self.seed,
            "error": self.error, "attempt": self.attempt, "failures": self.failures, "digest": self.digest,
            "submitted_at": self.submitted_at, "finished_at": self.finished_at, "seconds": self.seconds,
            "timings": self.timings, "note": self.note,
        }


def row_digest(params: dict[str, Any], image_sha256: str) -> str:
    """SHA-256 of what decides a row's video: the image bytes and the validated parameters."""
    content = {k: v for k, v in params.items() if k not in ("priority", "preset")}
    return _sha256(json.dumps({"image_sha256": image_sha256, "params": content}, sort_keys=True))


def _explicit_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise invalid("invalid_request", f"'id' must be text or a whole number, got {value!r}", "id")
    text = str(value).strip()
    if not text or len(text) > MAX_ID_CHARS or any(ord(c) < 32 or c == "\x7f" for c in text):
        raise invalid("invalid_request", f"'id' must be 1 to {MAX_ID_CHARS} printable characters", "id")
    return text


def check_row(mrow: ManifestRow, *, root: Path, storage: Any, limits: ImageLimits, priority: str | None = None,
              spool: Path | None = None, download_timeout: float = 30.0, egress: EgressPolicy | None = None,
              scope: StorageScope | None = None) -> Row:
    """Validate one manifest row (fields first, then the image) and compute its digest.

    The image is decoded and checked as the farm would (`load_image`); its bytes are dropped
    again (a downloaded or stored one is kept in `spool` for the submission). `reuse`, `webhook`
    and `webhook_events` are checked as `POST /v1/jobs` checks them (the webhook URL against
    `egress`) and sent with the row; they do not change its video, so not its digest or id.
    """
    row = Row(line=mrow.line)
    if mrow.fields is None:
        row.id = "line-" + str(mrow.line)
        row.fail(invalid("bad_manifest_line", mrow.error or "unreadable line"))
        return row
    data = dict(mrow.fields)
    row.image = data.pop("image", None)
    explicit = data.pop("id", None)
    try:
        if explicit is not None and explicit != "":
            row.id = _explicit_id(explicit)
        if priority and not data.get("priority"):
            data["priority"] = priority
        hook_fields = {k: data.pop(k) for k in ("webhook", "webhook_events") if k in data}  # not generation
        extra: dict[str, Any] = {} if pop_reuse(data) else {"reuse": False}
        params = parse_params(data).model_dump(exclude_none=True)
        webhook = pop_webhook(hook_fields, egress or EgressPolicy()) if hook_fields else None
        if webhook:
            extra.update(webhook=webhook["url"], webhook_events=webhook["events"])
        image = read_image(row.image, root=root, storage=storage, limits=limits, timeout=download_timeout,
                           egress=egress, scope=scope)
        try:
            load_image(image, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels, min_side=limits.min_side)
        except I2VError as exc:
            raise invalid(exc.code, f"image {row.image!r}: {exc.message}", "image") from None
    except RowError as exc:
        row.fail(exc)
    except I2VError as exc:  # parse_params
        row.fail(invalid(exc.code, exc.message, exc.field))
    if row.status != "pending":
        if not row.id:
            row.id = "line-" + str(mrow.line)
        return row
    row.fields = {**params, **extra}
    row.image_sha256 = _sha256(image)
    row.digest = row_digest(params, row.image_sha256)
    if isinstance(row.image, str) and "://" in row.image:
        assert spool is not None, "remote images need a spool directory"
        row.image_path = spool / row.image_sha256
        if not row.image_path.exists():
            atomic_write(row.image_path, image, durable=False)
    else:
        row.image_path = (root / row.image).resolve()
    return row


def assign_ids(rows: list[Row]) -> None:
    """Row ids: the explicit `id`, else the digest's first 16 hex digits (`-2`, `-3`, ... for
    repeats of the same content, in line order). A repeated explicit id makes the later row invalid."""
    seen: dict[str, int] = {}
    occurrences: dict[str, int] = {}
    for row in rows:
        if row.status == "pending" and not row.id:
            n = occurrences[row.digest] = occurrences.get(row.digest, 0) + 1
            row.id = row.digest[:16] + ("" if n == 1 else f"-{n}")
    for row in rows:
        if row.status == "pending" or (row.status == "invalid" and not row.id.startswith("line-")):
            if row.id in seen and row.status == "pending":
                row.fail(invalid("duplicate_id", f"id {row.id!r} is already used on line {seen[row.id]}", "id"))
                continue
            seen.setdefault(row.id, row.line)


def idempotency_key(prefix: str, row: Row, attempt: int) -> str:
    """The farm's Idempotency-Key for a row's `attempt`-th job in the batch under `prefix`."""
    return f"batch-{_sha256(f'{prefix}|{row.id}|{row.digest}')[:32]}-{attempt}"


def plan_rows(rows: list[Row], previous: dict[str, dict[str, Any]], video_exists: Callable[[str], bool | None],
              max_attempts: int) -> None:
    """Carry over what an earlier run of this batch did: skip rows that are done, and set the
    attempt (Idempotency-Key counter) each remaining row starts from.

    `video_exists(key)` may answer None (storage unreachable): such a row is submitted under its
    old key, and the farm answers with the job it already has.
    """
    for row in rows:
        if row.status != "pending":
            continue
        prev = previous.get(row.id)
        if not prev or prev.get("digest") != row.digest:
            row.attempt = 1  # new, or its content changed under the same explicit id
            continue
        attempt = int(prev.get("attempt") or 0)
        row.failures = int(prev.get("failures") or 0)
        if prev.get("status") in ("succeeded", "skipped") and prev.get("video_key"):
            exists = video_exists(prev["video_key"])
            if exists:
                _carry(row, prev)
                row.status, row.note = "skipped", "done in an earlier run"
                continue
            if exists is False:
                row.note = f"its video {prev['video_key']} is no longer in storage: rendering again"
                attempt += 1
        elif prev.get("job_status") in ("failed", "canceled"):
            attempt += 1  # the farm job ended badly (after the farm's own retries): a fresh job
        row.attempt = max(1, attempt)
        if row.failures >= max_attempts:
            _carry(row, prev)
            row.fail(_gave_up(row.failures, prev.get("error")))


def _gave_up(failures: int, error: dict[str, Any] | None) -> RowError:
    error = error or {}
    return RowError("failed", error.get("code") or "gave_up",
                    f"{failures} farm jobs of this row failed (last: {error.get('message') or 'unknown'}); "
                    "not retried: raise --max-attempts to try again")


def _carry(row: Row, prev: dict[str, Any]) -> None:
    for name in ("job_id", "job_status", "vram_class", "video_key", "seed", "attempt", "failures", "error",
                 "submitted_at", "finished_at", "seconds", "timings"):
        setattr(row, name, prev.get(name))
