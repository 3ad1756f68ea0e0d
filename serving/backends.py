"""What a worker runs: the real model (`i2vgen-xl` weights or `tiny-random`) or the `sim` model.

Both read as decode request -> predict -> encode response: `run()` takes the input image bytes
and validated parameters, reports progress after every denoising step, stops between steps when
`cancel()` says so, and leaves `video.mp4` and the parameter record in `out_dir`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.vram_classes import VramClass
from pipeline.errors import GenerationCanceled, OutOfMemory
from pipeline.images import load_image
from pipeline.request import GenerationParams, output_size
from pipeline.video import poster_jpeg

from .config import FarmSettings

SIM = "sim"

ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, int, bytes, float], None]
CancelFn = Callable[[], bool]


@dataclass
class BackendResult:
    video_path: Path
    record: dict[str, Any]
    """The parameter record (`params.json`): settings, model, device, timings, peak memory."""
    peak_vram_bytes: int | None
    """Peak accelerator memory; None on CPU (the record then holds the process's peak RSS)."""
    poster: bytes
    """The first frame as a JPEG."""


class ModelBackend:
    """I2VGen-XL through `pipeline` (real weights, or `tiny-random` on CPU)."""

    def __init__(self, settings: FarmSettings, vram_class: VramClass):
        from pipeline.generator import Generator, MemoryOptions
        from pipeline.loading import load_model

        self.vram_class = vram_class
        self.model = load_model(settings.model, dtype=settings.dtype, cpu_offload=settings.cpu_offload)
        self.generator = Generator(self.model, MemoryOptions(decode_chunk_size=settings.decode_chunk_size,
                                                             attention=settings.attention))
        self.name = settings.model
        self.preview_interval_s = settings.preview_interval_s
        self.preview_max_side = settings.preview_max_side

    def run(
        self, job_id: str, image_bytes: bytes, params: GenerationParams, out_dir: Path,
        progress: ProgressFn, cancel: CancelFn, preview: PreviewFn | None = None,
    ) -> BackendResult:
        """`preview(step, total, jpeg, seconds)`: live previews every `preview_interval_s`, unless the job
        turned them off (`params.preview`) or the farm did (interval 0)."""
        from pipeline.render import render

        image = load_image(image_bytes)
        if not params.preview or self.preview_interval_s <= 0:
            preview = None
        out = render(
            self.generator, image, params, out_dir, job_id=job_id, image_bytes=image_bytes,
            progress=progress, cancel=cancel, preview=preview, preview_interval_s=self.preview_interval_s,
            preview_max_side=self.preview_max_side,
        )
        peak = out.record["peak_memory_bytes"] if out.record["peak_memory_kind"].startswith("cuda") else None
        return BackendResult(video_path=out.video_path, record=out.record, peak_vram_bytes=peak,
                             poster=poster_jpeg(out.result.frames[0]))


class SimBackend:
    """No model: sleeps for the cost model's predicted time on this class's GPU (times
    `sim_time_scale`), reports progress per step, and writes a small valid MP4 (1/8 of the
    output size). Its peak VRAM is the estimate times `sim_vram_factor`; above the class's
    memory it fails with out-of-memory after the first step, as a real GPU would."""

    def __init__(self, settings: FarmSettings, vram_class: VramClass):
        self.vram_class = vram_class
        self.time_scale = settings.sim_time_scale
        self.vram_factor = settings.sim_vram_factor
        self.name = SIM

    def run(
        self, job_id: str, image_bytes: bytes, params: GenerationParams, out_dir: Path,
        progress: ProgressFn, cancel: CancelFn, preview: PreviewFn | None = None,
    ) -> BackendResult:
        """`preview` is never called: the sim model has no latents to preview."""
        from pipeline.cost_model import Workload, estimate
        from pipeline.video import encode_mp4

        started = time.perf_counter()
        params = params.with_seed()
        image = load_image(image_bytes)
        width, height = output_size(params.resolution, image.width, image.height)
        est = estimate(
            Workload(width, height, params.num_frames, params.num_inference_steps, guidance=params.guidance_scale > 1),
            self.vram_class.gpu_spec,
        )
        peak = int(est.vram_bytes * self.vram_factor)
        steps = params.num_inference_steps
        per_step = est.seconds * self.time_scale / steps
        for step in range(1, steps + 1):
            if cancel():
                raise GenerationCanceled("canceled")
            time.sleep(per_step)
            if peak > self.vram_class.memory_bytes:
                raise OutOfMemory(
                    f"out of GPU memory: needs {peak / 2**30:.1f} GiB, the {self.vram_class.name} "
                    f"GPU has {self.vram_class.memory_gib:g} GiB (simulated)"
                )
            progress(step, steps)
        denoise = time.perf_counter() - started

        w, h = max(16, width // 8 // 2 * 2), max(16, height // 8 // 2 * 2)
        frames = _sim_frames(params.num_frames, w, h, params.seed or 0)
        out_dir.mkdir(parents=True, exist_ok=True)
        encode_started = time.perf_counter()
        video = encode_mp4(frames, out_dir / "video.mp4", fps=params.fps, preset="ultrafast")
        record = {
            "id": job_id,
            "params": params.model_dump(),
            "width": width,
            "height": height,
            "model": {"name": SIM, "note": "simulated: timing from the cost model, the video is a placeholder"},
            "device": f"sim ({self.vram_class.gpu})",
            "estimate": {"vram_bytes": est.vram_bytes, "seconds": est.seconds},
            "timings": {
                "denoise": round(denoise, 3),
                "encode": round(time.perf_counter() - encode_started, 3),
                "total": round(time.perf_counter() - started, 3),
            },
            "peak_memory_bytes": peak,
            "peak_memory_kind": "simulated",
            "output": {k: video[k] for k in ("bytes", "frames", "width", "height", "fps", "codec")},
        }
        return BackendResult(video_path=Path(video["path"]), record=record, peak_vram_bytes=peak,
                             poster=poster_jpeg(frames[0]))


def _sim_frames(count: int, width: int, height: int, seed: int) -> np.ndarray:
    """A moving colour gradient, so the placeholder visibly plays."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    frames = []
    for i in range(count):
        phase = 2 * math.pi * i / max(count, 1)
        img = (base + 100 * np.sin(phase + 4 * x + 2 * y)) % 256
        frames.append(np.broadcast_to(img, (height, width, 3)))
    return np.stack(frames).astype(np.uint8)


def make_backend(settings: FarmSettings, vram_class: VramClass):
    if settings.model == SIM:
        return SimBackend(settings, vram_class)
    return ModelBackend(settings, vram_class)
