"""The per-class worker: a Ray Serve replica pinned to one GPU of its VRAM class.

One deployment per class (`Worker_12gb`, ...), each replica asking for `num_gpus: 1` plus its
class resource, so Ray places it only on a node of that class. The model is loaded once per
replica. A replica runs one job at a time (`max_ongoing_requests=1`); `run()` streams events:

    {"event": "started", "node", "replica", "vram_class", "pid", "threads"}
    {"event": "progress", "step", "total"}             first and last step, between them one per `progress_interval_s`
    {"event": "preview", "step", "total", "image", ...} a live preview (JPEG), every `preview_interval_s`
    {"event": "done", "result", "timings", "peak_vram_bytes", "uploaded", ...}
    {"event": "error", "code", "message"}              out_of_memory, generation_failed, ...

The job is a `serving.jobs.RenderRequest` and the events are `serving.jobs`' worker events (sent
as dicts; the job manager reads them with `parse_worker_event`).
Canceling the request (the job manager cancels its stream) stops the job between steps.
Results go through the node's spool (`serving.uploader`): `uploaded: False` means storage was
unreachable, the files wait on this node, and the job manager hears `upload_finished` later.

**Threads and the CUDA allocator.** Ray starts an actor with `OMP_NUM_THREADS` = its `num_cpus`
(`worker_cpus`, default 1), so torch would compute on one thread. A replica therefore sets its
CPU threads itself, first thing in its constructor (`setup_compute`): `worker_threads` when set,
else all of the node's cores (`os.sched_getaffinity`) when it runs without a GPU, `worker_cpus`
(at least 1) with one. It calls `torch.set_num_threads(n)` and sets `OMP_NUM_THREADS` and
`MKL_NUM_THREADS` to n for its child processes. "The node's cores" are those of the machine the
process runs on: the fake nodes of a simulated cluster (`--simulate`, the tests) share one
machine, so each CPU worker there gets all its cores, and several busy ones share them.
A GPU worker also gets `PYTORCH_CUDA_ALLOC_CONF` = `worker_cuda_alloc_conf` unless its
environment already has one (or `PYTORCH_ALLOC_CONF`). That is set in the constructor, not in the
deployment's `runtime_env`: the replica is a process of its own and the constructor runs before
anything in it imports torch (checked, and reported as `torch_imported_before`), so torch reads
the value when it loads and its allocator starts with it; a `runtime_env` value would override
the node's own one, which must win, and the app builder cannot see the GPU node's environment.
Each replica publishes what it got (`report()`: device, threads, their rule, the node's cores,
the allocator config) in Ray's internal key-value store; `GET /v1/cluster` lists the live ones per
class (`attach_worker_reports`) and `i2v-farm status` prints them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cluster.vram_classes import VramClass
from monitoring.metrics import WorkerStats
from pipeline.errors import GenerationCanceled, I2VError, OutOfMemory
from pipeline.request import GenerationParams

from .adapter_runtime import WorkerAdapters
from .backends import SIM, make_backend
from .config import FarmSettings
from .files import apply_umask
from .jobs import (
    CanceledEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    PreviewEvent,
    ProgressEvent,
    RenderRequest,
    StartedEvent,
)
from .storage import PARAMS_NAME, POSTER_NAME, VIDEO_NAME, StorageUnavailable, open_storage
from .uploader import BackgroundUploader, Spool

log = logging.getLogger(__name__)

#: Namespace in Ray's internal key-value store where worker replicas publish their reports.
REPORTS_NAMESPACE = "i2v-farm-workers"
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
#: Either of these, already in a worker's environment, wins over `worker_cuda_alloc_conf`
#: (`PYTORCH_ALLOC_CONF` is PyTorch's newer, device-neutral name for it).
ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", ALLOC_CONF_ENV)
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def node_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask; else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(worker_threads: int, worker_cpus: float, gpu: bool, cores: int) -> tuple[int, str]:
    """CPU threads a worker computes on, and the rule that gave them: `worker_threads` when set
    (> 0); else `auto_cpu`: all `cores` of the node for a worker without a GPU, or `auto_gpu`:
    `worker_cpus` (whole CPUs, at least 1) for a worker with one (the GPU does the work; its CPU
    threads feed it)."""
    if worker_threads > 0:
        return int(worker_threads), "worker_threads"
    if gpu:
        return max(1, int(worker_cpus)), "auto_gpu"
    return max(1, int(cores)), "auto_cpu"


def setup_compute(settings: FarmSettings, *, use_torch: bool = True, env=None, cuda_available=None,
                  cores: int | None = None) -> dict[str, Any]:
    """Set this worker process's CPU threads and (GPU) CUDA allocator config; returns what was set.

    Call it before anything in the process computes with torch or allocates CUDA memory (the
    replica's constructor does, before the model loads). With `use_torch=False` (the `sim` model,
    which never imports torch) only the thread variables for child processes are set, and the
    worker counts as one without a GPU. `env` (default `os.environ`), `cuda_available` (default
    `torch.cuda.is_available`) and `cores` (default `node_cores()`) are for tests.
    """
    env = os.environ if env is None else env
    torch_imported_before = "torch" in sys.modules
    conf, conf_from, conf_set = None, None, False
    if use_torch:
        existing = next((k for k in ALLOC_CONF_ENVS if env.get(k)), None)
        if existing:
            conf, conf_from = env[existing], "environment" if existing == ALLOC_CONF_ENV else existing
        elif settings.worker_cuda_alloc_conf:
            # Before torch is imported (it reads the variable when it loads) and before any CUDA
            # call; undone below if this worker has no GPU.
            env[ALLOC_CONF_ENV] = conf = settings.worker_cuda_alloc_conf
            conf_from, conf_set = "worker_cuda_alloc_conf", True
    gpu = False
    if use_torch:
        import torch

        gpu = bool((cuda_available or torch.cuda.is_available)())
        if not gpu:
            if conf_set:
                env.pop(ALLOC_CONF_ENV, None)
            conf = conf_from = None
        elif conf_set and torch_imported_before:
            # torch was loaded before this ran (not the case in a replica): apply it the way
            # PyTorch allows at run time, which works until the allocator has been used.
            if torch.cuda.is_initialized():
                log.warning("CUDA is initialised already: %s=%s may not take effect", ALLOC_CONF_ENV, conf)
            try:
                torch.cuda.memory._set_allocator_settings(conf)
            except Exception:  # noqa: BLE001 - an allocator tweak must not stop the worker
                log.warning("could not apply %s=%s at run time", ALLOC_CONF_ENV, conf, exc_info=True)
    cores = node_cores() if cores is None else cores
    threads, rule = resolve_threads(settings.worker_threads, settings.worker_cpus, gpu, cores)
    for name in THREAD_ENVS:  # for child processes; Ray set OMP_NUM_THREADS to num_cpus
        env[name] = str(threads)
    if use_torch:
        torch.set_num_threads(threads)
    return {
        "device": ("cuda" if gpu else "cpu") if use_torch else "sim",
        "threads": threads,
        "threads_rule": rule,
        "node_cores": cores,
        "worker_cpus": settings.worker_cpus,
        "cuda_alloc_conf": conf,
        "cuda_alloc_conf_from": conf_from,
        "torch_imported_before": torch_imported_before,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _stored_reports() -> list[tuple[bytes, bool]]:
    """(key, alive) of every stored report: alive = its replica's actor still exists."""
    import ray

    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    return [(key, key.decode() in alive) for key in _kv()._internal_kv_list("", namespace=REPORTS_NAMESPACE)]


