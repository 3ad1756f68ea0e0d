"""One run of a batch: check the rows, skip what an earlier run did, submit and poll the rest
through the farm with at most `concurrency` in flight, and keep the summary current.

Design: docs/design/batch.md.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..egress import EgressPolicy
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    SLOW_ROW_LOG_S,
    STATUSES,
    SUMMARY_EVERY_S,
    TERMINAL,
    RowError,
    Stopped,
    UsageError,
    _now,
    _sha256,
)
from .farm import FarmLink, _error, _job_error, _message, check_farm
from .images import ImageLimits
from .manifest import ManifestRow, read_manifest
from .report import SUMMARY_ROWS, _LogLines, _row_line, default_prefix, normalize_prefix, put_summary, read_previous
from .rows import Row, _gave_up, assign_ids, check_row, idempotency_key, plan_rows
from .scope import StorageScope


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
        from ..storage import StorageUnavailable

        with self.lock:
            lines = [json.dumps(r.record()) for r in sorted(self.rows, key=lambda r: r.line)]
            counts = self.counts()
        summary = {
            "manifest": self.manifest, "prefix": self.prefix, "farm": self.client.url,
            "started_at": self.started_at, "updated_at": _now(), "finished": finished, "stopped": stopped,
            "exit_code": exit_code, "counts": counts,
        }
        try:
            put_summary(self.storage, self.prefix, lines, summary)
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
    if not 0 < poll_s < float("inf"):
        raise UsageError(f"poll_s must be a number of seconds above 0, not {poll_s!r} (0 would busy-loop)")
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
                    print(f"batch stopped while checking rows ({len(rows)} of {len(mrows)} checked): nothing was "
                          f"submitted; the summary at {storage.url}/{prefix} is as the last run left it",
                          file=out, flush=True)
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
