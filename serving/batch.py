"""Batch rendering: a manifest of (image, prompt, settings) rows through the running farm.

    ray job submit --working-dir . -- python -m serving.batch manifest.jsonl
    python -m serving.batch manifest.csv --out batches/spring/ --concurrency 8 --priority low

The manifest is JSON Lines (one object per line) or CSV (a header row naming the columns). Each
row has an `image` (a path inside the working directory, `s3://KEY` for a key in the farm's
storage, or an `http(s)://` URL), a `prompt`, any request field (`preset`, `resolution`,
`num_frames`, ...) and optionally an `id`. Rows that cannot run (a bad field, a missing or
corrupt image, a path outside the working directory, an unparsable line) are reported as
`invalid` with their line number; the others still run. The summary lands in the farm's storage
under `PREFIX` (default `batches/<manifest stem>/`): `summary.jsonl`, one line per manifest row
(line, id, status, job id, video key, error, timings), and `summary.json` (counts).

Design decisions
----------------
* **The HTTP API, not Serve handles.** Rows go through `POST /v1/jobs` with
  `serving.client.FarmClient`, like every other client: the same validation and error answers,
  the `Idempotency-Key` that makes resubmitting safe, `429` + `Retry-After` for a full class
  backlog, `GET /v1/jobs/{id}` for status. The batch needs no Ray connection at all, so it runs
  the same as a Ray job on the head node, on a laptop against a remote farm, or from cron, and
  it cannot outlive or wedge the farm's actors (a `ray job stop` kills only this process).
  Handles would save a base64 copy of each image and an HTTP hop, which is nothing next to
  seconds-to-minutes of rendering, and would bypass the ingress's checks and quotas.
* **Stable row ids.** A row's id is its `id` column when given, else the first 16 hex digits of
  its *digest*: SHA-256 over the image bytes' SHA-256 and the validated parameters (presets
  applied; `priority` and `preset` left out, since they do not change the video). So a CSV and
  a JSONL row asking for the same render have the same id, reordering rows changes nothing, and
  editing a prompt or replacing an image file makes a new row. Identical rows (same digest, no
  `id`) are kept apart as `<digest>`, `<digest>-2`, ... (two variants of one shot are a normal
  request: without a `seed` each renders differently). A repeated explicit `id` is invalid.
* **Resumable, nothing rendered twice.** The `Idempotency-Key` of a row is derived from the
  output prefix, the row id, its digest and an attempt counter. Running the same manifest again
  skips rows the previous summary lists as done whose video is still in storage (`skipped`);
  a row that was in flight when the run stopped is resubmitted under the same key, and the farm
  answers with the job it already has (running or finished) instead of rendering it again. So
  even a summary write lost to a `SIGKILL` costs no render. A row whose farm job `failed` (or was
  canceled) is tried again by the next run under the next key, until `--max-attempts` of its
  farm jobs have failed (within one run the farm's own retries apply: worker death, out of
  memory on the next larger class, `max_attempts`). A row whose video was deleted since
  (`i2v-farm gc`) renders again.
* **Summary written as it goes.** `summary.jsonl`/`summary.json` are rewritten at most every
  `SUMMARY_EVERY_S` seconds while rows finish, at the end, and when the run is stopped
  (`ray job stop` sends SIGTERM and waits 3 s before SIGKILL). In-flight rows are listed as
  `running` with their job id, rows never started as `pending`. The farm's jobs of a stopped
  run are not canceled: they finish, and the next run picks them up.
* **Transient errors.** `429` waits `Retry-After` and retries (no limit: the farm is up, just
  busy). The farm unreachable (connection refused, timeout, 502/503/504) is retried with backoff
  (1 s doubling to 30 s); once it has been unreachable for `--unreachable-timeout` seconds the
  rows that need it fail with that error (the run goes on and ends with exit code 1; a re-run
  resumes them). A farm unreachable at start is a usage error (exit 2). Other refusals of a row
  (`422` no class holds it, ...) make it `invalid` with the farm's error. A row waits for its
  job as long as the farm works on it (the log mentions rows in flight for over 10 minutes);
  `--row-timeout` fails it earlier without canceling the job, which the next run picks up.
* **Image sources.** A relative path is read from the working directory (the directory the
  batch runs in: `--working-dir` of `ray job submit`) and must stay inside it (`..`, absolute
  paths and links leading out are refused). `s3://KEY` is the object `KEY` in the farm's own
  storage (`I2V_STORAGE_URL`; the bucket is the farm's, so `s3://uploads/alice/cat.png` is the
  key `uploads/alice/cat.png` in it), and only the caller's own: keys under `uploads/<caller>/`
  and under the prefixes of the caller's own jobs (`jobs/YYYY/MM/DD/<job id>/`), any key for an
  admin token; the caller is the batch's `I2V_TOKEN` as the farm knows it (`GET /v1/me`), others'
  keys are `invalid` (`image_forbidden`) before storage is read. `http(s)://` is downloaded
  (timeout `--download-timeout`, at most the farm's image size limit) within the farm's egress
  rules (`serving.egress`: no loopback, private, link-local or metadata address, on any redirect
  hop, unless `I2V_EGRESS_ALLOW` lists it; a refused URL is `invalid`, `egress_refused`). Each image is validated like the farm does (`load_image`, with the
  farm's limits from `GET /v1/info`) before anything is submitted; downloaded ones are kept in a
  temporary directory for the run, so each is fetched once.
* **Exit code** 0 when every valid row succeeded or was already done, 1 when some row failed,
  2 for a usage error (no manifest, bad settings, storage or farm unreachable at start), 128+N
  when stopped by signal N.

Storage is configured as for the farm (`I2V_STORAGE_URL`, `I2V_S3_*`, or `I2V_CONFIG`): pass
them in the job's runtime environment. Under Ray Jobs a relative `file://` URL would point into
the job's temporary working directory, so it is refused there.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import queue
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import I2VError
from pipeline.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, load_image
from pipeline.request import parse_params

from .client import DEFAULT_URL, FarmClient, FarmClientError
from .egress import EgressPolicy, EgressRefused, FetchError, fetch
from .files import apply_umask, atomic_write

SUMMARY_ROWS = "summary.jsonl"
SUMMARY_COUNTS = "summary.json"
#: Row statuses in the summary (`running`/`pending` only in the summary of a stopped run).
STATUSES = ("succeeded", "failed", "invalid", "skipped", "running", "pending")
#: Rewrite the summary at most this often while rows finish (and always at the end or on stop).
SUMMARY_EVERY_S = 2.0
#: A row in flight this long is mentioned in the log (and again each time as long again).
SLOW_ROW_LOG_S = 600.0
MAX_ID_CHARS = 200
TERMINAL = ("succeeded", "failed", "canceled")
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


# --- the manifest ------------------------------------------------------------------------------


@dataclass
class ManifestRow:
    """One row as read from the manifest: its fields, or why the line could not be read."""

    line: int
    fields: dict[str, Any] | None
    error: str | None = None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """The rows of a JSON Lines or CSV manifest, with the line each starts on (1-based).

    The format is chosen by the suffix (`.csv`; `.jsonl`, `.ndjson`, `.json`), otherwise by the
    first character (`{`: JSON Lines). Blank lines are skipped. Raises `UsageError` when the file
    cannot be read or a CSV header is unusable; a bad line is a row with an `error`.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"no manifest at {path} (run from the directory that holds it: the working dir)") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a manifest") from None
    except OSError as exc:
        raise UsageError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"the manifest {path} is not UTF-8 text: {exc}") from None
    return parse_manifest(text, fmt=manifest_format(path, text))


