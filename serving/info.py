"""What the web page (or any client) asks before submitting, and the page's files: the model and
what its output is, presets, field ranges and tips (`GET /v1/info`, `farm_info`), the cost-model
estimate of a request (`POST /v1/estimate`, `estimate_request`), the page's files (`/`, `/ui/<name>`)
and the API page's (`/docs`). `serving.api` routes to these; none of them needs Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.responses import FileResponse, Response

from pipeline.errors import I2VError, InvalidRequest
from pipeline.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE
from pipeline.loading import TINY_RANDOM
from pipeline.render import TINY_RANDOM_NOTE
from pipeline.request import (
    DEFAULT_PRESET,
    PRESETS,
    PROMPT_EXAMPLES,
    PROMPT_TIPS,
    RESOLUTION_PIXELS,
    GenerationParams,
    parse_params,
)

from .backends import SIM
from .config import FarmSettings
from .jobs import ACTIVE, FINISHED, JobStatus
from .scheduler import NoClassFits, Scheduler
from .scheduler import estimate_request as estimate_cost

#: The web page's files (`serving/web`, shipped as package data), served at `/` and `/ui/<name>`.
WEB_DIR = Path(__file__).parent / "web"
WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

IMAGE_TIPS = (
    "512x512 or larger works best.",
    "A clear, centred subject on a simple background.",
    "Avoid blurry pictures, crowds and posters full of text.",
)
TUNING_TIPS = (
    "Motion too weak: raise the guidance scale to 10-12.",
    "Blurry: use 60-80 steps.",
    "Too large for the farm (or out of memory): lower the resolution or the number of frames.",
)
SIM_NOTE = "sim model: no network runs; timing comes from the cost model and the video is a placeholder."
ESTIMATE_NOTES = {
    TINY_RANDOM: "Times are the cost model's for the real model on each class's GPU; tiny-random runs at its own pace.",
    SIM: "The sim model sleeps a fraction (sim_time_scale) of these times.",
}
REAL_WEIGHTS = {
    "summary": "Download the I2VGen-XL weights once, then start the farm on them (nothing is downloaded at run time).",
    "commands": [
        "hf download ali-vilab/i2vgen-xl --local-dir /models/i2vgen-xl",
        "i2v-farm up --model /models/i2vgen-xl    # or: export I2V_MODEL=/models/i2vgen-xl",
    ],
}


def _web_files() -> dict[str, Path]:
    if not WEB_DIR.is_dir():
        return {}
    return {p.name: p for p in WEB_DIR.iterdir() if p.is_file() and p.suffix in WEB_TYPES}


DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>i2v-farm API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
  <link rel="icon" href="docs/favicon.png">
  <script src="docs/swagger-ui-bundle.js" defer></script>
  <script src="ui/docs.js" defer></script>
</head>
<body><div id="swagger-ui"></div></body>
</html>
"""


def _docs_files() -> dict[str, Path]:
    """swagger-ui's files, bundled by the `fastapi-offline` package (no CDN)."""
    try:
        import fastapi_offline
    except ImportError:
        return {}
    static = Path(fastapi_offline.__file__).parent / "static"
    names = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
    return {n: static / n for n in names if (static / n).is_file()}


