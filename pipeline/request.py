"""The request schema: every setting of one image-to-video job, range-checked.

Field names follow the diffusers call (`num_frames`, `num_inference_steps`, `guidance_scale`,
`target_fps`, ...) and are shared by the HTTP API, the CLI, batch manifests and `params.json`.

Presets fill in the fields the caller left out; a field the caller sets always wins:

| preset     | resolution | num_frames | num_inference_steps | guidance_scale | fps |
|------------|------------|------------|---------------------|----------------|-----|
| `fast`     | 512p       | 8          | 30                  | 9.0            | 8   |
| `standard` | 512p       | 16         | 50                  | 9.0            | 8   |
| `high`     | 768p       | 24         | 80                  | 9.0            | 8   |

Resolution -> output size (`output_size`): `512p`, `768p` and `1024p` name a pixel budget of
N x N. The output keeps the input image's aspect ratio with width x height <= N^2, both sides
multiples of 8 (the VAE's downscale factor): a square image at `512p` renders at 512x512, a 16:9
one at 680x384, a 9:16 one at 384x680. So a resolution costs about the same memory and time
whatever the image's shape, which is what the scheduler's class choice rests on.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidRequest

Resolution = Literal["512p", "768p", "1024p"]
PresetName = Literal["fast", "standard", "high"]
SchedulerName = Literal["ddim", "dpmsolver++", "unipc"]
Priority = Literal["low", "normal", "high"]

RESOLUTION_PIXELS: dict[str, int] = {"512p": 512, "768p": 768, "1024p": 1024}

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"resolution": "512p", "num_frames": 8, "num_inference_steps": 30, "guidance_scale": 9.0, "fps": 8},
    "standard": {"resolution": "512p", "num_frames": 16, "num_inference_steps": 50, "guidance_scale": 9.0, "fps": 8},
    "high": {"resolution": "768p", "num_frames": 24, "num_inference_steps": 80, "guidance_scale": 9.0, "fps": 8},
}
DEFAULT_PRESET = "standard"

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1

# The prompt advice of the original WebUI, shown by the CLI and (later) the web page.
PROMPT_TIPS = (
    "Describe subject + action verb + direction/speed + environment effect, in English. "
    "Abstract words ('beautiful', 'amazing') give no motion cue."
)
PROMPT_EXAMPLES = (
    "A person walking forward naturally",
    "Ocean waves crashing on the shore, slow motion",
    "Camera slowly zooming in on the face",
    "A cat turning its head to the left",
    "Flowers blooming in spring garden, gentle breeze",
)


LORA_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # = pipeline.adapters.NAME_RE
MAX_LORAS = 3
LORA_SCALE_RANGE = (-2.0, 2.0)


class LoraRef(BaseModel):
    """One LoRA adapter of a job: its registered name, its scale, and (filled in by the farm from
    the registry, recorded in `params.json`) the SHA-256 of its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=LORA_NAME_PATTERN, description="Registered adapter name.")
    scale: float = Field(1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], description="LoRA strength.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the weights.")


def _parse_lora(value: Any) -> Any:
    """`lora` as a list of {name, scale}, a JSON text of one (forms, manifests), or `NAME:SCALE,...`
    (command lines); checked here so a 422 says which entry is wrong."""
    import json

    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError("must be a JSON list of {\"name\", \"scale\"} objects") from None
        else:
            value = [dict(zip(("name", "scale"), part.strip().split(":", 1))) for part in text.split(",")
                     if part.strip()]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of {\"name\", \"scale\"} objects")
    if len(value) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} adapters per job, got {len(value)}")
    out, names = [], set()
    for i, item in enumerate(value):
        if isinstance(item, LoraRef):
            item = item.model_dump()
        if not isinstance(item, dict):
            raise ValueError(f"lora[{i}] must be an object with 'name' and 'scale'")
        try:
            ref = LoraRef.model_validate(item)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            if where == "scale" and err.get("type", "").startswith(("greater", "less")):
                low, high = LORA_SCALE_RANGE
                raise ValueError(f"lora[{i}].scale must be between {low:g} and {high:g}, "
                                 f"got {err.get('input')!r}") from None
            if where == "name" and err.get("type") == "string_pattern_mismatch":
                raise ValueError(f"lora[{i}].name {err.get('input')!r} is not an adapter name "
                                 "(lower-case letters, digits, '.', '_', '-')") from None
            raise ValueError(f"lora[{i}].{where}: {err.get('msg')}") from None
        if ref.name in names:
            raise ValueError(f"adapter {ref.name!r} is named twice")
        names.add(ref.name)
        out.append(ref)
    return tuple(out)


