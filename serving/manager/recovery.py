"""Start-up recovery: the queued and running jobs of an earlier run of the farm, read back from
the job store and scheduled again. A restart is not the job's fault: it does not count as a
failed attempt. A job no class holds any more (the classes changed) fails with the reason."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from ..jobs import ACTIVE, ErrorCode, JobDetail, JobRecord, JobStatus
from ..scheduler import NoClassFits, QueuedJob
from .records import now

if TYPE_CHECKING:
    from .core import JobManager

log = logging.getLogger(__name__)


def recover(m: JobManager) -> None:
    """Requeue `m`'s unfinished jobs (a job rendered and waiting for its upload stays as it is:
    its worker's uploader reports when storage has the files); submission order goes on after
    the last one."""
    pending = m.store.with_status(sorted(ACTIVE))
    last = max((r["seq"] for r in pending), default=0)
    m._seq = itertools.count(last + 1)
    for row in pending:
        rec = JobRecord.parse(row)  # typed; a row that is not a job record says which fields are wrong
        if rec.detail == JobDetail.UPLOADING:
            continue
        try:
            home = m.scheduler.place(rec.estimate["vram_bytes"])
            raised = rec.home_class  # an OOM retry moved it to a larger class
            if raised in m.classes and m.classes[raised].memory_gib > m.classes[home].memory_gib:
                home = raised
        except NoClassFits as exc:
            m._ended(m._update(rec.id, status=JobStatus.FAILED, finished_at=now(),
                               error={"code": ErrorCode.NO_CLASS_FITS, "message": exc.message}))
            continue
        job = _queued_job(m, rec, home)
        if rec.status == JobStatus.RUNNING:
            m._update(rec.id, status=JobStatus.QUEUED, node=None, progress=None, note="requeued after a farm restart")
        m.scheduler.requeue(job)
    if pending:
        log.warning("recovered %d unfinished jobs from %s", len(pending), m.store.path)


def _queued_job(m: JobManager, rec: JobRecord, home: str) -> QueuedJob:
    return QueuedJob(
        id=rec.id, vram_bytes=rec.estimate["vram_bytes"],
        seconds=m._run_seconds(rec.estimate["seconds_by_class"]),
        priority=rec.params.get("priority", "normal"), seq=rec.seq, home=home,
        attempts=rec.attempts, caller=rec.owner,
    )
