"""The durable job store: a job that got `202` is never lost.

Records live in a SQLite file (WAL mode, every write committed before it is acknowledged), owned
by the job manager on the head node. What a restart may lose without harm (a job's start, node and
progress: a restart requeues running jobs) is `defer`red and written in one transaction per
dispatch tick, or with the next `update`/`create`: one commit (one fsync) for many changes. A
restarted farm reads back the queued and running jobs and schedules them again. A record is a
JSON document with the job fields clients see (`id`, `status`, `vram_class`, `node`, `progress`,
`params`, `estimate`, `timings`, `peak_vram_bytes`, `result`, `error`, `created_at`, ...) plus a
few indexed columns for lookups and paging.

The database and its `-wal`/`-shm` files hold every caller's prompts and parameters: they are made
with `file_mode` (0600 by default) before SQLite opens them (SQLite gives -wal/-shm the mode of
the database file) and chmod'ed again after opening, so a store made by an older farm is tightened.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .files import DEFAULT_FILE_MODE, dir_mode_for, make_dirs, set_mode
from .jobs import ACTIVE, FINISHED, JobStatus

STATUSES = tuple(s.value for s in JobStatus)
TERMINAL = FINISHED  # the one definition: serving.jobs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    owner TEXT NOT NULL DEFAULT 'anonymous',
    created_at TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status, seq);
"""


