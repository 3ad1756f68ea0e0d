"""The job manager: owns the durable job store and the scheduler, and drives the workers.

One replica, on the head node (it asks for a sliver of the `i2v_head` resource, because the job
store is a file there). Its loop: read how many worker replicas of each class are running, ask
the scheduler which queued jobs go where, stream each dispatched job from a worker of that
class, and write every change to the job store. A job survives: a worker dying (retried), out
of memory (retried on the next larger class), and a farm restart (queued and running jobs are
read back and scheduled again).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monitoring.metrics import FarmMetrics
from pipeline.errors import I2VError
from pipeline.request import parse_params

from .backends import SIM
from .config import FarmSettings
from .files import apply_umask, atomic_write, make_dirs
from .job_store import JobStore
from .jobs import (
    ACTIVE,
    CanceledEvent,
    DoneEvent,
    ErrorCode,
    FailureKind,
    JobDetail,
    JobStatus,
    ProgressEvent,
    RenderRequest,
    StartedEvent,
    is_finished,
    parse_worker_event,
)
from .scheduler import Backlogged, Fail, NoClassFits, QueuedJob, Retry, Scheduler, estimate_request
from .storage import INPUT_NAMES, job_prefix

log = logging.getLogger(__name__)

REPLICA_REFRESH_S = 1.0
DISPATCH_TICK_S = 0.25
PROGRESS_SAVE_S = 2.0


class FarmError(I2VError):
    """An error the manager answers a request with (carries the HTTP status)."""

    def __init__(self, message: str, *, code: str, http_status: int, field: str | None = None, **extra: Any):
        super().__init__(message, field=field, code=code)
        self.http_status = http_status
        self.extra = extra


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Running:
    job: QueuedJob
    vram_class: str
    task: asyncio.Task | None = None
    stream: Any = None
    cancel_requested: bool = False
    progress: dict[str, int] = field(default_factory=dict)
    node: str | None = None
    progress_saved_at: float = 0.0


class JobManager:
    def __init__(self, settings: dict[str, Any], workers: dict[str, Any]):
        self.settings = FarmSettings.model_validate(settings)
        apply_umask(self.settings)  # files of this process: file_mode (0600), directories 0700
        self.classes = self.settings.active_classes
        self.workers = workers  # class name -> DeploymentHandle of its Worker deployment
        self.store = JobStore(self.settings.job_db, file_mode=self.settings.file_mode_bits)
        self.metrics = FarmMetrics(self.classes)  # served at GET /metrics (monitoring/metrics.py)
        # Inputs wait here, beside the job store on the head node, until a worker has stored
        # them with the results: accepting a job never depends on the object store being up.
        self.inbox = Path(self.settings.job_db).parent / "inbox"
        make_dirs(self.inbox, self.settings.dir_mode_bits, tighten=True)
        self.scheduler = Scheduler(
            self.classes,
            backlog_limit=self.settings.backlog_limit,
            max_attempts=self.settings.max_attempts,
            spill=self.settings.spill,
        )
        self.running: dict[str, Running] = {}
        self.replicas: dict[str, dict[str, int]] = {c: {} for c in self.classes.names}
        self.free_gpus: dict[str, float] = {}
        self._seq = itertools.count(1)
        self._wake = asyncio.Event()
        self._recover()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    # --- start-up -----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Queued and running jobs of an earlier run are scheduled again (a restart is not the
        job's fault: it does not count as a failed attempt)."""
        pending = self.store.with_status(sorted(ACTIVE))
        last = max((r["seq"] for r in pending), default=0)
        self._seq = itertools.count(last + 1)
        for rec in pending:
            if rec.get("detail") == JobDetail.UPLOADING:
                continue  # rendered; its worker's uploader reports when storage has the files
            try:
                home = self.scheduler.place(rec["estimate"]["vram_bytes"])
                raised = rec.get("home_class")  # an OOM retry moved it to a larger class
                if raised in self.classes and self.classes[raised].memory_gib > self.classes[home].memory_gib:
                    home = raised
            except NoClassFits as exc:
                self.store.update(rec["id"], status=JobStatus.FAILED, finished_at=_now(),
                                  error={"code": ErrorCode.NO_CLASS_FITS, "message": exc.message})
                continue
            job = self._queued_job(rec, home)
            if rec["status"] == JobStatus.RUNNING:
                self.store.update(rec["id"], status=JobStatus.QUEUED, node=None, progress=None,
                                  note="requeued after a farm restart")
            self.scheduler.requeue(job)
        if pending:
            log.warning("recovered %d unfinished jobs from %s", len(pending), self.store.path)

    def _run_seconds(self, seconds: dict[str, float]) -> dict[str, float]:
        """How long a job will really take per class (the `sim` model sleeps a fraction of it)."""
        scale = self.settings.sim_time_scale if self.settings.model == SIM else 1.0
        return {k: v * scale for k, v in seconds.items()}

    def _queued_job(self, rec: dict[str, Any], home: str) -> QueuedJob:
        return QueuedJob(
            id=rec["id"], vram_bytes=rec["estimate"]["vram_bytes"],
            seconds=self._run_seconds(rec["estimate"]["seconds_by_class"]),
            priority=rec["params"].get("priority", "normal"), seq=rec["seq"], home=home,
            attempts=rec.get("attempts", 0),
        )

    # --- requests from the API ----------------------------------------------------------------
    # These are `async` on purpose: Serve runs a deployment's plain `def` methods in a thread pool,
    # where they would race the dispatch loop over the scheduler's queues and the running set (a
    # job popped before its record was written was lost). As coroutines without an `await` they
    # run on this replica's event loop, one at a time, between the loop's own steps.

    async def submit(self, fields: dict[str, Any], image: bytes, image_format: str, width: int, height: int,
                     idempotency_key: str | None = None, owner: str = "anonymous",
                     max_active: int | None = None) -> dict[str, Any]:
        """Admit a validated request. Returns {"job", "created"} or {"error", "status", ...}."""
        try:
            return self._submit(fields, image, image_format, width, height,
                                f"{owner}:{idempotency_key}" if idempotency_key else None, owner, max_active)
        except I2VError as exc:
            self.metrics.job_rejected(exc.code)
            return _error_reply(exc)

    def _submit(self, fields, image, image_format, width, height, idempotency_key, owner, max_active):
        if idempotency_key:
            existing = self.store.find_by_key(idempotency_key)
            if existing is not None:  # a retried request: the job made the first time
                return {"job": self._view(existing), "created": False}
        params = parse_params(fields).with_seed()
        if max_active is not None and self.store.count_active(owner) >= max_active:
            raise FarmError(f"{owner!r} already has {max_active} queued or running jobs (the token's limit); "
                            "wait for some to finish", code="too_many_active_jobs", http_status=429,
                            retry_after=30)
        out_w, out_h, vram, seconds = estimate_request(self.classes, params, width, height,
                                                       dtype=self.settings.dtype,
                                                       cpu_offload=self.settings.cpu_offload,
                                                       decode_chunk_size=self.settings.decode_chunk_size)
        try:
            home = self.scheduler.place(vram)
        except NoClassFits as exc:
            raise FarmError(exc.message, code=ErrorCode.NO_CLASS_FITS, http_status=422) from None
        job_id = uuid.uuid4().hex
        seq = next(self._seq)
        queued = QueuedJob(id=job_id, vram_bytes=vram, seconds=self._run_seconds(seconds), priority=params.priority,
                           seq=seq, home=home)
        try:
            self.scheduler.admit(queued, self._capacity())
        except Backlogged as exc:
            raise FarmError(exc.message, code="backlogged", http_status=429, retry_after=exc.retry_after) from None
        try:
            created_at = _now()
            prefix = job_prefix(job_id, created_at)
            input_name = INPUT_NAMES[image_format]
            atomic_write(self._inbox_path(job_id), image, self.settings.file_mode_bits)
            record = {
                "id": job_id,
                "owner": owner,
                "status": JobStatus.QUEUED,
                "vram_class": home,
                "node": None,
                "progress": {"step": 0, "total": params.num_inference_steps},
                "params": params.model_dump(),
                "estimate": {"vram_bytes": vram, "seconds": round(seconds[home], 2),
                             "seconds_by_class": {k: round(v, 2) for k, v in seconds.items()}},
                "prefix": prefix,
                "input": {"key": prefix + input_name, "name": input_name, "width": width, "height": height,
                          "format": image_format, "bytes": len(image)},
                "output_size": {"width": out_w, "height": out_h},
                "timings": {},
                "peak_vram_bytes": None,
                "result": None,
                "error": None,
                "attempts": 0,
                "home_class": home,
                "created_at": created_at,
            }
            record, created = self.store.create(record, idempotency_key=idempotency_key or None)
        except BaseException:
            self.scheduler.remove(job_id)
            self._inbox_path(job_id).unlink(missing_ok=True)
            raise
        if not created:  # same Idempotency-Key (a concurrent retry): the job made the first time
            self.scheduler.remove(job_id)
            self._inbox_path(job_id).unlink(missing_ok=True)
        self._wake.set()
        if created:
            self.metrics.job_submitted(home, params.resolution)
        return {"job": self._view(record), "created": created}

    def _inbox_path(self, job_id: str) -> Path:
        return self.inbox / job_id

    async def upload_finished(self, job_id: str, done: dict[str, Any]) -> bool:
        """A worker's uploader stored a spooled job's results: the job has succeeded."""
        rec = self.store.get(job_id)
        if rec is None or rec["status"] != JobStatus.RUNNING or rec.get("detail") != JobDetail.UPLOADING:
            return False
        self._succeed(job_id, rec, DoneEvent.model_validate(done), rec.get("attempts", 0))
        return True

    async def get(self, job_id: str) -> dict[str, Any] | None:
        rec = self.store.get(job_id)
        return self._view(rec) if rec else None

    async def list(self, status: str | None = None, limit: int = 50, cursor: int | None = None,
                   owner: str | None = None) -> dict[str, Any]:
        jobs, next_cursor = self.store.list(status=status, limit=limit, cursor=cursor, owner=owner)
        positions = self._queue_positions() if any(j["status"] == JobStatus.QUEUED for j in jobs) else {}
        return {"jobs": [self._view(j, positions) for j in jobs], "next_cursor": next_cursor}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        rec = self.store.get(job_id)
        if rec is None:
            return _error_reply(FarmError(f"no job {job_id}", code="not_found", http_status=404))
        if is_finished(rec["status"]):
            return _error_reply(FarmError(
                f"job {job_id} already {rec['status']}; only queued or running jobs can be canceled",
                code="not_cancelable", http_status=409))
        run = self.running.get(job_id)
        if run is not None:
            run.cancel_requested = True
            if run.stream is not None:
                run.stream.cancel()
            # else: its task has not called a worker yet and sees the flag before it would (canceling
            # the task instead could stop it before its first step, leaving the job in `running`)
        else:
            self.scheduler.remove(job_id)
        rec = self.store.update(job_id, status=JobStatus.CANCELED, finished_at=_now(), detail=None,
                                error={"code": ErrorCode.CANCELED, "message": "canceled by request"})
        self.metrics.job_finished(rec)
        self._inbox_path(job_id).unlink(missing_ok=True)
        self._wake.set()
        return {"job": self._view(rec)}

    async def cluster(self) -> dict[str, Any]:
        backlog = self.scheduler.backlog()
        busy = self._busy()
        classes = []
        for c in self.classes:
            states = self.replicas.get(c.name, {})
            scaling = self.settings.workers[c.name]
            classes.append({
                "name": c.name,
                "memory_gib": c.memory_gib,
                "gpu": c.gpu,
                "resource": c.resource,
                "deployment": c.deployment,
                "spill_to": list(self.classes.spill[c.name]),
                "replicas": {"running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0),
                             "min": scaling.min_replicas, "max": scaling.max_replicas},
                "busy": busy.get(c.name, 0),
                "queued": backlog.get(c.name, 0),
                "free_gpus": self.free_gpus.get(c.resource, 0.0),
            })
        return {
            "model": self.settings.model,
            "classes": classes,
            "queue_depth": sum(backlog.values()),
            "running": len(self.running),
            "jobs": self.store.counts(),
            "spill": self.settings.spill,
            "backlog_limit": self.settings.backlog_limit,
        }

    async def ready(self) -> dict[str, Any]:
        running = {c: s.get("RUNNING", 0) for c, s in self.replicas.items()}
        return {"ready": any(running.values()), "replicas": running}

    async def metrics_text(self) -> bytes:
        """Prometheus exposition of the farm's metrics (the ingress serves it at GET /metrics)."""
        return self.metrics.render(await self.cluster(), self.replicas)

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        last_refresh = 0.0
        while True:
            try:
                if time.monotonic() - last_refresh >= REPLICA_REFRESH_S:
                    await self._refresh_replicas()
                    last_refresh = time.monotonic()
                self._dispatch()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("dispatch loop error")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), DISPATCH_TICK_S)
            except asyncio.TimeoutError:
                pass

    async def _refresh_replicas(self) -> None:
        import ray
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = next((a for a in status.applications.values()
                    if any(c.deployment in a.deployments for c in self.classes)), None)
        if app is not None:
            for c in self.classes:
                dep = app.deployments.get(c.deployment)
                self.replicas[c.name] = {str(k.value if hasattr(k, "value") else k): v
                                         for k, v in (dep.replica_states.items() if dep else [])}
        self.free_gpus = {c.resource: ray.available_resources().get(c.resource, 0.0) for c in self.classes}

    def _busy(self) -> dict[str, int]:
        busy: dict[str, int] = {}
        for run in self.running.values():
            busy[run.vram_class] = busy.get(run.vram_class, 0) + 1
        return busy

    def _capacity(self) -> dict[str, int]:
        return {c: s.get("RUNNING", 0) for c, s in self.replicas.items()}

    def _free_slots(self) -> dict[str, int]:
        busy = self._busy()
        backlog = self.scheduler.backlog()
        free = {}
        for c in self.classes:
            states = self.replicas.get(c.name, {})
            running = states.get("RUNNING", 0)
            slots = running - busy.get(c.name, 0)
            # Autoscaling: with work queued, room to grow and a free GPU of this class, hand Serve
            # one job more than it has replicas: its autoscaler then adds a replica.
            total = running + states.get("STARTING", 0)
            if (slots <= 0 and backlog.get(c.name, 0) > 0 and total < self.settings.workers[c.name].max_replicas
                    and busy.get(c.name, 0) <= total
                    and (self.free_gpus.get(c.resource, 0) >= 1 or self.settings.node_autoscaling)):
                slots = 1
            free[c.name] = max(0, slots)
        return free

    def _dispatch(self) -> None:
        free = self._free_slots()
        if not any(free.values()):
            return
        for job, vram_class in self.scheduler.assign(free):
            log.info("dispatch %s (home %s) -> %s; free slots %s", job.id, job.home, vram_class, free)
            run = Running(job=job, vram_class=vram_class)
            self.running[job.id] = run
            estimate = self.store.get(job.id)["estimate"]
            # the estimate follows the job: after a spill, seconds on the class it runs on
            estimate = {**estimate, "seconds": estimate["seconds_by_class"].get(vram_class, estimate["seconds"])}
            rec = self.store.update(job.id, status=JobStatus.RUNNING, vram_class=vram_class, started_at=_now(),
                                    spilled=vram_class != job.home, node=None, estimate=estimate,
                                    progress={"step": 0, "total": None})
            self.metrics.job_started(job.id, job.home, rec.get("created_at"))
            run.task = asyncio.get_running_loop().create_task(self._execute(run, rec))

    async def _execute(self, run: Running, rec: dict[str, Any]) -> None:
        import ray
        from ray.serve.exceptions import RequestCancelledError

        job = run.job
        kind: str | None = None  # a FailureKind, or "done"/"canceled" (how the attempt ended)
        message = ""
        started = time.monotonic()
        try:
            try:
                image = await asyncio.to_thread(self._inbox_path(job.id).read_bytes)
            except FileNotFoundError:
                kind, message = FailureKind.ERROR, "the job's input image is missing from the job store's inbox"
                raise _InputMissing from None
            payload = RenderRequest(id=job.id, params=rec["params"], image=image, attempt=job.attempts + 1,
                                    prefix=rec["prefix"], input_name=rec["input"]["name"]).to_dict()
            if run.cancel_requested:  # canceled while its input was read: never call a worker
                raise asyncio.CancelledError
            run.stream = self.workers[run.vram_class].options(stream=True).run.remote(payload)
            async for event in run.stream:
                outcome = self._on_event(run, event, started)
                if outcome is not None:
                    kind, message = outcome, event.get("message", "")
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
            self.running.pop(job.id, None)
            self._wake.set()
        self.metrics.attempt_ended(run.vram_class, "canceled" if run.cancel_requested else kind,
                                   time.monotonic() - started)
        if run.cancel_requested or kind in ("done", "canceled"):
            return
        self._on_failure(run, FailureKind(kind), message)

    def _on_event(self, run: Running, event: dict[str, Any], started: float) -> str | None:
        """Apply one worker event; returns a failure kind (`FailureKind.OOM`, `.ERROR`) or
        "done"/"canceled"/None. A malformed event raises `WorkerEventError`."""
        job = run.job
        self.metrics.worker_event(run.vram_class, event)
        ev = parse_worker_event(event)
        if run.cancel_requested:
            return None
        if isinstance(ev, StartedEvent):
            run.node = ev.node
            self.store.update(job.id, node=ev.node, replica=ev.replica)
        elif isinstance(ev, ProgressEvent):
            # Kept in memory (what GET shows); written to the store at most every PROGRESS_SAVE_S:
            # a durable write per denoising step halved the manager's throughput.
            run.progress = {"step": ev.step, "total": ev.total}
            now = time.monotonic()
            if now - run.progress_saved_at >= PROGRESS_SAVE_S or ev.step == ev.total:
                self.store.update(job.id, progress=run.progress)
                run.progress_saved_at = now
        elif isinstance(ev, DoneEvent):
            ev = ev.model_copy(update={"timings": {**ev.timings, "run": round(time.monotonic() - started, 3)}})
            rec = self.store.get(job.id)
            if ev.uploaded:
                self._succeed(job.id, rec, ev, job.attempts + 1)
            else:  # rendered, but storage is unreachable: the files wait in the worker's spool
                self.store.update(job.id, detail=JobDetail.UPLOADING, attempts=job.attempts + 1,
                                  upload_error=ev.upload_error, timings=ev.timings,
                                  peak_vram_bytes=ev.peak_vram_bytes,
                                  progress={"step": rec["params"]["num_inference_steps"],
                                            "total": rec["params"]["num_inference_steps"]})
            return "done"
        elif isinstance(ev, CanceledEvent):
            return "canceled"
        else:  # an ErrorEvent
            return ev.kind
        return None

    def _succeed(self, job_id: str, rec: dict[str, Any], done: DoneEvent, attempts: int) -> None:
        steps = rec["params"]["num_inference_steps"]
        self.store.update(
            job_id, status=JobStatus.SUCCEEDED, detail=None, finished_at=_now(), result=done.result,
            timings=done.timings, peak_vram_bytes=done.peak_vram_bytes, device=done.device,
            attempts=attempts, progress={"step": steps, "total": steps},
        )
        self.metrics.job_finished(self.store.get(job_id))
        self._inbox_path(job_id).unlink(missing_ok=True)

    def _on_failure(self, run: Running, kind: FailureKind, message: str) -> None:
        job = run.job
        if kind == FailureKind.OOM:
            job.home = run.vram_class  # retry on the class above the one that ran out
        decision = self.scheduler.on_failure(job, kind, message)
        self.metrics.attempt_failed(job.id, run.vram_class, kind, retried=isinstance(decision, Retry))
        failure = {"code": kind.code, "message": message,
                   "vram_class": run.vram_class, "node": run.node}
        rec = self.store.get(job.id) or {}
        history = [*rec.get("failures", []), failure]
        if isinstance(decision, Retry):
            log.warning("job %s: %s on %s, retrying on %s", job.id, kind, run.vram_class, decision.vram_class)
            self.store.update(job.id, status=JobStatus.QUEUED, vram_class=decision.vram_class, home_class=job.home,
                              node=None, attempts=job.attempts, failures=history, progress={"step": 0, "total": None})
            self.scheduler.requeue(job)
        else:
            assert isinstance(decision, Fail)
            self.store.update(job.id, status=JobStatus.FAILED, finished_at=_now(), attempts=job.attempts,
                              failures=history, error={"code": decision.code, "message": decision.message})
            self.metrics.job_finished(self.store.get(job.id))
            self._inbox_path(job.id).unlink(missing_ok=True)

    # --- views --------------------------------------------------------------------------------

    def _view(self, rec: dict[str, Any], positions: dict[str, int] | None = None) -> dict[str, Any]:
        """The job as clients see it."""
        out = {k: v for k, v in rec.items() if k not in ("seq",)}
        out["estimate"] = {k: v for k, v in rec["estimate"].items() if k != "seconds_by_class"}
        run = self.running.get(rec["id"])
        if rec["status"] == JobStatus.RUNNING and run is not None and run.progress:
            out["progress"] = dict(run.progress)
        if rec["status"] == JobStatus.QUEUED:
            out["queue_position"] = (positions.get(rec["id"]) if positions is not None
                                     else self._queue_position(rec["id"]))
        return out

    def _queue_positions(self) -> dict[str, int]:
        """Queue position of every queued job (one sort per class, for a whole page)."""
        return {job.id: i + 1 for c in self.classes.names for i, job in enumerate(self.scheduler.queued(c))}

    def _queue_position(self, job_id: str) -> int | None:
        for c in self.classes.names:
            for i, job in enumerate(self.scheduler.queued(c)):
                if job.id == job_id:
                    return i + 1
        return None


class _InputMissing(Exception):
    pass


def _error_reply(exc: I2VError) -> dict[str, Any]:
    reply = {"error": exc.to_dict(), "status": getattr(exc, "http_status", 400)}
    reply.update(getattr(exc, "extra", {}))
    return reply