class GenerationParams(BaseModel):
    """Every setting of one job except the image itself.

    Unknown fields are refused (a typo must not be silently ignored).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What should move, and how.")
    negative_prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, description="What to steer away from (empty: none)."
    )
    preset: PresetName | None = Field(
        None, description="fast | standard | high: fills in the fields not given (default: standard)."
    )
    resolution: Resolution = Field("512p", description="Pixel budget N x N; the aspect ratio is kept.")
    num_frames: int = Field(16, ge=8, le=32, description="Frames to generate (8-32).")
    fps: int = Field(8, ge=1, le=60, description="Frames per second of the exported MP4.")
    target_fps: int = Field(16, ge=1, le=60, description="I2VGen-XL's fps micro-conditioning (motion speed).")
    num_inference_steps: int = Field(50, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float = Field(9.0, ge=1.0, le=30.0, description="Classifier-free guidance (1: off).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed (empty: pick one and record it).")
    scheduler: SchedulerName = Field("ddim", description="Sampler: ddim (the model's own), dpmsolver++, unipc.")
    priority: Priority = Field("normal", description="Queue priority on the farm.")
    lora: tuple[LoraRef, ...] = Field(
        (), description="Up to 3 LoRA adapters, [{\"name\", \"scale\"}] (scale -2 to 2); see docs/adapters.md.",
    )
    preview: bool = Field(True, description="Live previews while the job denoises (false: none; the video is "
                          "the same either way).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None and v != ""}
        preset = data.get("preset") or DEFAULT_PRESET
        if isinstance(preset, str) and preset in PRESETS:  # a list or dict is refused by the field check
            for key, value in PRESETS[preset].items():
                data.setdefault(key, value)
        return data

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_list(cls, value: Any) -> Any:
        return _parse_lora(value)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_control_chars(cls, value: str) -> str:
        if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value) or "\x7f" in value:
            raise ValueError("must not contain control characters")
        return value

    def with_seed(self) -> "GenerationParams":
        """The same parameters with a concrete seed (a fresh random one when none was given)."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})


def parse_params(data: dict[str, Any]) -> GenerationParams:
    """Validate raw fields (JSON, form, CLI) into `GenerationParams`.

    Raises `InvalidRequest` naming the first offending field and saying what is allowed.
    """
    try:
        return GenerationParams.model_validate(data)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "__root__"]
    field = loc[0] if loc else None
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = ", ".join(GenerationParams.model_fields)
        message = f"unknown field '{field}' (allowed: {allowed})"
    elif kind == "missing":
        message = f"'{field}' is required"
    elif kind == "literal_error":
        message = f"'{field}' must be one of {ctx.get('expected', '')}, got {err.get('input')!r}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _field_bounds(field)
        message = f"'{field}' must be between {low} and {high}, got {err.get('input')!r}"
    elif kind.startswith(("int_", "float_", "string_type", "bool_")):
        expected = {"int": "a whole number", "float": "a number", "string": "text",
                    "bool": "true or false"}.get(kind.split("_")[0], kind)
        message = f"'{field}' must be {expected}, got {err.get('input')!r}"
    elif kind in ("string_too_short", "string_too_long"):
        low, high = _field_bounds(field)
        message = f"'{field}' must be {low} to {high} characters long"
    else:
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        message = f"'{field}': {msg}" if field else err.get("msg", "invalid request")
    return InvalidRequest(message, field=field)


def _field_bounds(field: str | None) -> tuple[Any, Any]:
    info = GenerationParams.model_fields.get(field or "")
    low = high = None
    for meta in getattr(info, "metadata", []):
        for attr in ("ge", "gt", "min_length"):
            low = getattr(meta, attr, low) if getattr(meta, attr, None) is not None else low
        for attr in ("le", "lt", "max_length"):
            high = getattr(meta, attr, high) if getattr(meta, attr, None) is not None else high
    return low, high


def output_size(resolution: str, image_width: int, image_height: int) -> tuple[int, int]:
    """(width, height) for `resolution` and an input of the given size: aspect kept,
    width x height <= N^2, both multiples of 8 (see the module docstring)."""
    n = RESOLUTION_PIXELS[resolution]
    aspect = image_width / image_height
    width = math.sqrt(n * n * aspect)
    height = width / aspect
    width8, height8 = max(8, int(width) // 8 * 8), max(8, int(height) // 8 * 8)
    return width8, height8
