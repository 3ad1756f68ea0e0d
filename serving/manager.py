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
    JobRecord,
    JobStatus,
    PreviewEvent,
    ProgressEvent,
    RenderRequest,
    StartedEvent,
    is_finished,
    parse_worker_event,
)
from .reuse import gpu_seconds, reuse_key
from .scheduler import Backlogged, Fail, NoClassFits, QueuedJob, Retry, Scheduler, estimate_request
from .storage import INPUT_NAMES, job_prefix
from .webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

REPLICA_REFRESH_S = 1.0
#: When every class runs the replicas it may (none starting or stopping, none to add): reading
#: Serve's status is costly (the controller builds the whole instance's details, this replica
#: parses them), so it is read less often.
REPLICA_REFRESH_STABLE_S = 5.0
DISPATCH_TICK_S = 0.25
PROGRESS_SAVE_S = 2.0


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
    started: float = field(default_factory=time.monotonic)  # when it was dispatched (estimates of time left)
    steps_counted: int = 0  # denoising steps of this attempt counted in the metrics
    preview: dict[str, Any] | None = None  # the latest live preview (memory only; gone with the job)


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
            fair_share=self.settings.fair_share,
            share_weights=self.settings.share_weights,
        )
        self.running: dict[str, Running] = {}
        self.replicas: dict[str, dict[str, int]] = {c: {} for c in self.classes.names}
        self.free_gpus: dict[str, float] = {}
        self._seq = itertools.count(1)
        self._wake = asyncio.Event()
        # webhooks (issue 18): deliveries run in their own task and thread pool (serving/webhooks.py)
        self.webhooks = WebhookDispatcher(self.store, self.settings, self._webhook_payload,
                                          self.metrics.webhook_attempt)
        self._storage = None  # opened on first use (result reuse checks that a result still exists)
        self._recover()
        self.webhooks.start()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    # --- start-up -----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Queued and running jobs of an earlier run are scheduled again (a restart is not the
        job's fault: it does not count as a failed attempt)."""
        pending = self.store.with_status(sorted(ACTIVE))
        last = max((r["seq"] for r in pending), default=0)
        self._seq = itertools.count(last + 1)
        for row in pending:
            rec = JobRecord.parse(row)  # typed; a row that is not a job record says which fields are wrong
            if rec.detail == JobDetail.UPLOADING:
                continue  # rendered; its worker's uploader reports when storage has the files
            try:
                home = self.scheduler.place(rec.estimate["vram_bytes"])
                raised = rec.home_class  # an OOM retry moved it to a larger class
                if raised in self.classes and self.classes[raised].memory_gib > self.classes[home].memory_gib:
                    home = raised
            except NoClassFits as exc:
                self._ended(self.store.update(rec.id, status=JobStatus.FAILED, finished_at=_now(),
                                              error={"code": ErrorCode.NO_CLASS_FITS, "message": exc.message}))
                continue
            job = self._queued_job(row, home)
            if rec.status == JobStatus.RUNNING:
                self.store.update(rec.id, status=JobStatus.QUEUED, node=None, progress=None,
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
            attempts=rec.get("attempts", 0), caller=rec.get("owner", "anonymous"),
        )

    # --- requests from the API ----------------------------------------------------------------
    # These are `async` on purpose: Serve runs a deployment's plain `def` methods in a thread pool,
    # where they would race the dispatch loop over the scheduler's queues and the running set (a
    # job popped before its record was written was lost). As coroutines without an `await` they
    # run on this replica's event loop, one at a time, between the loop's own steps.

    async def submit(self, fields: dict[str, Any], image: bytes, image_format: str, width: int, height: int,
                     idempotency_key: str | None = None, owner: str = "anonymous",
                     max_active: int | None = None, webhook: dict[str, Any] | None = None, reuse: bool = True,
                     admin: bool = False) -> dict[str, Any]:
        """Admit a validated request. Returns {"job", "created"} or {"error", "status", ...}.

        `webhook`: {"url", "events"} (checked by the ingress). `reuse`: answer with an earlier
        identical job's result when there is one (the caller's own; `admin`: anyone's)."""
        try:
            fields = await self._resolve_adapters(fields)
            idem = f"{owner}:{idempotency_key}" if idempotency_key else None
            key = reuse_key(parse_params(fields).model_dump(), image, self.settings.model, self.settings.dtype)
            if key is not None and reuse and not (idem and self.store.find_by_key(idem)):
                reused = await self._reuse(fields, key, owner, admin, idem, webhook)
                if reused is not None:
                    return reused
            # The input is made durable (a file and its directory fsync'ed) in a thread, before
            # the job exists: this replica's loop serves other requests and the workers' events
            # meanwhile (on the loop it was most of a submission's time).
            job_id = uuid.uuid4().hex
            await asyncio.to_thread(atomic_write, self._inbox_path(job_id), image, self.settings.file_mode_bits)
            reply = None
            try:
                reply = self._submit(fields, image, image_format, width, height, idem, owner, max_active,
                                     extra={"reuse_key": key, "webhook": webhook}, job_id=job_id)
            finally:
                if not (reply or {}).get("created"):  # refused, or an earlier job answered
                    self._inbox_path(job_id).unlink(missing_ok=True)
            return reply
        except I2VError as exc:
            self.metrics.job_rejected(exc.code)
            return _error_reply(exc)

    def _submit(self, fields, image, image_format, width, height, idempotency_key, owner, max_active, extra=None,
                job_id=None):
        """`job_id`: its input is in the inbox already (`submit` wrote it off the event loop)."""
        if idempotency_key:
            existing = self.store.find_by_key(idempotency_key)
            if existing is not None:  # a retried request: the job made the first time
                return {"job": self._view(existing), "created": False}
        params = parse_params(fields).with_seed()
        if max_active is not None and self.store.count_active(owner) >= max_active:
            raise I2VError(f"{owner!r} already has {max_active} queued or running jobs (the token's limit); "
                            "wait for some to finish", code="too_many_active_jobs", http_status=429,
                            retry_after=30)
        out_w, out_h, vram, seconds = estimate_request(self.classes, params, width, height,
                                                       dtype=self.settings.dtype,
                                                       cpu_offload=self.settings.cpu_offload,
                                                       decode_chunk_size=self.settings.decode_chunk_size)
        vram, seconds = self._with_adapter_cost(params, vram, seconds)
        try:
            home = self.scheduler.place(vram)
        except NoClassFits as exc:
            raise I2VError(exc.message, code=ErrorCode.NO_CLASS_FITS, http_status=422) from None
        input_saved = job_id is not None
        job_id = job_id or uuid.uuid4().hex
        seq = next(self._seq)
        queued = QueuedJob(id=job_id, vram_bytes=vram, seconds=self._run_seconds(seconds), priority=params.priority,
                           seq=seq, home=home, caller=owner)
        try:
            self.scheduler.admit(queued, self._capacity())
        except Backlogged as exc:
            raise I2VError(exc.message, code="backlogged", http_status=429, retry_after=exc.retry_after) from None
        try:
            created_at = _now()
            prefix = job_prefix(job_id, created_at)
            input_name = INPUT_NAMES[image_format]
            if not input_saved:
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
                **{k: v for k, v in (extra or {}).items() if v is not None},  # reuse_key, webhook (issue 18)
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

    async def preview(self, job_id: str) -> dict[str, Any] | None:
        """The latest live preview of a running job: {step, total, seq, media_type, image}
        (None: the job is not running, or no preview came yet). Kept in memory only."""
        run = self.running.get(job_id)
        return dict(run.preview) if run is not None and run.preview is not None else None

    async def list(self, status: str | None = None, limit: int = 50, cursor: int | None = None,
                   owner: str | None = None) -> dict[str, Any]:
        jobs, next_cursor = self.store.list(status=status, limit=limit, cursor=cursor, owner=owner)
        positions = self._queue_positions() if any(j["status"] == JobStatus.QUEUED for j in jobs) else {}
        return {"jobs": [self._view(j, positions) for j in jobs], "next_cursor": next_cursor}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        rec = self.store.get(job_id)
        if rec is None:
            return _error_reply(I2VError(f"no job {job_id}", code="not_found", http_status=404))
        if is_finished(rec["status"]):
            return _error_reply(I2VError(
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
        self._ended(rec)
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
                if time.monotonic() - last_refresh >= self._refresh_interval():
                    await self._refresh_replicas()
                    last_refresh = time.monotonic()
                self._dispatch()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("dispatch loop error")
            try:
                self.store.flush()  # the tick's deferred writes (starts, nodes, progress): one commit
            except Exception:  # noqa: BLE001 - kept pending; the next tick or write tries again
                log.exception("job store flush failed")
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

    def _refresh_interval(self) -> float:
        """Seconds between two reads of Serve's replica states: `REPLICA_REFRESH_S` while a
        class has replicas that are not RUNNING (starting, stopping, recovering), fewer than its
        `min_replicas`, or queued work and room to grow; else `REPLICA_REFRESH_STABLE_S`."""
        backlog = self.scheduler.backlog()
        for c in self.classes.names:
            states = self.replicas.get(c, {})
            running = states.get("RUNNING", 0)
            scaling = self.settings.workers[c]
            if (any(n for state, n in states.items() if state != "RUNNING") or running < scaling.min_replicas
                    or (backlog.get(c, 0) > 0 and running < scaling.max_replicas)):
                return REPLICA_REFRESH_S
        return REPLICA_REFRESH_STABLE_S

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

    def _busy_seconds(self) -> dict[str, list[float]]:
        """Per class, the estimated seconds left of each running job (the scheduler's spill rule)."""
        now = time.monotonic()
        left: dict[str, list[float]] = {c: [] for c in self.classes.names}
        for run in self.running.values():
            secs = run.job.seconds.get(run.vram_class, 0.0)
            left[run.vram_class].append(max(0.0, secs - (now - run.started)))
        return left

    def _dispatch(self) -> None:
        free = self._free_slots()
        if not any(free.values()):
            return
        busy = self._busy_seconds() if self.settings.spill_rule == "earliest_finish" else None
        for job, vram_class in self.scheduler.assign(free, busy=busy):
            log.debug("dispatch %s (home %s) -> %s; free slots %s", job.id, job.home, vram_class, free)
            run = Running(job=job, vram_class=vram_class)
            self.running[job.id] = run
            rec = self.store.get(job.id)
            estimate = rec["estimate"]
            # the estimate follows the job: after a spill, seconds on the class it runs on
            estimate = {**estimate, "seconds": estimate["seconds_by_class"].get(vram_class, estimate["seconds"])}
            started = dict(status=JobStatus.RUNNING, vram_class=vram_class, started_at=_now(),
                           spilled=vram_class != job.home, node=None, estimate=estimate,
                           progress={"step": 0, "total": None})
            self.store.defer(job.id, **started)  # written with the tick's other changes (one commit)
            rec = {**rec, **started}
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
            run.stream = self.workers[run.vram_class].options(**self._route(rec["params"])).run.remote(payload)
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

    # --- LoRA adapters (issue 18; docs/adapters.md) ----------------------------------------------

    def _registry(self):
        if getattr(self, "_adapter_registry", None) is None:
            from .adapter_registry import AdapterRegistry

            self._adapter_registry = AdapterRegistry(self.settings)
        return self._adapter_registry

    async def adapters(self) -> dict[str, Any]:
        """`GET /v1/adapters`: the registered adapters' metadata."""
        try:
            return {"adapters": await asyncio.to_thread(self._registry().list), "url": self._registry().url}
        except Exception as exc:  # noqa: BLE001 - an unreachable registry is a 503, not a crash
            return _error_reply(I2VError(f"the adapter registry is unreachable: {exc}", code="registry_unavailable",
                                         http_status=503))

    async def _resolve_adapters(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`lora` checked against the registry: unknown names are a 422 (field `lora`); each entry
        gets its adapter's SHA-256 (recorded in `params.json`, part of the result-reuse key)."""
        if not fields.get("lora"):
            return fields
        refs = [r.model_dump() for r in parse_params(fields).lora]
        resolved = await asyncio.to_thread(self._registry().resolve, refs)
        sizes = getattr(self, "_adapter_sizes", None)
        if sizes is None:
            sizes = self._adapter_sizes = {}
        sizes.update({r["sha256"]: r["bytes"] for r in resolved})
        return {**fields, "lora": [{k: r[k] for k in ("name", "scale", "sha256")} for r in resolved]}

    def _with_adapter_cost(self, params, vram: int, seconds: dict[str, float]) -> tuple[int, dict[str, float]]:
        """The cost model's share of a job's adapters: their memory, and a load on a miss."""
        if not params.lora:
            return vram, seconds
        from pipeline.cost_model import adapter_cost

        sizes = getattr(self, "_adapter_sizes", {})
        extra_vram, load_s = adapter_cost([sizes.get(r.sha256, 0) for r in params.lora])
        return vram + extra_vram, {k: v + load_s for k, v in seconds.items()}

    def _route(self, params: dict[str, Any]) -> dict[str, Any]:
        """Handle options of a job's worker call. With adapters (and `adapter_affinity`), Serve's
        model multiplexing routes it to a replica of the class that holds the same adapter set
        when one is free (the set is the multiplexed model id; see docs/adapters.md)."""
        from pipeline.adapters import adapter_set_id

        names = [r["name"] for r in params.get("lora") or ()]
        if names and self.settings.adapter_affinity:
            return {"stream": True, "multiplexed_model_id": adapter_set_id(names)}
        return {"stream": True}

    def _adapter_metrics(self, vram_class: str, event: dict[str, Any]) -> None:
        stats = event.get("adapters") if event.get("event") == "done" else None
        if stats:
            self.metrics.adapter_loads(vram_class, stats.get("hits", 0), stats.get("misses", 0),
                                       stats.get("load_seconds", 0.0))

    def _on_event(self, run: Running, event: dict[str, Any], started: float) -> str | None:
        """Apply one worker event; returns a failure kind (`FailureKind.OOM`, `.ERROR`) or
        "done"/"canceled"/None. A malformed event raises `WorkerEventError`."""
        job = run.job
        ev = parse_worker_event(event)
        steps = 1
        if isinstance(ev, ProgressEvent):  # coalesced by the worker: count the steps since the last one
            steps, run.steps_counted = ev.step - run.steps_counted, max(run.steps_counted, ev.step)
        self.metrics.worker_event(run.vram_class, event, steps=steps)
        self._adapter_metrics(run.vram_class, event)
        if run.cancel_requested:
            return None
        if isinstance(ev, StartedEvent):
            run.node = ev.node
            self.store.defer(job.id, node=ev.node, replica=ev.replica)
        elif isinstance(ev, ProgressEvent):
            # Kept in memory (what GET shows); written to the store at most every PROGRESS_SAVE_S:
            # a durable write per denoising step halved the manager's throughput.
            run.progress = {"step": ev.step, "total": ev.total}
            now = time.monotonic()
            if now - run.progress_saved_at >= PROGRESS_SAVE_S or ev.step == ev.total:
                self.store.defer(job.id, progress=run.progress)
                run.progress_saved_at = now
        elif isinstance(ev, PreviewEvent):
            self._on_preview(run, ev)
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

    def _on_preview(self, run: Running, ev: PreviewEvent) -> None:
        """Keep the job's latest preview (replacing the one before) and count it."""
        seq = run.preview["seq"] + 1 if run.preview else 1
        run.preview = {"step": ev.step, "total": ev.total, "seq": seq, "media_type": ev.media_type,
                       "image": ev.image}
        self.metrics.preview_sent(run.vram_class, ev.seconds)

    def _succeed(self, job_id: str, rec: dict[str, Any], done: DoneEvent, attempts: int) -> None:
        steps = rec["params"]["num_inference_steps"]
        rec = self.store.update(
            job_id, status=JobStatus.SUCCEEDED, detail=None, finished_at=_now(), result=done.result,
            timings=done.timings, peak_vram_bytes=done.peak_vram_bytes, device=done.device,
            attempts=attempts, progress={"step": steps, "total": steps},
        )
        self.metrics.job_finished(self.store.get(job_id))
        self._ended(rec)
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
            rec = self.store.update(job.id, status=JobStatus.FAILED, finished_at=_now(), attempts=job.attempts,
                                    failures=history, error={"code": decision.code, "message": decision.message})
            self.metrics.job_finished(self.store.get(job.id))
            self._ended(rec)
            self._inbox_path(job.id).unlink(missing_ok=True)

    # --- views --------------------------------------------------------------------------------

    def _view(self, rec: dict[str, Any], positions: dict[str, int] | None = None) -> dict[str, Any]:
        """The job as clients see it."""
        out = {k: v for k, v in rec.items() if k not in ("seq",)}
        out["estimate"] = {k: v for k, v in rec["estimate"].items() if k != "seconds_by_class"}
        run = self.running.get(rec["id"])
        if rec["status"] == JobStatus.RUNNING and run is not None and run.progress:
            out["progress"] = dict(run.progress)
        if rec["status"] == JobStatus.RUNNING and run is not None and run.preview is not None:
            out["preview"] = {k: run.preview[k] for k in ("step", "total", "seq")}  # the image: GET .../preview
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


    # --- webhooks and result reuse (issue 18) ---------------------------------------------------

    def _ended(self, rec: dict[str, Any] | None) -> None:
        """A job reached succeeded, failed or canceled: queue its webhook delivery, if it wants one."""
        if rec and rec.get("webhook"):
            try:
                self.webhooks.job_ended(rec)
            except Exception:  # noqa: BLE001 - a webhook must never fail the job's own bookkeeping
                log.exception("job %s: cannot queue its webhook", rec.get("id"))

    def _webhook_payload(self, job_id: str) -> dict[str, Any] | None:
        """The job's JSON as `GET /v1/jobs/{id}` shows it (what a webhook POSTs)."""
        from .api import _links

        rec = self.store.get(job_id)
        return _links(self._view(rec)) if rec else None

    def _result_exists(self, key: str) -> bool:
        """Whether a result is still in storage (`i2v-farm gc` may have deleted it); False when
        storage cannot tell (unreachable)."""
        try:
            if self._storage is None:
                from .storage import open_storage

                self._storage = open_storage(self.settings)
            return bool(self._storage.exists(key))
        except Exception as exc:  # noqa: BLE001
            log.warning("result reuse: cannot check %s in storage: %s", key, exc)
            return False

    async def _reuse(self, fields: dict[str, Any], key: str, owner: str, admin: bool, idempotency_key: str | None,
                     webhook: dict[str, Any] | None) -> dict[str, Any] | None:
        """A new job, succeeded at once, with the result of an earlier identical one (None: none to reuse)."""
        for source in self.store.find_reusable(key, None if admin else owner):
            result = source.get("result") or {}
            if not result.get("key") or not await asyncio.to_thread(self._result_exists, result["key"]):
                continue
            original = source.get("reused_from") or source["id"]
            saved = float(source.get("gpu_seconds_saved") or 0) if source.get("reused_from") else gpu_seconds(source)
            params = parse_params(fields)
            now = _now()
            steps = params.num_inference_steps
            record = {
                "id": uuid.uuid4().hex, "owner": owner, "status": JobStatus.SUCCEEDED,
                "vram_class": source["vram_class"], "node": None, "progress": {"step": steps, "total": steps},
                "params": params.model_dump(), "estimate": source["estimate"], "prefix": source.get("prefix"),
                "input": source.get("input"), "output_size": source.get("output_size"), "timings": {},
                "peak_vram_bytes": None, "result": result, "error": None, "attempts": 0,
                "home_class": source.get("home_class"), "created_at": now, "finished_at": now,
                "reused_from": original, "reuse_key": key, "gpu_seconds_saved": round(saved, 3),
                **({"webhook": webhook} if webhook else {}),
            }
            record, created = self.store.create(record, idempotency_key=idempotency_key)
            if created:
                self.metrics.job_reused(record["vram_class"], saved)
                self._ended(record)
            return {"job": self._view(record), "created": created}
        return None


class _InputMissing(Exception):
    pass


def _error_reply(exc: I2VError) -> dict[str, Any]:
    return exc.reply()  # {"error", "status"[, "retry_after"]}: serving.api raises it again (I2VError.from_reply)
