"""The per-class worker: a Ray Serve replica pinned to one GPU of its VRAM class.

One deployment per class (`Worker_12gb`, ...), each replica asking for `num_gpus: 1` plus its
class resource, so Ray places it only on a node of that class. The model is loaded once per
replica. A replica runs one job at a time (`max_ongoing_requests=1`); `run()` streams events:

    {"event": "started", "node", "replica", "vram_class", "pid"}
    {"event": "progress", "step", "total"}             after every denoising step
    {"event": "done", "result", "timings", "peak_vram_bytes", "params"}
    {"event": "error", "code", "message"}              out_of_memory, generation_failed, ...

Canceling the request (the job manager cancels its stream) stops the job between steps.
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
from pipeline.errors import GenerationCanceled, I2VError, OutOfMemory
from pipeline.request import GenerationParams

from .backends import make_backend
from .config import FarmSettings
from .storage import PARAMS_NAME, VIDEO_NAME, job_key, open_storage

log = logging.getLogger(__name__)


class Worker:
    """Decode request -> predict -> encode response, for one GPU of one class."""

    def __init__(self, vram_class: dict[str, Any], settings: dict[str, Any]):
        import ray

        self.settings = FarmSettings.model_validate(settings)
        self.vram_class = VramClass.model_validate(vram_class)
        self.storage = open_storage(self.settings.storage_url)
        self.node = ray.get_runtime_context().get_node_id()
        self.replica = ray.get_runtime_context().get_actor_name()
        self.backend = make_backend(self.settings, self.vram_class)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    async def run(self, job: dict[str, Any]):
        """Render one job (`id`, `params`, `image`, `attempt`), streaming events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        canceled = threading.Event()

        def progress(step: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"event": "progress", "step": step, "total": total})

        yield {"event": "started", "node": self.node, "replica": self.replica, "vram_class": self.vram_class.name,
               "pid": os.getpid()}
        future = loop.run_in_executor(self._pool, self._render, job, progress, canceled.is_set)
        try:
            while not future.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            yield self._outcome(future)
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
        job_id = job["id"]
        params = GenerationParams.model_validate(job["params"])
        with tempfile.TemporaryDirectory(prefix="i2v-job-") as tmp:
            out = self.backend.run(job_id, job["image"], params, Path(tmp), progress, cancel)
            record = {
                **out.record,
                "vram_class": self.vram_class.name,
                "node": self.node,
                "attempt": job.get("attempt", 1),
                "input_key": job.get("input_key"),
                "peak_vram_bytes": out.peak_vram_bytes,
            }
            video_key = job_key(job_id, VIDEO_NAME)
            self.storage.put_file(video_key, out.video_path, "video/mp4")
            self.storage.put_bytes(
                job_key(job_id, PARAMS_NAME), (json.dumps(record, indent=2) + "\n").encode(), "application/json"
            )
        output = record["output"]
        return {
            "result": {
                "key": video_key,
                "params_key": job_key(job_id, PARAMS_NAME),
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

    def check_health(self) -> None:
        """Serve calls this periodically; a replica whose model is gone is replaced."""
        if self.backend is None:
            raise RuntimeError("model not loaded")