def web_file(name: str) -> Response:
    """One file of the web page (only the files of `serving/web`; never a path)."""
    path = _web_files().get(name)
    if path is None:
        raise I2VError(f"no page asset {name!r}", code="not_found", http_status=404)
    return FileResponse(path, media_type=WEB_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


def model_kind(model: str) -> str:
    """`tiny-random`, `sim`, or `i2vgen-xl` (real weights: a directory or a hub id)."""
    return model if model in (TINY_RANDOM, SIM) else "i2vgen-xl"


def _field_specs() -> dict[str, dict[str, Any]]:
    """Type, default, range or choices and description of every request field (from the schema)."""
    specs = {}
    for name, prop in GenerationParams.model_json_schema()["properties"].items():
        prop = dict(prop)
        for alt in prop.pop("anyOf", []):  # `int | None` and friends: the non-null branch
            if alt.get("type") != "null":
                prop.update(alt)
        spec = {k: prop[k] for k in ("type", "default", "minimum", "maximum", "enum", "maxLength", "description")
                if k in prop}
        spec["required"] = "default" not in prop
        specs[name] = spec
    return specs


def farm_info(settings: FarmSettings) -> dict[str, Any]:
    """What the web page (or any client) needs before it asks: the model and what its output is,
    presets, field ranges, image limits, prompt tips and the active VRAM classes."""
    kind = model_kind(settings.model)
    return {
        "model": settings.model,
        "model_kind": kind,
        "note": {TINY_RANDOM: TINY_RANDOM_NOTE, SIM: SIM_NOTE}.get(kind),
        "real_weights": REAL_WEIGHTS if kind != "i2vgen-xl" else None,
        "estimate_note": ESTIMATE_NOTES.get(kind),
        "presets": PRESETS,
        "default_preset": DEFAULT_PRESET,
        "fields": _field_specs(),
        "prompt_tips": PROMPT_TIPS,
        "prompt_examples": list(PROMPT_EXAMPLES),
        "tuning_tips": list(TUNING_TIPS),
        "image": {
            "types": ["image/jpeg", "image/png", "image/webp"],
            "max_bytes": settings.max_image_bytes,
            "min_side": MIN_IMAGE_SIDE,
            "max_pixels": MAX_IMAGE_PIXELS,
            "max_aspect_ratio": MAX_ASPECT_RATIO,
            "tips": list(IMAGE_TIPS),
        },
        "classes": [{"name": c.name, "memory_gib": c.memory_gib, "gpu": c.gpu} for c in settings.active_classes],
        # the job statuses (serving.jobs), so clients (the web page) need no list of their own
        "statuses": {
            "all": [s.value for s in JobStatus],
            "active": [s.value for s in JobStatus if s in ACTIVE],
            "finished": [s.value for s in JobStatus if s in FINISHED],
        },
    }


def _image_side(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
        raise InvalidRequest(f"'{field}' must be the image's {field} in pixels (1-100000), got {value!r}",
                             field=field)
    return value


def estimate_request(settings: FarmSettings, data: dict[str, Any]) -> dict[str, Any]:
    """The cost-model estimate of a request before it is submitted: peak VRAM, the smallest active
    class that holds it, and seconds on that class's GPU, as `POST /v1/jobs` would place it.

    `data` holds the request fields (the prompt may be left out) plus the image's `width` and
    `height` (default: a square image). A job no class can hold answers `fits: false` with the reason.
    """
    data = dict(data)
    width = _image_side(data.pop("width", None), "width")
    height = _image_side(data.pop("height", None), "height")
    if width and height and max(width, height) / min(width, height) > MAX_ASPECT_RATIO:  # as POST /v1/jobs would
        raise InvalidRequest(f"an image of {width}x{height} would be refused: its aspect ratio may be at most "
                             f"{MAX_ASPECT_RATIO:g}:1 either way", field="width" if width > height else "height")
    if not str(data.get("prompt") or "").strip():
        data["prompt"] = "(estimate)"  # the estimate does not depend on the prompt
    params = parse_params(data)
    if width is None or height is None:
        width = height = RESOLUTION_PIXELS[params.resolution]
    classes = settings.active_classes
    out_w, out_h, vram, seconds = estimate_cost(classes, params, width, height, dtype=settings.dtype,
                                                cpu_offload=settings.cpu_offload,
                                                decode_chunk_size=settings.decode_chunk_size)
    reply: dict[str, Any] = {
        "fits": True, "reason": None, "vram_class": None, "gpu": None, "vram_bytes": vram, "seconds": None,
        "width": out_w, "height": out_h, "num_frames": params.num_frames, "fps": params.fps,
        "duration_s": round(params.num_frames / params.fps, 3),
        "params": params.model_dump(exclude={"prompt", "negative_prompt"}),
    }
    try:
        home = Scheduler(classes).place(vram)
    except NoClassFits as exc:
        return {**reply, "fits": False, "reason": exc.message}
    return {**reply, "vram_class": home, "gpu": classes[home].gpu, "seconds": round(seconds[home], 2)}


def docs_page() -> Response:
    """The API's OpenAPI page (`/docs`): swagger-ui from the `fastapi-offline` package, no CDN."""
    return Response(DOCS_HTML, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


def docs_file(name: str) -> Response:
    """One of swagger-ui's files (`/docs/<name>`; only those `fastapi-offline` bundles, never a path)."""
    path = _docs_files().get(name)
    if path is None:
        raise I2VError(f"no docs asset {name!r}", code="not_found", http_status=404)
    return FileResponse(path, media_type=WEB_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "max-age=86400"})