def publish_report(report: dict[str, Any]) -> None:
    """Store this replica's report (key: its actor name) and drop those of replicas that are gone."""
    kv = _kv()
    kv._internal_kv_put(report["replica"], json.dumps(report), overwrite=True, namespace=REPORTS_NAMESPACE)
    for key, alive in _stored_reports():
        if not alive:
            kv._internal_kv_del(key, namespace=REPORTS_NAMESPACE)


def worker_reports(app: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The reports of live worker replicas (of Serve application `app`, if given), per deployment
    name, sorted by replica. Read-only: stale entries are skipped (new replicas drop them)."""
    kv = _kv()
    out: dict[str, list[dict[str, Any]]] = {}
    for key, alive in _stored_reports():
        if not alive:
            continue
        raw = kv._internal_kv_get(key, namespace=REPORTS_NAMESPACE)
        try:
            report = json.loads(raw) if raw else None
        except ValueError:
            report = None
        if not isinstance(report, dict) or (app and report.get("app") not in (None, app)):
            continue
        out.setdefault(report.get("deployment") or "", []).append(report)
    for reports in out.values():
        reports.sort(key=lambda r: r.get("replica") or "")
    return out


def farm_worker_reports() -> dict[str, list[dict[str, Any]]]:
    """`worker_reports` of this replica's Serve application (outside a replica: every app's).
    Never fails: {} when the reports cannot be read."""
    try:
        from ray import serve

        app = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a replica: every app's workers
        app = None
    try:
        return worker_reports(app)
    except Exception:  # noqa: BLE001 - the status page must not fail over a report
        log.warning("could not read the worker reports", exc_info=True)
        return {}


def attach_worker_reports(info: dict[str, Any], reports: dict[str, list[dict[str, Any]]] | None = None
                          ) -> dict[str, Any]:
    """Add `workers` (the live replicas' reports; default: read now, `farm_worker_reports`) to each
    class of a `/v1/cluster` reply. Never fails: without reports a class gets an empty list."""
    if reports is None:
        reports = farm_worker_reports()
    for c in info.get("classes", []):
        c["workers"] = reports.get(c.get("deployment"), [])
    return info


#: Adapter sets (multiplexed model ids) a replica advertises to Serve's router, most recent first.
ADAPTER_SETS_PER_REPLICA = 16


def _multiplexed(count: int):
    from ray import serve

    return serve.multiplexed(max_num_models_per_replica=count)


class ProgressThrottle:
    """Which denoising steps a worker reports: the first and the last always, the others at most
    one per `interval` seconds (0: every step). Each event carries the latest step, so a client
    still sees where the job is; per-step events were most of the job manager's work (30 stream
    items a job through Serve), and a fast GPU finishes a step in well under a second."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: float | None = None

    def due(self, step: int, total: int) -> bool:
        now = self.clock()
        if self._last is not None and step < total and now - self._last < self.interval:
            return False
        self._last = now
        return True


class Worker:
    """Decode request -> predict -> encode response, for one GPU of one class."""

    def __init__(self, vram_class: dict[str, Any], settings: dict[str, Any]):
        import ray

        self.settings = FarmSettings.model_validate(settings)
        # First: threads and the CUDA allocator, before anything imports torch or touches CUDA.
        compute = setup_compute(self.settings, use_torch=self.settings.model != SIM)
        apply_umask(self.settings)  # results, spool, ffmpeg's output: file_mode (0600), directories 0700
        self.vram_class = VramClass.model_validate(vram_class)
        self.storage = open_storage(self.settings)
        self.node = ray.get_runtime_context().get_node_id()
        self.replica = ray.get_runtime_context().get_actor_name()
        self.worker_stats = WorkerStats.for_ray_actor(self.vram_class.memory_bytes)  # rides on events (metrics)
        self.backend = make_backend(self.settings, self.vram_class)
        self.adapters = WorkerAdapters(self.settings, self.backend, sim=self.settings.model == SIM)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        from pipeline.loading import cache_dir

        self.spool = Spool(self.settings.spool_dir or cache_dir() / "spool", self.storage,
                           file_mode=self.settings.file_mode_bits)
        self.uploader = BackgroundUploader(self.spool, self._notify_uploaded)
        for job_id in self.spool.claim_orphans():  # left by a replica that died on this node
            log.warning("resuming the upload of spooled job %s", job_id)
            self.uploader.submit(job_id)
        if compute["device"] != "sim":  # what the render thread really computes on
            compute["threads"] = self._pool.submit(_torch_threads).result()
        self._report = self._make_report(compute)
        try:
            publish_report(self._report)
        except Exception:  # noqa: BLE001 - a missing report must not stop the worker
            log.warning("could not publish this worker's report", exc_info=True)
        log.info("worker %s: %s, %d CPU threads (%s), %s=%s", self.replica, compute["device"], compute["threads"],
                 compute["threads_rule"], ALLOC_CONF_ENV, compute["cuda_alloc_conf"])

    def _make_report(self, compute: dict[str, Any]) -> dict[str, Any]:
        try:
            from ray import serve

            ctx = serve.get_replica_context()
            app, deployment = ctx.app_name, ctx.deployment
        except Exception:  # noqa: BLE001 - constructed outside Serve (tests)
            app, deployment = None, self.vram_class.deployment
        return {"replica": self.replica, "app": app, "deployment": deployment, "vram_class": self.vram_class.name,
                "node": self.node, "model": self.settings.model, **compute}

    def report(self) -> dict[str, Any]:
        """What this replica computes with: device, CPU threads (`torch.get_num_threads()` of its
        render thread) and their rule, the node's cores, `PYTORCH_CUDA_ALLOC_CONF` (GPU workers)."""
        return dict(self._report)

    def __del__(self):
        report = getattr(self, "_report", None)
        if report and report.get("replica"):
            try:
                _kv()._internal_kv_del(report["replica"], namespace=REPORTS_NAMESPACE)
            except Exception:  # noqa: BLE001 - shutting down
                pass

    def _notify_uploaded(self, job_id: str, result: dict[str, Any]) -> None:
        from ray import serve

        app = serve.get_replica_context().app_name
        manager = serve.get_deployment_handle("JobManager", app_name=app)
        manager.upload_finished.remote(job_id, result).result(timeout_s=30)

    async def run(self, job: dict[str, Any]):
        """Render one job (a `serving.jobs.RenderRequest` as a dict), streaming events (dicts of
        the `serving.jobs` worker events)."""
        job = RenderRequest.parse(job)
        await self._hold_adapter_set()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        canceled = threading.Event()

        throttle = ProgressThrottle(self.settings.progress_interval_s)

        def progress(step: int, total: int) -> None:
            if throttle.due(step, total):
                loop.call_soon_threadsafe(events.put_nowait, ProgressEvent(step=step, total=total).to_dict())

        def preview(step: int, total: int, image: bytes, seconds: float) -> None:  # every preview_interval_s
            event = PreviewEvent(step=step, total=total, image=image, seconds=round(seconds, 4)).to_dict()
            loop.call_soon_threadsafe(events.put_nowait, event)

        yield self.worker_stats.annotate(StartedEvent(node=self.node, replica=self.replica,
                                                      vram_class=self.vram_class.name, pid=os.getpid(),
                                                      threads=self._report["threads"]).to_dict())
        future = loop.run_in_executor(self._pool, self._render, job, progress, canceled.is_set, preview)
        try:
            while not future.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield self.worker_stats.annotate(getter.result())
                else:
                    getter.cancel()
            yield self.worker_stats.annotate(self._outcome(future))
        except BaseException:
            # Canceled (or the consumer went away): stop between steps and wait for the render
            # thread, so this replica never runs two jobs at once.
            canceled.set()
            await asyncio.wait({future})
            raise

    def _outcome(self, future) -> dict[str, Any]:
        try:
            return DoneEvent(**future.result()).to_dict()
        except GenerationCanceled:
            return CanceledEvent().to_dict()
        except OutOfMemory as exc:
            return ErrorEvent(code=ErrorCode.OUT_OF_MEMORY.value, message=exc.message).to_dict()
        except I2VError as exc:
            return ErrorEvent(code=exc.code, message=exc.message).to_dict()
        except Exception as exc:  # noqa: BLE001 - reported to the job, not swallowed
            log.exception("job failed")
            return ErrorEvent(code=ErrorCode.GENERATION_FAILED.value,
                              message=f"{type(exc).__name__}: {exc}").to_dict()

    async def _hold_adapter_set(self) -> None:
        """Tell Serve this replica holds the job's adapter set (its multiplexed model id, set by
        the job manager), so the router prefers it for the next job with the same set."""
        try:
            from ray import serve

            model_id = serve.get_multiplexed_model_id()
        except Exception:  # noqa: BLE001 - outside Serve (tests)
            return
        if model_id:
            self._loop = asyncio.get_running_loop()
            await self._adapter_set(model_id)

    def _prune_adapter_sets(self) -> None:
        """Stop advertising adapter sets whose weights the byte-bounded cache has evicted (Serve's
        own LRU counts sets, not bytes). Uses the multiplex wrapper Serve keeps on this replica;
        without it (another Ray version) routing falls back to Serve's count-bounded view."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        if wrapper is None:
            return
        try:
            held = {key.split("@", 1)[0] for key in self.adapters.loaded}
            stale = [mid for mid in list(wrapper.models) if not set(mid.split("+")) <= held]
            for mid in stale:
                wrapper.models.pop(mid, None)
            if stale:
                wrapper._push_multiplexed_replica_info = True
        except Exception:  # noqa: BLE001 - routing hints only
            log.debug("could not prune the advertised adapter sets", exc_info=True)

    @_multiplexed(ADAPTER_SETS_PER_REPLICA)
    async def _adapter_set(self, model_id: str) -> str:
        # The weights load in the render thread (`WorkerAdapters`, bounded by bytes); this only
        # records the id for Serve's routing (its own LRU, bounded by count).
        return model_id

    def _render(self, job: RenderRequest, progress, cancel, preview=None) -> dict[str, Any]:
        job_id, prefix = job.id, job.prefix
        params = GenerationParams.model_validate(job.params)
        with tempfile.TemporaryDirectory(prefix=".render-", dir=self.spool.root) as tmp:
            with self.adapters.applied(params) as adapter_stats:  # LoRA adapters (docs/adapters.md)
                out = self.backend.run(job_id, job.image, params, Path(tmp), progress, cancel, preview=preview)
            if adapter_stats is not None and adapter_stats.evicted and getattr(self, "_loop", None):
                self._loop.call_soon_threadsafe(self._prune_adapter_sets)
            record = {
                **out.record,
                **({"adapter_cache": adapter_stats.to_dict()} if adapter_stats is not None else {}),
                "vram_class": self.vram_class.name,
                "node": self.node,
                "attempt": job.attempt,
                "input_key": job.input_key,
                "peak_vram_bytes": out.peak_vram_bytes,
            }
            output = record["output"]
            done = {
                "result": {
                    "key": prefix + VIDEO_NAME,
                    "params_key": prefix + PARAMS_NAME,
                    "poster_key": prefix + POSTER_NAME,
                    "input_key": job.input_key,
                    "bytes": output["bytes"],
                    "frames": output["frames"],
                    "width": output["width"],
                    "height": output["height"],
                    "fps": output["fps"],
                },
                "timings": record["timings"],
                "peak_vram_bytes": out.peak_vram_bytes,
                "device": record.get("device"),
                "model": record["model"].get("name"),
                **({"adapters": adapter_stats.to_dict()} if adapter_stats is not None else {}),
            }
            self.spool.add(job_id, prefix, {
                VIDEO_NAME: out.video_path,
                PARAMS_NAME: (json.dumps(record, indent=2) + "\n").encode(),
                POSTER_NAME: out.poster,
                job.input_name: job.image,
            }, done)
        try:
            self.spool.upload(job_id)
        except StorageUnavailable as exc:
            self.worker_stats.storage_upload_failed()
            log.warning("job %s: storage unreachable (%s); results spooled on this node", job_id, exc)
            self.uploader.submit(job_id)
            return {**done, "uploaded": False, "upload_error": str(exc)}
        self.spool.remove(job_id)
        return {**done, "uploaded": True}

    def check_health(self) -> None:
        """Serve calls this periodically; a replica whose model is gone is replaced."""
        if self.backend is None:
            raise RuntimeError("model not loaded")
