"""No lost results: a finished job's files wait in a node-local spool until storage has them.

A worker writes a job's files (video, params.json, poster, input) into `<spool_dir>/<job id>/`
with a `manifest.json`, then uploads them. Each upload is verified (size, and the MD5 where the
store's ETag is one) before the spool copy is deleted. When the store is unreachable the files
stay spooled and a background thread in the worker retries with exponential backoff (1 s doubling
to 60 s); when they are in, it tells the job manager, which only then marks the job `succeeded`.
A replica that starts finds spooled jobs left by an earlier replica on its node and takes them
over (a lock file makes sure only one replica uploads a job). The spool holds callers' inputs and
videos: its directories get the dir mode and its files `file_mode` (0700/0600 by default).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .files import DEFAULT_FILE_MODE, atomic_write, dir_mode_for, make_dirs, set_mode
from .storage import Storage, StorageUnavailable, content_type, file_md5

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0


class UploadMismatch(StorageUnavailable):
    """The stored object differs from the spooled file (size or checksum)."""


class Spool:
    def __init__(self, root: str | os.PathLike, storage: Storage, file_mode: int = DEFAULT_FILE_MODE):
        self.root = Path(root).expanduser()
        self.file_mode = file_mode
        self.dir_mode = dir_mode_for(file_mode)
        make_dirs(self.root, self.dir_mode, tighten=True)  # the farm's own directory
        self.storage = storage
        self._locks: dict[str, int] = {}

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    # --- writing and uploading -------------------------------------------------------------

    def add(self, job_id: str, prefix: str, files: dict[str, Path | bytes], result: dict[str, Any]) -> Path:
        """Put a job's files (name -> path or bytes) in the spool, with a manifest; lock it."""
        d = self.job_dir(job_id)
        make_dirs(d, self.dir_mode)
        self._lock(job_id)
        entries = []
        for name, src in files.items():
            dest = d / name
            if isinstance(src, bytes):
                atomic_write(dest, src, self.file_mode, durable=False)
            else:
                if Path(src) != dest:
                    shutil.move(str(src), dest)
                set_mode(dest, self.file_mode)  # made by someone else (ffmpeg): the spool's mode
            entries.append({"name": name, "key": prefix + name, "size": dest.stat().st_size, "md5": file_md5(dest)})
        manifest = {"job_id": job_id, "prefix": prefix, "files": entries, "result": result, "uploaded": False,
                    "spooled_at": time.time()}
        _write_json(d / MANIFEST, manifest, self.file_mode)
        return d

    def upload(self, job_id: str) -> dict[str, Any]:
        """Upload a spooled job's files and verify them; raises StorageUnavailable on failure.

        Returns the manifest (with `uploaded: True`). The spool copy stays until `remove()`.
        """
        d = self.job_dir(job_id)
        manifest = json.loads((d / MANIFEST).read_text())
        if not manifest["uploaded"]:
            self.storage.ensure_ready()
            for entry in manifest["files"]:
                path = d / entry["name"]
                put = self.storage.put_file(entry["key"], path, content_type(entry["name"]))
                self._verify(entry, put)
            manifest["uploaded"] = True
            _write_json(d / MANIFEST, manifest, self.file_mode)
        return manifest

    def _verify(self, entry: dict[str, Any], put) -> None:
        stored = self.storage.stat(entry["key"])
        if stored is None or stored.size != entry["size"]:
            raise UploadMismatch(f"{entry['key']}: stored {stored.size if stored else 'nothing'}, "
                                 f"expected {entry['size']} bytes")
        etag = (stored.etag or "").strip('"')
        if etag and "-" not in etag and etag != entry["md5"]:  # multipart ETags are not MD5s
            raise UploadMismatch(f"{entry['key']}: checksum {etag} != {entry['md5']}")

    def remove(self, job_id: str) -> None:
        d = self.job_dir(job_id)
        fd = self._locks.pop(job_id, None)
        shutil.rmtree(d, ignore_errors=True)
        if fd is not None:
            os.close(fd)

    # --- recovery ----------------------------------------------------------------------------

    def claim_orphans(self) -> list[str]:
        """Spooled jobs no live replica holds (left by a replica that died): lock and return them."""
        found = []
        for d in sorted(p for p in self.root.iterdir() if (p / MANIFEST).is_file()):
            if d.name not in self._locks and self._try_lock(d.name):
                found.append(d.name)
        return found

    def _lock(self, job_id: str) -> None:
        if job_id not in self._locks and not self._try_lock(job_id):
            raise RuntimeError(f"spooled job {job_id} is held by another process")

    def _try_lock(self, job_id: str) -> bool:
        fd = os.open(self.job_dir(job_id) / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._locks[job_id] = fd
        return True


class BackgroundUploader:
    """Retries spooled jobs until storage takes them, then calls `on_uploaded(job_id, result)`."""

    def __init__(self, spool: Spool, on_uploaded: Callable[[str, dict[str, Any]], None],
                 on_failure: Callable[[str, Exception], None] | None = None):
        self.spool = spool
        self.on_uploaded = on_uploaded
        self.on_failure = on_failure
        self._pending: dict[str, float] = {}  # job id -> next attempt (monotonic)
        self._backoff: dict[str, float] = {}
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="spool-uploader", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        with self._cv:
            self._backoff.setdefault(job_id, BACKOFF_START_S)
            self._pending[job_id] = time.monotonic() + self._backoff[job_id]
            self._cv.notify()

    def pending(self) -> list[str]:
        with self._cv:
            return sorted(self._pending)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                job_id, due = min(self._pending.items(), key=lambda kv: kv[1])
                delay = due - time.monotonic()
                if delay > 0:
                    self._cv.wait(timeout=delay)
                    continue
                del self._pending[job_id]
            try:
                manifest = self.spool.upload(job_id)
                self.on_uploaded(job_id, manifest["result"])
            except Exception as exc:  # noqa: BLE001 - storage or the manager down: try again later
                if self.on_failure:
                    self.on_failure(job_id, exc)
                log.warning("job %s: upload/notify failed (%s); retrying", job_id, exc)
                with self._cv:
                    self._backoff[job_id] = min(self._backoff.get(job_id, BACKOFF_START_S) * 2, BACKOFF_MAX_S)
                    self._pending[job_id] = time.monotonic() + self._backoff[job_id]
                continue
            self.spool.remove(job_id)
            with self._cv:
                self._backoff.pop(job_id, None)


def _write_json(path: Path, data: dict[str, Any], mode: int = DEFAULT_FILE_MODE) -> None:
    atomic_write(path, json.dumps(data, indent=2), mode)
