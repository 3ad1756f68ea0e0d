"""One job on one GPU, end to end: image + parameters -> MP4 + `params.json`.

This is what the CLI's `generate` runs and what a farm worker runs inside its replica:

    decode + validate the image -> generate frames -> encode the MP4 -> write the parameter record
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import PIL.Image

from .generator import CancelFn, GenerationResult, Generator, ProgressFn
from .request import GenerationParams, output_size
from .video import encode_mp4, video_filename

TINY_RANDOM_NOTE = (
    "tiny-random model: random weights, so the video is noise. "
    "Point the farm at real weights with --model DIR (a diffusers I2VGen-XL directory) or I2V_MODEL."
)


@dataclass
class RenderOutput:
    video_path: Path
    params_path: Path
    record: dict[str, Any]
    result: GenerationResult


def device_name(generator: Generator) -> str:
    device = generator.device
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def render(
    generator: Generator,
    image: PIL.Image.Image,
    params: GenerationParams,
    out_dir: str | os.PathLike,
    *,
    job_id: str | None = None,
    image_bytes: bytes | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    size: tuple[int, int] | None = None,
    **preview: Any,
) -> RenderOutput:
    """Generate and save `video_YYYYMMDD_HHMMSS_<id>.mp4` and `<same stem>.params.json` in `out_dir`.

    The parameter record holds every setting (with the seed actually used), the model, the
    device, timings (load, conditioning, denoise, decode, encode, total) and peak memory.
    `preview`: `preview`, `preview_interval_s`, `preview_max_side` of `Generator.generate`
    (live previews; they are not saved).
    """
    started = time.perf_counter()
    created = datetime.now(timezone.utc)
    job_id = job_id or uuid.uuid4().hex
    params = params.with_seed()
    size = size or output_size(params.resolution, image.width, image.height)

    result = generator.generate(image, params, size=size, progress=progress, cancel=cancel, **preview)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    video_path = out / video_filename(created.astimezone(), short_id=job_id[:8])
    encode_started = time.perf_counter()
    video = encode_mp4(result.frames, video_path, fps=params.fps)
    encode_seconds = time.perf_counter() - encode_started

    model = generator.model
    record: dict[str, Any] = {
        "id": job_id,
        "created_at": created.isoformat(),
        "params": params.model_dump(),
        "width": result.width,
        "height": result.height,
        "model": {
            "name": model.name,
            "source": model.source,
            "dtype": model.dtype,
            "cpu_offload": model.cpu_offload,
            "note": TINY_RANDOM_NOTE if model.is_tiny_random else None,
        },
        "device": device_name(generator),
        "memory_options": generator.options.__dict__,
        "timings": {
            "load": round(model.load_seconds, 3),
            **{k: round(v, 3) for k, v in result.timings.items()},
            "encode": round(encode_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "input": {
            "width": image.width,
            "height": image.height,
            "sha256": hashlib.sha256(image_bytes).hexdigest() if image_bytes is not None else None,
        },
        "output": {
            "file": video_path.name,
            "bytes": video["bytes"],
            "frames": video["frames"],
            "width": video["width"],
            "height": video["height"],
            "fps": video["fps"],
            "codec": video["codec"],
        },
        "versions": _versions(),
    }
    params_path = video_path.with_name(video_path.stem + ".params.json")
    tmp = params_path.with_name("." + params_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, params_path)
    return RenderOutput(video_path=video_path, params_path=params_path, record=record, result=result)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("i2v-farm", "torch", "diffusers", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions
