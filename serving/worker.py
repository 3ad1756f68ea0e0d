"""The per-class worker: a Ray Serve replica pinned to one GPU of its VRAM class.

One deployment per class (`Worker_12gb`, ...), each replica asking for `num_gpus: 1` plus its
class resource, so Ray places it only on a node of that class. The model is loaded once per
replica. A replica runs one job at a time (`max_ongoing_requests=1`); `run()` streams events:

    {"event": "started", "node", "replica", "vram_class", "pid"}
    {"event": "progress", "step", "total"}             after every denoising step
    {"event": "done", "result", "timings", "peak_vram_bytes", "uploaded", ...}
    {"event": "error", "code", "message"}              out_of_memory, generation_failed, ...

Canceling the request (the job manager cancels its stream) stops the job between steps.
Results go through the node's spool (`serving.uploader`): `uploaded: False` means storage was
unreachable, the files wait on this node, and the job manager hears `upload_finished` later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cluster.vram_classes import VramClass
from monitoring.metrics import WorkerStats
from pipeline.errors import GenerationCanceled, I2VError, OutOfMemory
from pipeline.request import GenerationParams

from .backends import make_backend
from .config import FarmSettings
from .files import apply_umask
from .storage import PARAMS_NAME, POSTER_NAME, VIDEO_NAME, StorageUnavailable, open_storage
from .uploader import BackgroundUploader, Spool

log = logging.getLogger(__name__)


class Worker:
    """Decode request -> predict -> encode response, for one GPU of one class."""

    def __init__(self, vram_class: dict[str, Any], settings: dict[str, Any]):
        import ray

        self.settings = FarmSettings.model_validate(settings)
        apply_umask(self.settings)  # results, spool, ffmpeg's output: file_mode (0600), directories 0700
        self.vram_class = VramClass.model_validate(vram_class)
        self.storage = open_storage(self.settings)
        self.node = ray.get_runtime_context().get_node_id()
        self.replica = ray.get_runtime_context().get_actor_name()
        self.worker_stats = WorkerStats.for_ray_actor(self.vram_class.memory_bytes)  # rides on events (metrics)
        self.backend = make_backend(self.settings, self.vram_class)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        from pipeline.loading import cache_dir

        self.spool = Spool(self.settings.spool_dir or cache_dir() / "spool", self.storage,
                           file_mode=self.settings.file_mode_bits)
        self.uploader = BackgroundUploader(self.spool, self._notify_uploaded)
        for job_id in self.spool.claim_orphans():  # left by a replica that died on this node
            log.warning("resuming the upload of spooled job %s", job_id)
            self.uploader.submit(job_id)

    def _notify_uploaded(self, job_id: str, result: dict[str, Any]) -> None:
        from ray import serve

        app = serve.get_replica_context().app_name
        manager = serve.get_deployment_handle("JobManager", app_name=app)
        manager.upload_finished.remote(job_id, result).result(timeout_s=30)

    async def run(self, job: dict[str, Any]):
        """Render one job (`id`, `params`, `image`, `attempt`), streaming events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        canceled = threading.Event()

        def progress(step: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"event": "progress", "step": step, "total": total})

        yield self.worker_stats.annotate({"event": "started", "node": self.node, "replica": self.replica,
                                         "vram_class": self.vram_class.name, "pid": os.getpid()})
        future = loop.run_in_executor(self._pool, self._render, job, progress, canceled.is_set)
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
            return {"event": "done", **future.result()}
        except GenerationCanceled:
            return {"event": "canceled"}
        except OutOfMemory as exc:
            return {"event": "error", "code": "out_of_memory", "message": exc.message}
        except I2VError as exc:
            return {"event": "error", "code": exc.code, "message": exc.message}
        except Exception as exc:  # noqa: BLE001 - reported to the job, not swallowed
            log.exception("job failed")
            return {"event": "error", "code": "generation_failed", "message": f"{type(exc).__name__}: {exc}"}

    def _render(self, job: dict[str, Any], progress, cancel) -> dict[str, Any]:
        job_id, prefix = job["id"], job["prefix"]
        params = GenerationParams.model_validate(job["params"])
        with tempfile.TemporaryDirectory(prefix=".render-", dir=self.spool.root) as tmp:
            out = self.backend.run(job_id, job["image"], params, Path(tmp), progress, cancel)
            record = {
                **out.record,
                "vram_class": self.vram_class.name,
                "node": self.node,
                "attempt": job.get("attempt", 1),
                "input_key": prefix + job["input_name"],
                "peak_vram_bytes": out.peak_vram_bytes,
            }
            output = record["output"]
            done = {
                "result": {
                    "key": prefix + VIDEO_NAME,
                    "params_key": prefix + PARAMS_NAME,
                    "poster_key": prefix + POSTER_NAME,
                    "input_key": prefix + job["input_name"],
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
            }
            self.spool.add(job_id, prefix, {
                VIDEO_NAME: out.video_path,
                PARAMS_NAME: (json.dumps(record, indent=2) + "\n").encode(),
                POSTER_NAME: out.poster,
                job["input_name"]: job["image"],
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