class JobStore:
    """Thread-safe; one process writes (the job manager), any may read."""

    def __init__(self, path: str | Path, file_mode: int = DEFAULT_FILE_MODE):
        self.path = Path(path)
        self.file_mode = file_mode
        make_dirs(self.path.parent, dir_mode_for(file_mode))
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}  # job id -> fields `defer`red, not yet written
        if not self.path.exists():  # SQLite would create it 0644 (& ~umask), and -wal/-shm alike
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, file_mode))
        self._set_modes()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._set_modes()  # -wal and -shm exist now
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if columns and "owner" not in columns:  # a store made before tokens existed
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT 'anonymous'")
        self._db.executescript(_SCHEMA)

    def files(self) -> list[Path]:
        """The database file and SQLite's companions (those that exist)."""
        return [p for p in self._all_files() if p.exists()]

    def _all_files(self) -> list[Path]:
        return [self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm", "-journal"))]

    def _set_modes(self) -> None:
        for p in self._all_files():
            set_mode(p, self.file_mode)

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._db.close()

    # --- writes ---------------------------------------------------------------------------

    def create(self, record: dict[str, Any], idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Insert a new job; with an `idempotency_key` already used, return that job instead.

        Returns (record, created).
        """
        record = {**record, "status": _status(record.get("status"))}
        with self._lock:
            if idempotency_key is not None:
                row = self._db.execute(
                    "SELECT data FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row:
                    return self._merged(json.loads(row[0])), False
            with self._transaction():  # one commit (one fsync) for the job and any deferred fields
                self._write_pending()
                cur = self._db.execute(
                    "INSERT INTO jobs (id, status, idempotency_key, owner, created_at, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (record["id"], record["status"], idempotency_key, record.get("owner", "anonymous"),
                     record["created_at"], "{}"),
                )
                record = {**record, "seq": cur.lastrowid}
                self._db.execute("UPDATE jobs SET data = ? WHERE id = ?", (json.dumps(record), record["id"]))
            return record, True

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the record (top level) and return the new record."""
        if "status" in fields:
            fields["status"] = _status(fields["status"])
        with self._lock, self._transaction():  # deferred fields go in the same commit
            self._write_pending()
            return self._write(job_id, fields)

    def defer(self, job_id: str, **fields: Any) -> None:
        """Merge `fields` into the record like `update`, but write them later, together with other
        deferred fields, in one transaction: at the next `flush`, `update` or `create` (the job
        manager flushes once per dispatch tick). For what a restart may lose without harm (a job
        `running`, its node, its progress: a restart requeues running jobs); `get` sees them at once,
        the other reads flush first."""
        if "status" in fields:
            fields["status"] = _status(fields["status"])
        with self._lock:
            self._pending.setdefault(job_id, {}).update(fields)

    def flush(self) -> int:
        """Write every deferred field in one transaction; returns the number of jobs written."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        if not self._pending:
            return 0
        # Committed without an fsync of its own (what may be lost without harm): the next commit
        # of a creation or an end (synchronous=FULL) makes it durable with itself.
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._transaction():
                return self._write_pending()
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _write_pending(self) -> int:
        pending, self._pending = self._pending, {}
        for job_id, fields in pending.items():
            try:
                self._write(job_id, fields)
            except KeyError:  # a job that is gone (never happens: jobs are not deleted)
                continue
        return len(pending)

    def _write(self, job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        row = self._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        record = {**json.loads(row[0]), **fields}
        self._db.execute("UPDATE jobs SET status = ?, data = ? WHERE id = ?",
                         (record["status"], json.dumps(record), job_id))
        return record

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error, deferred fields kept); the caller
        holds `_lock`."""
        pending = dict(self._pending)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._pending = pending
            raise
        self._db.execute("COMMIT")

    def _merged(self, record: dict[str, Any]) -> dict[str, Any]:
        pending = self._pending.get(record["id"])
        return {**record, **pending} if pending else record

    # --- reads ----------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._merged(json.loads(row[0])) if row else None

    def find_by_key(self, idempotency_key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
            return self._merged(json.loads(row[0])) if row else None

    def list(
        self, status: str | None = None, limit: int = 50, cursor: int | None = None, owner: str | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first, optionally one owner's. `cursor` is the `next_cursor` of the previous page."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if cursor is not None:
            where.append("seq < ?")
            args.append(cursor)
        sql = "SELECT seq, data FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            self._flush_locked()
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        page = [json.loads(data) for _, data in rows[:limit]]
        next_cursor = rows[limit - 1][0] if len(rows) > limit else None
        return page, next_cursor

    def with_status(self, statuses: Iterable[str]) -> list[dict[str, Any]]:
        """All jobs in these statuses, oldest first (restart recovery)."""
        statuses = list(statuses)
        marks = ",".join("?" * len(statuses))
        with self._lock:
            self._flush_locked()
            rows = self._db.execute(
                f"SELECT data FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count_active(self, owner: str) -> int:
        """Queued and running jobs of one owner. Deferred changes are flushed first only when one
        leaves the active statuses (never, as the manager defers: a start is queued -> running, an
        end is written at once): a submission's count then costs no commit."""
        with self._lock:
            if any(f.get("status", JobStatus.RUNNING.value) not in ACTIVE for f in self._pending.values()):
                self._flush_locked()
            row = self._db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ({','.join('?' * len(ACTIVE))})",
                (owner, *sorted(ACTIVE)),
            ).fetchone()
        return row[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            self._flush_locked()
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | dict(rows)

    # --- issue 18: result reuse and webhook deliveries ------------------------------------------
    # Kept apart from the job writes above: the reuse key lives in the record's JSON (`reuse_key`),
    # found through an index on that expression; webhook deliveries have their own table, so a
    # pending delivery outlives a farm restart.

    def _issue18_schema(self) -> None:
        if getattr(self, "_issue18_ready", False):
            return
        with self._lock:
            self._db.executescript(_ISSUE18_SCHEMA)
        self._issue18_ready = True

    def find_reusable(self, reuse_key: str, owner: str | None = None, limit: int = 5) -> list[dict[str, Any]]:
        """Succeeded jobs with this reuse key, newest first (`owner`: only that caller's)."""
        self._issue18_schema()
        sql = (f"SELECT data FROM jobs WHERE {_REUSE_EXPR} = ? AND status = ?"
               + (" AND owner = ?" if owner is not None else "") + " ORDER BY seq DESC LIMIT ?")
        args: tuple[Any, ...] = (reuse_key, JobStatus.SUCCEEDED.value, *((owner,) if owner is not None else ()), limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def add_delivery(self, job_id: str, event: str, url: str, next_at: float) -> int:
        """Queue one webhook delivery (durable); returns its id."""
        self._issue18_schema()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO webhook_deliveries (job_id, event, url, state, attempts, created_at, next_at) "
                "VALUES (?, ?, ?, 'pending', 0, ?, ?)", (job_id, event, url, next_at, next_at))
            return int(cur.lastrowid)

    def due_deliveries(self, now: float, limit: int = 64) -> list[dict[str, Any]]:
        """Pending deliveries whose next attempt is due, oldest first."""
        self._issue18_schema()
        with self._lock:
            cur = self._db.execute(
                "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND next_at <= ? ORDER BY next_at, id "
                "LIMIT ?", (now, limit))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def next_delivery_at(self) -> float | None:
        """When the earliest pending delivery is due (None: none pending)."""
        self._issue18_schema()
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM webhook_deliveries WHERE state = 'pending'").fetchone()
        return row[0]

    def update_delivery(self, delivery_id: int, **fields: Any) -> None:
        """Set columns of a delivery (`state`, `attempts`, `next_at`, `last_status`, `last_error`,
        `delivered_at`)."""
        allowed = {"state", "attempts", "next_at", "last_status", "last_error", "delivered_at"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown delivery fields {sorted(unknown)}")
        self._issue18_schema()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE webhook_deliveries SET {sets} WHERE id = ?", (*fields.values(), delivery_id))

    def ended_without_delivery(self, recent: int = 10000) -> list[dict[str, Any]]:
        """Finished jobs (among the `recent` newest) with a webhook but no delivery recorded: the
        farm stopped between a job's end and queueing its delivery."""
        self._issue18_schema()
        finished = sorted(s.value for s in FINISHED)
        with self._lock:
            rows = self._db.execute(
                f"SELECT data FROM jobs WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM jobs) - ? "
                f"AND status IN ({','.join('?' * len(finished))}) "
                "AND json_extract(data, '$.webhook') IS NOT NULL AND json_extract(data, '$.deliveries') IS NULL "
                "ORDER BY seq", (recent, *finished)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        self._issue18_schema()
        with self._lock:
            cur = self._db.execute("SELECT * FROM webhook_deliveries WHERE job_id = ? ORDER BY id", (job_id,))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]


#: The reuse key of a job record (issue 18), as the index and the lookups spell it.
_REUSE_EXPR = "json_extract(data, '$.reuse_key')"
_ISSUE18_SCHEMA = f"""
CREATE INDEX IF NOT EXISTS jobs_reuse ON jobs ({_REUSE_EXPR}, status, seq);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id);
"""


def _status(value: object) -> str:
    """A status as stored: the plain string of a `JobStatus` (ValueError for anything else)."""
    if value not in STATUSES:
        raise ValueError(f"bad status {value!r}")
    return JobStatus(value).value
