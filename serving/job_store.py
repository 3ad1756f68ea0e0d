"""The durable job store: a job that got `202` is never lost.

Records live in a SQLite file (WAL mode, every write committed before it is acknowledged), owned
by the job manager on the head node. A restarted farm reads back the queued and running jobs and
schedules them again. A record is a JSON document with the job fields clients see (`id`,
`status`, `vram_class`, `node`, `progress`, `params`, `estimate`, `timings`, `peak_vram_bytes`,
`result`, `error`, `created_at`, ...) plus a few indexed columns for lookups and paging.

The database and its `-wal`/`-shm` files hold every caller's prompts and parameters: they are made
with `file_mode` (0600 by default) before SQLite opens them (SQLite gives -wal/-shm the mode of
the database file) and chmod'ed again after opening, so a store made by an older farm is tightened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
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
                    return json.loads(row[0]), False
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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise KeyError(job_id)
                record = {**json.loads(row[0]), **fields}
                self._db.execute(
                    "UPDATE jobs SET status = ?, data = ? WHERE id = ?",
                    (record["status"], json.dumps(record), job_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return record

    # --- reads ----------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def find_by_key(self, idempotency_key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return json.loads(row[0]) if row else None

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
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        page = [json.loads(data) for _, data in rows[:limit]]
        next_cursor = rows[limit - 1][0] if len(rows) > limit else None
        return page, next_cursor

    def with_status(self, statuses: Iterable[str]) -> list[dict[str, Any]]:
        """All jobs in these statuses, oldest first (restart recovery)."""
        statuses = list(statuses)
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT data FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count_active(self, owner: str) -> int:
        """Queued and running jobs of one owner."""
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ({','.join('?' * len(ACTIVE))})",
                (owner, *sorted(ACTIVE)),
            ).fetchone()
        return row[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | dict(rows)


def _status(value: object) -> str:
    """A status as stored: the plain string of a `JobStatus` (ValueError for anything else)."""
    if value not in STATUSES:
        raise ValueError(f"bad status {value!r}")
    return JobStatus(value).value
