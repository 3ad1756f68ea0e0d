"""The job records the job manager writes and shows, typed (`serving.jobs.JobRecord`).

A new job's (or a reused one's) record is built and checked here before the job store gets it
(`JobRecord.new`: a misspelt key or a wrong status is refused, not stored). The manager's other
writes are checked by `JobRecord.check_changes` (`JobManager._update`, `_defer`); what it reads
back is a `JobRecord`, and clients see it as `views.job_view` makes it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..jobs import JobRecord, JobStatus

if TYPE_CHECKING:
    from pipeline.request import GenerationParams


def now() -> str:
    """A record's timestamp (`created_at`, `started_at`, `finished_at`): UTC, ISO 8601."""
    return datetime.now(timezone.utc).isoformat()


def new_job(job_id: str, owner: str, home: str, params: GenerationParams, estimate: dict[str, Any],
            input_info: dict[str, Any], output_size: dict[str, int], prefix: str, created_at: str,
            extra: dict[str, Any] | None = None) -> JobRecord:
    """A submitted job's record, `queued` for its home class. `estimate`: {vram_bytes, seconds,
    seconds_by_class}; `extra`: its `reuse_key` and `webhook` (issue 18), None values left out."""
    return JobRecord.new({
        "id": job_id,
        "owner": owner,
        "status": JobStatus.QUEUED,
        "vram_class": home,
        "node": None,
        "progress": {"step": 0, "total": params.num_inference_steps},
        "params": params.model_dump(),
        "estimate": estimate,
        "prefix": prefix,
        "input": input_info,
        "output_size": output_size,
        "timings": {},
        "peak_vram_bytes": None,
        "result": None,
        "error": None,
        "attempts": 0,
        "home_class": home,
        "created_at": created_at,
        **{k: v for k, v in (extra or {}).items() if v is not None},
    })


def reused_job(job_id: str, source: JobRecord, params: GenerationParams, key: str, owner: str,
               saved: float, webhook: dict[str, Any] | None) -> JobRecord:
    """A new job, `succeeded` at once with the stored result of `source`, an earlier identical
    job (result reuse, issue 18): no GPU runs it; `saved`: the GPU seconds that spares."""
    at = now()
    steps = params.num_inference_steps
    return JobRecord.new({
        "id": job_id, "owner": owner, "status": JobStatus.SUCCEEDED,
        "vram_class": source.vram_class, "node": None, "progress": {"step": steps, "total": steps},
        "params": params.model_dump(), "estimate": source.estimate, "prefix": source.prefix,
        "input": source.input, "output_size": source.output_size, "timings": {},
        "peak_vram_bytes": None, "result": source.result, "error": None, "attempts": 0,
        "home_class": source.home_class, "created_at": at, "finished_at": at,
        "reused_from": source.reused_from or source.id, "reuse_key": key, "gpu_seconds_saved": round(saved, 3),
        **({"webhook": webhook} if webhook else {}),
    })