def manifest_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def parse_manifest(text: str, fmt: str = "jsonl") -> list[ManifestRow]:
    if fmt == "jsonl":
        return _parse_jsonl(text)
    if fmt == "csv":
        return _parse_csv(text)
    raise ValueError(f"unknown manifest format {fmt!r}")


def _parse_jsonl(text: str) -> list[ManifestRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            rows.append(ManifestRow(number, None, f"not valid JSON: {exc}"))
            continue
        if not isinstance(data, dict):
            rows.append(ManifestRow(number, None, f"each line must be a JSON object, got {type(data).__name__}"))
            continue
        rows.append(ManifestRow(number, {str(k): v for k, v in data.items()}))
    return rows


def _parse_csv(text: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows = []
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: the record starts here
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:
                raise UsageError(f"line {start}: the CSV header cannot be read: {exc}") from None
            rows.append(ManifestRow(start, None, f"not valid CSV: {exc}"))
            continue
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = [cell.strip() for cell in record]
            if "" in header:
                raise UsageError(f"line {start}: the CSV header has an empty column name "
                                 f"(column {header.index('') + 1})")
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise UsageError(f"line {start}: the CSV header repeats {', '.join(repeated)}")
            continue
        if len(record) > len(header):
            rows.append(ManifestRow(start, None, f"{len(record)} cells but the header names {len(header)} columns"))
            continue
        # an empty cell is a field left out (its default applies)
        rows.append(ManifestRow(start, {h: v for h, v in zip(header, record) if v.strip() != ""}))
    return rows


# --- images ------------------------------------------------------------------------------------


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
    from .storage import StorageUnavailable

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


# --- whose s3:// keys --------------------------------------------------------------------------

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
                from .storage import job_prefix

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


# --- rows --------------------------------------------------------------------------------------


@dataclass
class Row:
    """A manifest row on its way through the batch; `record()` is its summary line."""

    line: int
    id: str = ""
    image: Any = None
    status: str = "pending"
    fields: dict[str, Any] = field(default_factory=dict)  # validated request fields to submit
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
    again (a downloaded or stored one is kept in `spool` for the submission).
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
        params = parse_params(data).model_dump(exclude_none=True)
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
    row.fields = params
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


# --- the farm ----------------------------------------------------------------------------------


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
    value = headers.get("Retry-After") or headers.get("retry-after") or "5"
    try:
        return min(60.0, max(1.0, float(value)))
    except ValueError:
        return 5.0


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


# --- the run -----------------------------------------------------------------------------------


class BatchRun:
    """Submit the pending rows with at most `concurrency` in flight; keep the summary current."""

    def __init__(self, rows: list[Row], client: Any, storage: Any, prefix: str, *, concurrency: int = 4,
                 poll_s: float = 1.0, unreachable_timeout: float = 300.0, max_attempts: int = 3,
                 manifest: str = "", out=None, stop: threading.Event | None = None, row_timeout: float = 0):
        self.rows = rows
        self.client = client
        self.storage = storage
        self.prefix = prefix
        self.concurrency = max(1, concurrency)
        self.poll_s = poll_s
        self.row_timeout = row_timeout
        self.max_attempts = max_attempts
        self.manifest = manifest
        self.out = out or sys.stdout
        self.stop = stop or threading.Event()
        self.link = FarmLink(client, self.stop, unreachable_timeout, log=self.log)
        self.lock = threading.Lock()
        self.events: queue.Queue = queue.Queue()
        self.started_at = _now()
        self.summary_errors = 0
        self._bar = None

    # output -----------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.out)
        else:
            print(message, file=self.out, flush=True)

    # summary ----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        for row in self.rows:
            counts[row.status] += 1
        return {"rows": len(self.rows), **counts}

    def write_summary(self, finished: bool, stopped: bool = False, exit_code: int | None = None) -> bool:
        from .storage import StorageUnavailable

        with self.lock:
            lines = [json.dumps(r.record()) for r in sorted(self.rows, key=lambda r: r.line)]
            counts = self.counts()
        summary = {
            "manifest": self.manifest, "prefix": self.prefix, "farm": self.client.url,
            "started_at": self.started_at, "updated_at": _now(), "finished": finished, "stopped": stopped,
            "exit_code": exit_code, "counts": counts,
        }
        try:
            self.storage.put_bytes(self.prefix + SUMMARY_ROWS, ("\n".join(lines) + "\n").encode(),
                                   "application/x-ndjson")
            self.storage.put_bytes(self.prefix + SUMMARY_COUNTS, (json.dumps(summary, indent=2) + "\n").encode(),
                                   "application/json")
            return True
        except (StorageUnavailable, OSError) as exc:
            self.summary_errors += 1
            self.log(f"warning: cannot write the summary to storage: {exc}")
            return False

    # one row ----------------------------------------------------------------------------------

    def _submit(self, row: Row, image: bytes) -> dict[str, Any]:
        """Submit (or find again) the row's farm job; returns the job as the farm answered."""
        body = {**row.fields, "image": base64.b64encode(image).decode()}
        attempt = row.attempt
        while True:
            status, job = self.link.call("POST", "/v1/jobs", body,
                                         {"Idempotency-Key": idempotency_key(self.prefix, row, attempt)})
            if status >= 400:
                err = _error(job, status)
                # a refused row (422 no class holds it, 413, ...) cannot run as it is
                kind = "failed" if status >= 500 or status in (408, 409) else "invalid"
                raise RowError(kind, err["code"], f"refused by the farm: {err['message']}", err["field"])
            with self.lock:
                row.attempt, row.job_id, row.job_status, row.status = attempt, job["id"], job.get("status"), "running"
                row.vram_class = job.get("vram_class")
                row.submitted_at = job.get("created_at") or _now()
            if status == 200 and job.get("status") in ("failed", "canceled"):
                # an earlier run's job under this key ended badly: the next key makes a new job
                with self.lock:
                    row.error = _job_error(job)
                    row.failures += 1
                if row.failures >= self.max_attempts:
                    raise _gave_up(row.failures, row.error)
                attempt += 1
                continue
            return job

    def _wait(self, row: Row, job: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        next_note = SLOW_ROW_LOG_S
        while job.get("status") not in TERMINAL:
            waited = time.monotonic() - t0
            if self.row_timeout and waited > self.row_timeout:
                raise RowError("failed", "row_timeout",
                               f"job {job['id']} still {job.get('status')} after {waited:.0f} s (--row-timeout); "
                               "it goes on on the farm, and the next run picks it up")
            if waited > next_note:
                progress = job.get("progress") or {}
                self.log(f"line {row.line} [{row.id}]: job {job['id']} still {job.get('status')} after "
                         f"{waited:.0f} s (step {progress.get('step', 0)} of {progress.get('total', '?')})")
                next_note += SLOW_ROW_LOG_S
            self.link.sleep(self.poll_s)
            status, payload = self.link.call("GET", f"/v1/jobs/{job['id']}")
            if status == 404:
                raise RowError("failed", "job_lost", f"the farm no longer knows job {job['id']}")
            if status >= 400:
                raise RowError("failed", _error(payload, status)["code"],
                               f"cannot follow job {job['id']}: {_message(payload, status)}")
            job = payload
            with self.lock:
                row.job_status, row.vram_class = job.get("status"), job.get("vram_class") or row.vram_class
        return job

    def _run_row(self, row: Row) -> None:
        t0 = time.monotonic()
        try:
            image = row.image_path.read_bytes()
        except OSError as exc:
            raise RowError("failed", "image_unreadable", f"image {row.image!r} cannot be read again: "
                                                         f"{exc.strerror or exc}", "image") from None
        if _sha256(image) != row.image_sha256:
            raise RowError("failed", "image_changed", f"image {row.image!r} changed while the batch ran; "
                                                      "run the batch again", "image")
        job = self._wait(row, self._submit(row, image))
        with self.lock:
            row.job_status = job["status"]
            row.finished_at = job.get("finished_at") or _now()
            row.seconds = round(time.monotonic() - t0, 3)
            row.timings = job.get("timings") or None
            row.vram_class = job.get("vram_class") or row.vram_class
            row.seed = (job.get("params") or {}).get("seed")
            if job["status"] == "succeeded":
                row.status, row.error = "succeeded", None
                row.video_key = (job.get("result") or {}).get("key")
            else:
                row.status, row.error = "failed", _job_error(job)
                row.failures += 1

    def _worker(self, todo: queue.Queue) -> None:
        while not self.stop.is_set():
            try:
                row = todo.get_nowait()
            except queue.Empty:
                return
            self.events.put(("start", row))
            try:
                self._run_row(row)
            except Stopped:
                return
            except RowError as exc:
                with self.lock:
                    row.fail(exc)
            except Exception as exc:  # noqa: BLE001 - one row's surprise must not end the batch
                with self.lock:
                    row.fail(RowError("failed", "batch_error", f"{type(exc).__name__}: {exc}"))
            self.events.put(("done", row))

    # the whole run ----------------------------------------------------------------------------

    def run(self) -> int:
        from tqdm import tqdm

        pending = [r for r in self.rows if r.status == "pending"]
        todo: queue.Queue = queue.Queue()
        for row in pending:
            todo.put(row)
        self.write_summary(finished=False)
        tty = hasattr(self.out, "isatty") and self.out.isatty()
        bar = tqdm(total=len(pending), desc="rendering", unit="clip", file=self.out if tty else _LogLines(self.out),
                   dynamic_ncols=tty, ncols=None if tty else 100, ascii=not tty, mininterval=0.5 if tty else 10.0,
                   disable=not pending)
        self._bar = None if bar.disable else bar
        threads = [threading.Thread(target=self._worker, args=(todo,), name=f"batch-{i}", daemon=True)
                   for i in range(min(self.concurrency, len(pending)))]
        for t in threads:
            t.start()
        in_flight = done = failed = 0
        last_write = time.monotonic()
        dirty = False
        try:
            while any(t.is_alive() for t in threads) or not self.events.empty():
                try:
                    kind, row = self.events.get(timeout=0.5)
                except queue.Empty:
                    kind = row = None
                if kind == "start":
                    in_flight += 1
                elif kind == "done":
                    in_flight -= 1
                    dirty = True
                    if row.status == "succeeded":
                        done += 1
                    else:
                        failed += 1
                if kind:
                    bar.set_postfix(done=done, failed=failed, in_flight=in_flight, refresh=False)
                if kind == "done":
                    self.log(_row_line(row))
                    bar.update(1)
                if self.stop.is_set():
                    break
                if dirty and time.monotonic() - last_write >= SUMMARY_EVERY_S:
                    self.write_summary(finished=False)
                    last_write, dirty = time.monotonic(), False
        finally:
            bar.close()
            self._bar = None
        stopped = self.stop.is_set()
        counts = self.counts()
        code = EXIT_FAILED if counts["failed"] else EXIT_OK
        if stopped:
            code = 128 + (getattr(self.stop, "signum", None) or signal.SIGTERM)
        if not self.write_summary(finished=not stopped, stopped=stopped, exit_code=code) and code == EXIT_OK:
            code = EXIT_FAILED
        return code


class _LogLines(io.TextIOBase):
    """tqdm's output for a log file (Ray job logs capture stdout): each refresh of the bar on a
    line of its own instead of carriage-return redraws."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> int:
        for segment in text.replace("\r", "\n").split("\n"):
            if segment.strip():
                self.out.write(segment.rstrip() + "\n")
        self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _row_line(row: Row) -> str:
    head = f"line {row.line} [{row.id}]"
    if row.status == "succeeded":
        return f"{head} succeeded on {row.vram_class} in {row.seconds or 0:.1f} s: {row.video_key}"
    err = row.error or {}
    return f"{head} {row.status}: {err.get('message', '')}" + (f" (job {row.job_id})" if row.job_id else "")


# --- entry point -------------------------------------------------------------------------------


def default_prefix(manifest: Path) -> str:
    return f"batches/{manifest.stem}/"


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip().strip("/")
    if not prefix or "://" in prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"--out must be a key prefix in the farm's storage, like batches/spring/, got {prefix!r}")
    return prefix + "/"


def read_previous(storage: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """The rows of the previous run's `summary.jsonl` under `prefix`, by row id ({} if none)."""
    from .storage import StorageUnavailable

    try:
        raw = storage.get_bytes(prefix + SUMMARY_ROWS)
    except KeyError:
        return {}
    except StorageUnavailable as exc:
        raise UsageError(f"cannot read the previous summary from storage: {exc}") from None
    previous = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("id"):
            previous[str(rec["id"])] = rec
    return previous


def batch_settings(env: dict[str, str] | None = None):
    """The farm's settings as the batch reads them (`I2V_*` of the job's runtime environment,
    `I2V_CONFIG`): storage, `egress_allow` (`I2V_EGRESS_ALLOW`), `file_mode`."""
    from .config import load_settings

    try:
        return load_settings(env=dict(os.environ if env is None else env))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def open_batch_storage(env: dict[str, str] | None = None, settings: Any = None):
    """The farm's storage, from the same settings the farm reads (`I2V_STORAGE_URL`, `I2V_S3_*`)."""
    from .storage import StorageUnavailable, open_storage

    env = dict(os.environ if env is None else env)
    try:
        settings = settings or batch_settings(env)
        url = settings.storage_url
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in env and url.startswith("file://") \
                and not Path(url[len("file://"):]).expanduser().is_absolute():
            raise UsageError(
                f"storage is {url}, relative to this Ray job's temporary working directory: the summary "
                "would be lost. Pass the farm's storage to the job, e.g. --runtime-env-json "
                "'{\"env_vars\": {\"I2V_STORAGE_URL\": \"s3://BUCKET\", ...}}'")
        storage = open_storage(settings)
        storage.ensure_ready()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except StorageUnavailable as exc:
        raise UsageError(f"storage is unreachable: {exc}") from None
    return storage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.batch",
        description="Render every row of a manifest (JSON Lines or CSV: image, prompt, request fields) through "
                    "the running farm; resumable, with a summary in the farm's storage.",
        epilog="As a Ray job: ray job submit --working-dir . -- python -m serving.batch manifest.jsonl")
    p.add_argument("manifest", help="JSON Lines (.jsonl) or CSV (.csv) file, relative to the working directory")
    p.add_argument("--out", metavar="PREFIX",
                   help="storage key prefix for the summary (default batches/<manifest stem>/)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="rows in flight on the farm at once (default 4)")
    p.add_argument("--priority", choices=("low", "normal", "high"),
                   help="queue priority of rows that name none (default: the farm's, normal)")
    p.add_argument("--url", default=os.environ.get("I2V_URL", DEFAULT_URL),
                   help=f"farm URL (default {DEFAULT_URL}, env I2V_URL)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="give a row up once this many of its farm jobs failed, across runs (default 3)")
    p.add_argument("--unreachable-timeout", type=float, default=300.0, metavar="S",
                   help="fail the rows that need the farm after it has been unreachable this long (default 300)")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="how long to wait for the farm to answer at start (default 30)")
    p.add_argument("--row-timeout", type=float, default=0, metavar="S",
                   help="fail a row whose farm job has not ended after this long (default 0: wait as long as "
                        "the farm works on it); the job is not canceled, the next run picks it up")
    p.add_argument("--poll", type=float, default=1.0, metavar="S", help="seconds between job status polls (default 1)")
    p.add_argument("--download-timeout", type=float, default=30.0, metavar="S",
                   help="timeout of http(s) image downloads (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001 - `ray job stop` sends SIGTERM, then SIGKILL after 3 s
        stop.signum = signum  # type: ignore[attr-defined]
        stop.set()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, on_signal)
    try:
        if args.concurrency < 1 or args.max_attempts < 1:
            raise UsageError("--concurrency and --max-attempts must be at least 1")
        manifest = Path(args.manifest)
        mrows = read_manifest(manifest)  # before storage and farm: the cheapest mistake first
        settings = batch_settings()
        apply_umask(settings)  # the spool and (file://) summaries: file_mode, like the farm's own files
        storage = open_batch_storage(settings=settings)
        try:
            egress = EgressPolicy.from_settings(settings)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return run_batch(
            manifest, client=FarmClient(args.url, timeout=60), storage=storage, root=Path.cwd(), stop=stop, egress=egress,
            prefix=args.out, concurrency=args.concurrency, priority=args.priority,
            max_attempts=args.max_attempts, unreachable_timeout=args.unreachable_timeout, poll_s=args.poll,
            download_timeout=args.download_timeout, connect_timeout=args.connect_timeout, manifest_rows=mrows,
            row_timeout=args.row_timeout,
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_batch(manifest: str | os.PathLike, *, client: Any, storage: Any, root: Path, out=None,
              stop: threading.Event | None = None, prefix: str | None = None, concurrency: int = 4,
              priority: str | None = None, max_attempts: int = 3, unreachable_timeout: float = 300.0,
              poll_s: float = 1.0, download_timeout: float = 30.0, connect_timeout: float = 30.0,
              manifest_rows: list[ManifestRow] | None = None, row_timeout: float = 0,
              egress: EgressPolicy | None = None, scope: StorageScope | None = None) -> int:
    """Run one batch: check the rows, skip what an earlier run did, render the rest, write the
    summary. Returns the exit code; raises `UsageError` when nothing can run.

    `egress`: the rules for http(s) images (default: nothing beyond them allowed; `main` reads
    `egress_allow` from the settings). `scope`: whose `s3://` keys rows may name (default: the
    client's caller, asked of the farm)."""
    out = out or sys.stdout
    stop = stop or threading.Event()
    manifest = Path(manifest)
    mrows = read_manifest(manifest) if manifest_rows is None else manifest_rows
    if not mrows:
        raise UsageError(f"the manifest {manifest} has no rows")
    prefix = normalize_prefix(prefix or default_prefix(manifest))
    limits = ImageLimits.from_info(check_farm(client, connect_timeout))
    previous = read_previous(storage, prefix)
    egress = egress if egress is not None else EgressPolicy()
    scope = scope if scope is not None else StorageScope(client)
    print(f"batch {manifest} ({len(mrows)} rows) -> farm {client.url}, summary {storage.url}/{prefix}",
          file=out, flush=True)

    with tempfile.TemporaryDirectory(prefix="i2v-batch-") as spool:
        def check(mrow: ManifestRow) -> Row:
            return check_row(mrow, root=root, storage=storage, limits=limits, priority=priority, spool=Path(spool),
                             download_timeout=download_timeout, egress=egress, scope=scope)

        with ThreadPoolExecutor(max_workers=min(8, len(mrows))) as pool:
            rows = []
            for row in pool.map(check, mrows):
                rows.append(row)
                if stop.is_set():
                    pool.shutdown(wait=False, cancel_futures=True)
                    return 128 + getattr(stop, "signum", signal.SIGTERM)
        assign_ids(rows)

        def video_exists(key: str) -> bool | None:
            try:
                return storage.exists(key)
            except Exception:  # noqa: BLE001 - unknown: the same Idempotency-Key finds the same job
                return None

        plan_rows(rows, previous, video_exists, max_attempts)
        run = BatchRun(rows, client, storage, prefix, concurrency=concurrency, poll_s=poll_s,
                       unreachable_timeout=unreachable_timeout, max_attempts=max_attempts,
                       manifest=str(manifest), out=out, stop=stop, row_timeout=row_timeout)
        before = run.counts()
        print(f"{before['pending']} to render, {before['skipped']} already done, {before['invalid']} invalid"
              + (f", {before['failed']} failed too often to retry" if before["failed"] else ""), file=out, flush=True)
        for row in rows:
            if row.status in ("invalid", "failed"):
                print(_row_line(row), file=out, flush=True)
        code = run.run()
    counts = run.counts()
    stopped = stop.is_set()
    print(f"batch {'stopped' if stopped else 'done'}: {counts['succeeded']} succeeded, {counts['failed']} failed, "
          f"{counts['invalid']} invalid, {counts['skipped']} skipped"
          + (f", {counts['running']} running, {counts['pending']} pending" if stopped else "")
          + f" ({counts['rows']} rows); summary: {storage.url}/{prefix}{SUMMARY_ROWS}", file=out, flush=True)
    if stopped and counts["running"]:
        print("rows still rendering keep running on the farm; run the batch again to collect them",
              file=out, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
