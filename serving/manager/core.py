"""`JobManager`: its state, the requests Serve routes to it, its loop, and its typed writes.

The rest is in the modules beside it (see `serving/manager/__init__.py`): a job's attempts on
workers, the capacity per class, start-up recovery, records and views, adapters, result reuse.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monitoring.metrics import FarmMetrics
from pipeline.errors import I2VError
from pipeline.request import GenerationParams, parse_params

from ..backends import SIM
from ..config import FarmSettings
from ..files import apply_umask, atomic_write, make_dirs
from ..job_store import JobStore
from ..jobs import DoneEvent, ErrorCode, JobDetail, JobRecord, JobStatus
from ..reuse import reuse_key
from ..scheduler import Backlogged, NoClassFits, QueuedJob, Scheduler, estimate_request
from ..storage import INPUT_NAMES, job_prefix
from ..webhooks import WebhookDispatcher
from . import records, views
from .adapters import Adapters
from .attempts import Attempts, Running
from .capacity import Capacity, read_replicas, running_replicas
from .recovery import recover
from .result_reuse import ResultReuse, saved_seconds

log = logging.getLogger(__name__)

DISPATCH_TICK_S = 0.25


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
        self.attempts = Attempts(self)
        self.lora = Adapters(self.settings, self.metrics)  # issue 18: LoRA adapters
        self.reuse = ResultReuse(self.settings, self.store)  # issue 18: result reuse
        # webhooks (issue 18): deliveries run in their own task and thread pool (serving/webhooks.py)
        self.webhooks = WebhookDispatcher(self.store, self.settings, self._webhook_payload,
                                          self.metrics.webhook_attempt)
        recover(self)  # the unfinished jobs of an earlier run
        self.webhooks.start()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    def _run_seconds(self, seconds: dict[str, float]) -> dict[str, float]:
        """How long a job will really take per class (the `sim` model sleeps a fraction of it)."""
        scale = self.settings.sim_time_scale if self.settings.model == SIM else 1.0
        return {k: v * scale for k, v in seconds.items()}

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
            fields = await self.lora.resolve(fields)
            idem = f"{owner}:{idempotency_key}" if idempotency_key else None
            params = parse_params(fields)  # once: the reuse key, a reused job and a new one are made from it
            key = reuse_key(params.model_dump(), image, self.settings.model, self.settings.dtype)
            if key is not None and reuse and not (idem and self.store.find_by_key(idem)):
                reused = await self._reuse(params, key, owner, admin, idem, webhook)
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
                                     extra={"reuse_key": key, "webhook": webhook}, job_id=job_id, params=params)
            finally:
                if not (reply or {}).get("created"):  # refused, or an earlier job answered
                    self._inbox_path(job_id).unlink(missing_ok=True)
            return reply
        except I2VError as exc:
            self.metrics.job_rejected(exc.code)
            return _error_reply(exc)

    def _submit(self, fields, image, image_format, width, height, idempotency_key, owner, max_active, extra=None,
                job_id=None, params: GenerationParams | None = None):
        """`job_id`: its input is in the inbox already (`submit` wrote it off the event loop);
        `params`: `fields` parsed already (`parse_params`)."""
        if idempotency_key:
            existing = self.store.find_by_key(idempotency_key)
            if existing is not None:  # a retried request: the job made the first time
                return {"job": self._view(JobRecord.parse(existing)), "created": False}
        params = (params or parse_params(fields)).with_seed()
        if max_active is not None and self.store.count_active(owner) >= max_active:
            raise I2VError(f"{owner!r} already has {max_active} queued or running jobs (the token's limit); "
                            "wait for some to finish", code="too_many_active_jobs", http_status=429,
                            retry_after=30)
        out_w, out_h, vram, seconds = estimate_request(self.classes, params, width, height,
                                                       dtype=self.settings.dtype,
                                                       cpu_offload=self.settings.cpu_offload,
                                                       decode_chunk_size=self.settings.decode_chunk_size)
        vram, seconds = self.lora.with_cost(params, vram, seconds)
        try:
            home = self.scheduler.place(vram)
        except NoClassFits as exc:
            raise I2VError(exc.message, code=ErrorCode.NO_CLASS_FITS, http_status=422) from None
        input_saved = job_id is not None
        job_id = job_id or uuid.uuid4().hex
        queued = QueuedJob(id=job_id, vram_bytes=vram, seconds=self._run_seconds(seconds), priority=params.priority,
                           seq=next(self._seq), home=home, caller=owner)
        try:
            self.scheduler.admit(queued, running_replicas(self.replicas))
        except Backlogged as exc:
            raise I2VError(exc.message, code="backlogged", http_status=429, retry_after=exc.retry_after) from None
        estimate = {"vram_bytes": vram, "seconds": round(seconds[home], 2),
                    "seconds_by_class": {k: round(v, 2) for k, v in seconds.items()}}
        rec, created = self._create(queued, params, estimate, image, image_format, (width, height, out_w, out_h),
                                    idempotency_key, None if input_saved else image, extra)
        self._wake.set()
        if created:
            self.metrics.job_submitted(home, params.resolution)
        return {"job": self._view(rec), "created": created}

    def _create(self, queued: QueuedJob, params, estimate: dict[str, Any], image: bytes, image_format: str,
                sizes: tuple[int, int, int, int], idempotency_key: str | None, unsaved: bytes | None,
                extra: dict[str, Any] | None) -> tuple[JobRecord, bool]:
        """Record an admitted job (`queued`; `unsaved`: its input, not in the inbox yet). An
        earlier job with the same Idempotency-Key (a concurrent retry) answers instead: the
        scheduler and the inbox then forget this one."""
        job_id, (width, height, out_w, out_h) = queued.id, sizes
        try:
            at = datetime.now(timezone.utc)
            created_at, prefix = at.isoformat(), job_prefix(job_id, at)
            input_name = INPUT_NAMES[image_format]
            if unsaved is not None:
                atomic_write(self._inbox_path(job_id), unsaved, self.settings.file_mode_bits)
            rec = records.new_job(
                job_id, queued.caller, queued.home, params, estimate,
                {"key": prefix + input_name, "name": input_name, "width": width, "height": height,
                 "format": image_format, "bytes": len(image)},
                {"width": out_w, "height": out_h}, prefix, created_at, extra)
            row, created = self.store.create(rec.to_dict(), idempotency_key=idempotency_key or None)
        except BaseException:
            self.scheduler.remove(job_id)
            self._inbox_path(job_id).unlink(missing_ok=True)
            raise
        if not created:  # same Idempotency-Key (a concurrent retry): the job made the first time
            self.scheduler.remove(job_id)
            self._inbox_path(job_id).unlink(missing_ok=True)
            return JobRecord.parse(row), False
        return rec.model_copy(update={"seq": row["seq"]}), True  # what was stored: `rec` and its `seq`

    def _inbox_path(self, job_id: str) -> Path:
        return self.inbox / job_id

    async def upload_finished(self, job_id: str, done: dict[str, Any]) -> bool:
        """A worker's uploader stored a spooled job's results: the job has succeeded."""
        row = self.store.get(job_id)
        rec = JobRecord.parse(row) if row is not None else None
        if rec is None or rec.status != JobStatus.RUNNING or rec.detail != JobDetail.UPLOADING:
            return False
        self.attempts.succeed(job_id, rec, DoneEvent.model_validate(done), rec.attempts)
        return True

    async def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.store.get(job_id)
        return self._view(JobRecord.parse(row)) if row else None

    async def preview(self, job_id: str) -> dict[str, Any] | None:
        """The latest live preview of a running job: {step, total, seq, media_type, image}
        (None: the job is not running, or no preview came yet). Kept in memory only."""
        run = self.running.get(job_id)
        return dict(run.preview) if run is not None and run.preview is not None else None

    async def list(self, status: str | None = None, limit: int = 50, cursor: int | None = None,
                   owner: str | None = None) -> dict[str, Any]:
        rows, next_cursor = self.store.list(status=status, limit=limit, cursor=cursor, owner=owner)
        jobs = [JobRecord.parse(row) for row in rows]
        queued = any(j.status == JobStatus.QUEUED for j in jobs)
        positions = views.queue_positions(self.scheduler, self.classes) if queued else {}
        return {"jobs": [self._view(j, positions) for j in jobs], "next_cursor": next_cursor}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        row = self.store.get(job_id)
        if row is None:
            return _error_reply(I2VError(f"no job {job_id}", code="not_found", http_status=404))
        if JobRecord.parse(row).finished:
            return _error_reply(I2VError(
                f"job {job_id} already {row['status']}; only queued or running jobs can be canceled",
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
        rec = self._update(job_id, status=JobStatus.CANCELED, finished_at=records.now(), detail=None,
                           error={"code": ErrorCode.CANCELED, "message": "canceled by request"})
        self.metrics.job_finished(rec.to_dict())
        self._ended(rec)
        self._inbox_path(job_id).unlink(missing_ok=True)
        self._wake.set()
        return {"job": self._view(rec)}

    async def adapters(self) -> dict[str, Any]:
        """`GET /v1/adapters`: the registered adapters' metadata."""
        return await self.lora.listing()

    async def cluster(self) -> dict[str, Any]:
        capacity = self._capacity_now()
        return {
            "model": self.settings.model,
            "classes": capacity.class_views(),
            "queue_depth": sum(capacity.backlog.values()),
            "running": len(self.running),
            "jobs": self.store.counts(),
            "spill": self.settings.spill,
            "backlog_limit": self.settings.backlog_limit,
        }

    async def ready(self) -> dict[str, Any]:
        running = running_replicas(self.replicas)
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
                    self.free_gpus = await read_replicas(self.classes, self.replicas)
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

    def _dispatch(self) -> None:
        self.attempts.dispatch()

    def _capacity_now(self) -> Capacity:
        return Capacity(self.classes, self.settings, self.replicas, self.free_gpus, self.scheduler.backlog(),
                        self.running.values())

    def _refresh_interval(self) -> float:
        return self._capacity_now().refresh_interval()

    # --- the job record: writes checked by its type, views ----------------------------------------

    def _update(self, job_id: str, **fields: Any) -> JobRecord:
        """Write `fields` into the job's record, checked first (`JobRecord.check_changes`: a
        misspelt key or a value of the wrong type is refused); returns the record as stored."""
        return JobRecord.parse(self.store.update(job_id, **JobRecord.check_changes(job_id, fields)))

    def _defer(self, job_id: str, **fields: Any) -> None:
        """`_update`, written with the dispatch tick's other changes (`JobStore.defer`)."""
        self.store.defer(job_id, **JobRecord.check_changes(job_id, fields))

    def _view(self, rec: JobRecord, positions: dict[str, int] | None = None) -> dict[str, Any]:
        """The job as clients see it (`positions`: queue positions of a whole page)."""
        position = None
        if rec.status == JobStatus.QUEUED:
            position = (positions.get(rec.id) if positions is not None
                        else self.scheduler.position(rec.id))
        return views.job_view(rec, self.running.get(rec.id), position)

    # --- webhooks and result reuse (issue 18) ---------------------------------------------------

    def _ended(self, rec: JobRecord) -> None:
        """A job reached succeeded, failed or canceled: queue its webhook delivery, if it wants one."""
        if rec.webhook:
            try:
                self.webhooks.job_ended(rec.to_dict())
            except Exception:  # noqa: BLE001 - a webhook must never fail the job's own bookkeeping
                log.exception("job %s: cannot queue its webhook", rec.id)

    def _webhook_payload(self, job_id: str) -> dict[str, Any] | None:
        """The job's JSON as `GET /v1/jobs/{id}` shows it (what a webhook POSTs)."""
        from ..api import _links

        row = self.store.get(job_id)
        return _links(self._view(JobRecord.parse(row))) if row else None

    async def _reuse(self, params: GenerationParams, key: str, owner: str, admin: bool, idempotency_key: str | None,
                     webhook: dict[str, Any] | None) -> dict[str, Any] | None:
        """A new job, succeeded at once, with the result of an earlier identical one (None: none to reuse)."""
        source = await self.reuse.source(key, None if admin else owner)
        if source is None:
            return None
        saved = saved_seconds(source)
        rec = records.reused_job(uuid.uuid4().hex, source, params, key, owner, saved, webhook)
        row, created = self.store.create(rec.to_dict(), idempotency_key=idempotency_key)
        rec = JobRecord.parse(row)
        if created:
            self.metrics.job_reused(rec.vram_class, saved)
            self._ended(rec)
        return {"job": self._view(rec), "created": created}


def _error_reply(exc: I2VError) -> dict[str, Any]:
    return exc.reply()  # {"error", "status"[, "retry_after"]}: serving.api raises it again (I2VError.from_reply)
