"""A job's attempts on workers: dispatching queued jobs into free slots, the worker call, the
events it streams back, and how an attempt ends: the job succeeds, is retried (a worker died; out
of memory: on the next larger class) or fails with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..jobs import (
    CanceledEvent,
    DoneEvent,
    FailureKind,
    JobDetail,
    JobRecord,
    JobStatus,
    PreviewEvent,
    ProgressEvent,
    RenderRequest,
    StartedEvent,
    parse_worker_event,
)
from ..scheduler import Fail, QueuedJob, Retry
from .records import now

if TYPE_CHECKING:
    from .core import JobManager

log = logging.getLogger(__name__)

PROGRESS_SAVE_S = 2.0


@dataclass
class Running:
    """A dispatched job's attempt (the manager's `running`, by job id)."""

    job: QueuedJob
    vram_class: str
    task: asyncio.Task | None = None
    stream: Any = None
    cancel_requested: bool = False
    progress: dict[str, int] = field(default_factory=dict)
    node: str | None = None
    progress_saved_at: float = 0.0
    started: float = field(default_factory=time.monotonic)  # when it was dispatched (estimates of time left)
    steps_counted: int = 0  # denoising steps of this attempt counted in the metrics
    record: JobRecord | None = None  # the job's record as this attempt started it
    preview: dict[str, Any] | None = None  # the latest live preview (memory only; gone with the job)


class _InputMissing(Exception):
    pass


class Attempts:
    """The job manager's running jobs. Works on its manager's state (`running`, the job store, the
    scheduler, the metrics, the workers); one per manager."""

    def __init__(self, manager: JobManager):
        self.m = manager

    def dispatch(self) -> None:
        """Start the queued jobs the scheduler assigns to the classes' free slots."""
        m = self.m
        capacity = m._capacity_now()
        free = capacity.free_slots()
        if not any(free.values()):
            return
        busy = capacity.seconds_left() if m.settings.spill_rule == "earliest_finish" else None
        for job, vram_class in m.scheduler.assign(free, busy=busy):
            log.debug("dispatch %s (home %s) -> %s; free slots %s", job.id, job.home, vram_class, free)
            run = Running(job=job, vram_class=vram_class)
            m.running[job.id] = run
            rec = JobRecord.parse(m.store.get(job.id))
            # the estimate follows the job: after a spill, seconds on the class it runs on
            by_class = rec.estimate["seconds_by_class"]
            estimate = {**rec.estimate, "seconds": by_class.get(vram_class, rec.estimate["seconds"])}
            started = dict(status=JobStatus.RUNNING, vram_class=vram_class, started_at=now(),
                           spilled=vram_class != job.home, node=None, estimate=estimate,
                           progress={"step": 0, "total": None})
            m._defer(job.id, **started)  # checked; written with the tick's other changes (one commit)
            rec = run.record = rec.model_copy(update=started)
            m.metrics.job_started(job.id, job.home, rec.created_at)
            run.task = asyncio.get_running_loop().create_task(self.execute(run, rec))

    async def execute(self, run: Running, rec: JobRecord) -> None:
        """One attempt: read the job's input, call a worker of its class and apply its events."""
        import ray
        from ray.serve.exceptions import RequestCancelledError

        m, job = self.m, run.job
        kind: str | None = None  # a FailureKind, or "done"/"canceled" (how the attempt ended)
        message = ""
        started = time.monotonic()
        try:
            try:
                image = await asyncio.to_thread(m._inbox_path(job.id).read_bytes)
            except FileNotFoundError:
                kind, message = FailureKind.ERROR, "the job's input image is missing from the job store's inbox"
                raise _InputMissing from None
            payload = RenderRequest(id=job.id, params=rec.params, image=image, attempt=job.attempts + 1,
                                    prefix=rec.prefix, input_name=rec.input["name"]).to_dict()
            if run.cancel_requested:  # canceled while its input was read: never call a worker
                raise asyncio.CancelledError
            run.stream = m.workers[run.vram_class].options(**m.lora.route(rec.params)).run.remote(payload)
            async for event in run.stream:
                outcome = self.on_event(run, event, started)
                if outcome is not None:
                    kind, message = outcome, event.get("message", "")
                    if event.get("event") == "canceled":
                        message = "the worker stopped the job without a cancel request"
            if kind is None and not run.cancel_requested:  # the stream ended without a final event
                kind, message = FailureKind.WORKER_DIED, "the worker's stream ended before the job finished"
        except _InputMissing:
            pass
        except (RequestCancelledError, asyncio.CancelledError):
            kind = "canceled"
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            kind, message = FailureKind.WORKER_DIED, f"worker died: {type(exc).__name__}"
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: worker call failed", job.id)
            kind = "canceled" if run.cancel_requested else FailureKind.WORKER_DIED
            message = f"{type(exc).__name__}: {exc}"
        finally:
            m.running.pop(job.id, None)
            m._wake.set()
        m.metrics.attempt_ended(run.vram_class, "canceled" if run.cancel_requested else kind,
                                time.monotonic() - started)
        if run.cancel_requested or kind in ("done", "canceled"):
            return
        self.on_failure(run, FailureKind(kind), message)

    def on_event(self, run: Running, event: dict[str, Any], started: float) -> str | None:
        """Apply one worker event; returns a failure kind (`FailureKind.OOM`, `.ERROR`; a `canceled`
        event nobody asked for: `.WORKER_DIED`, so the job runs again) or "done"/None. A malformed
        event raises `WorkerEventError`."""
        m, job = self.m, run.job
        ev = parse_worker_event(event)
        steps = 1
        if isinstance(ev, ProgressEvent):  # coalesced by the worker: count the steps since the last one
            steps, run.steps_counted = ev.step - run.steps_counted, max(run.steps_counted, ev.step)
        m.metrics.worker_event(run.vram_class, event, steps=steps)
        m.lora.count_loads(run.vram_class, event)
        if run.cancel_requested:
            return None
        if isinstance(ev, StartedEvent):
            run.node = ev.node
            m._defer(job.id, node=ev.node, replica=ev.replica)
        elif isinstance(ev, ProgressEvent):
            # Kept in memory (what GET shows); written to the store at most every PROGRESS_SAVE_S:
            # a durable write per denoising step halved the manager's throughput.
            run.progress = {"step": ev.step, "total": ev.total}
            at = time.monotonic()
            if at - run.progress_saved_at >= PROGRESS_SAVE_S or ev.step == ev.total:
                m._defer(job.id, progress=run.progress)
                run.progress_saved_at = at
        elif isinstance(ev, PreviewEvent):
            self.on_preview(run, ev)
        elif isinstance(ev, DoneEvent):
            run_s = round(time.monotonic() - started, 3)
            self.on_done(run, ev.model_copy(update={"timings": {**ev.timings, "run": run_s}}))
            return "done"
        elif isinstance(ev, CanceledEvent):  # nobody asked (a requested cancel returned above)
            return FailureKind.WORKER_DIED  # the worker gave the job up: run it again
        else:  # an ErrorEvent
            return ev.kind
        return None

    def on_preview(self, run: Running, ev: PreviewEvent) -> None:
        """Keep the job's latest preview (replacing the one before) and count it."""
        seq = run.preview["seq"] + 1 if run.preview else 1
        run.preview = {"step": ev.step, "total": ev.total, "seq": seq, "media_type": ev.media_type,
                       "image": ev.image}
        self.m.metrics.preview_sent(run.vram_class, ev.seconds)

    def on_done(self, run: Running, done: DoneEvent) -> None:
        """Rendered: the job succeeds, or, when storage was unreachable, waits for its worker's
        uploader (`running`, detail `uploading`; `JobManager.upload_finished`)."""
        job = run.job
        rec = run.record or JobRecord.parse(self.m.store.get(job.id))  # its params: no read of the store
        if done.uploaded:
            self.succeed(job.id, rec, done, job.attempts + 1)
            return
        steps = rec.params["num_inference_steps"]
        self.m._update(job.id, detail=JobDetail.UPLOADING, attempts=job.attempts + 1,
                       upload_error=done.upload_error, timings=done.timings,
                       peak_vram_bytes=done.peak_vram_bytes, progress={"step": steps, "total": steps})

    def succeed(self, job_id: str, rec: JobRecord, done: DoneEvent, attempts: int) -> None:
        m = self.m
        steps = rec.params["num_inference_steps"]
        rec = m._update(
            job_id, status=JobStatus.SUCCEEDED, detail=None, finished_at=now(), result=done.result,
            timings=done.timings, peak_vram_bytes=done.peak_vram_bytes, device=done.device,
            attempts=attempts, progress={"step": steps, "total": steps},
        )
        m.metrics.job_finished(rec.to_dict())
        m._ended(rec)
        m._inbox_path(job_id).unlink(missing_ok=True)

    def on_failure(self, run: Running, kind: FailureKind, message: str) -> None:
        """The attempt failed: the scheduler decides whether the job is retried or fails."""
        m, job = self.m, run.job
        if kind == FailureKind.OOM:
            job.home = run.vram_class  # retry on the class above the one that ran out
        decision = m.scheduler.on_failure(job, kind, message)
        m.metrics.attempt_failed(job.id, run.vram_class, kind, retried=isinstance(decision, Retry))
        failure = {"code": kind.code, "message": message,
                   "vram_class": run.vram_class, "node": run.node}
        row = m.store.get(job.id)
        history = [*(JobRecord.parse(row).failures if row else []), failure]
        if isinstance(decision, Retry):
            log.warning("job %s: %s on %s, retrying on %s", job.id, kind, run.vram_class, decision.vram_class)
            m._update(job.id, status=JobStatus.QUEUED, vram_class=decision.vram_class, home_class=job.home,
                      node=None, attempts=job.attempts, failures=history, progress={"step": 0, "total": None})
            m.scheduler.requeue(job)
        else:
            assert isinstance(decision, Fail)
            rec = m._update(job.id, status=JobStatus.FAILED, finished_at=now(), attempts=job.attempts,
                            failures=history, error={"code": decision.code, "message": decision.message})
            m.metrics.job_finished(rec.to_dict())
            m._ended(rec)
            m._inbox_path(job.id).unlink(missing_ok=True)
