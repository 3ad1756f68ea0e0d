"""The job as clients see it: the reply to a submission, `GET /v1/jobs/{id}`, the list and a
webhook's body all come from `job_view` of the stored record (a `JobRecord`), with a queued job's
place in its class queue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..jobs import JobRecord, JobStatus

if TYPE_CHECKING:
    from cluster.vram_classes import ClassSet

    from ..scheduler import Scheduler
    from .attempts import Running


def job_view(rec: JobRecord, run: Running | None, queue_position: int | None) -> dict[str, Any]:
    """The job as clients see it: the stored record without `seq` and the per-class seconds of its
    estimate; a running job's live progress and preview (kept in memory, `run`); a queued job's
    place in its class queue (`queue_position`, 1 = next)."""
    out = rec.to_dict()
    out.pop("seq", None)
    out["estimate"] = {k: v for k, v in rec.estimate.items() if k != "seconds_by_class"}
    if rec.status == JobStatus.RUNNING and run is not None and run.progress:
        out["progress"] = dict(run.progress)
    if rec.status == JobStatus.RUNNING and run is not None and run.preview is not None:
        out["preview"] = {k: run.preview[k] for k in ("step", "total", "seq")}  # the image: GET .../preview
    if rec.status == JobStatus.QUEUED:
        out["queue_position"] = queue_position
    return out


def queue_positions(scheduler: Scheduler, classes: ClassSet) -> dict[str, int]:
    """Queue position of every queued job (one pass over each class's kept order, for a whole page)."""
    return {job.id: i + 1 for c in classes.names for i, job in enumerate(scheduler.queued(c))}
