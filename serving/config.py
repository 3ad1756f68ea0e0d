"""Farm settings: one typed object, read from a file and `I2V_*` environment variables.

Precedence (highest first): explicit overrides (CLI flags) > `I2V_*` environment > the settings
file named by `I2V_CONFIG` (YAML or JSON) > defaults. The defaults start a working farm on one
machine: local Ray, the `tiny-random` model, results under `./outputs`, HTTP on 127.0.0.1:8000.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.vram_classes import DEFAULT_CLASSES, ClassSet, VramClass


class WorkerScaling(BaseModel):
    """Replicas of one class's worker deployment (Ray Serve autoscaling bounds)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(0, ge=0, le=1024, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=0, le=1024, description="Upper bound (one replica per GPU of the class).")


class FarmSettings(BaseModel):
    """Everything a farm needs to run. Each field maps to `I2V_<FIELD>` in the environment."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny-random",
        description="`tiny-random`, `sim`, a local diffusers directory, or a hub id already in the local cache.",
    )
    host: str = Field("127.0.0.1", description="HTTP address to listen on (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    storage_url: str = Field("file://./outputs", description="Where results land: `file://DIR` or `s3://BUCKET`.")
    s3_endpoint: str = Field("", description="S3/MinIO `host:port` workers and the API use (s3:// storage).")
    s3_access_key: str = Field("", repr=False, description="S3 access key.")
    s3_secret_key: str = Field("", repr=False, description="S3 secret key (never logged or recorded).")
    s3_secure: bool = Field(False, description="TLS to the S3 endpoint.")
    s3_region: str = Field("us-east-1", description="S3 region (MinIO ignores it; presigning needs one).")
    s3_public_endpoint: str = Field(
        "", description="`[https://]host:port` clients reach, for presigned URLs (default: s3_endpoint)."
    )
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="Lifetime of presigned video URLs.")
    spool_dir: str = Field(
        "",
        description="Node-local directory where finished results wait while storage is unreachable "
        "(default: `spool/` in the model cache, $I2V_CACHE_DIR or ~/.cache/i2v-farm).",
    )
    retention_days: float | None = Field(
        None, gt=0, description="`i2v-farm gc` default: delete results older than this (None: keep)."
    )
    job_db: str = Field(
        "./outputs/jobs.sqlite3", description="Durable job store (SQLite file on the head node)."
    )
    classes: list[VramClass] = Field(
        default_factory=lambda: list(DEFAULT_CLASSES), description="The VRAM classes of the fleet."
    )
    workers: dict[str, WorkerScaling] = Field(
        default_factory=dict,
        description="Per-class replica bounds; a class not listed gets no worker deployment.",
    )
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API tokens: auto = required whenever `host` is not loopback."
    )
    tokens_file: str = Field("", description="Hashed API tokens (default: tokens.json beside the job store).")
    ray_auth: Literal["token", "off"] = Field(
        "token", description="Ray's own authentication for the Ray cluster the farm starts (`RAY_AUTH_MODE=token`).",
    )
    ray_token_file: str = Field(
        "", description="The Ray cluster token (default: ray_token beside the job store; made 0600 on first start).",
    )
    session_ttl_s: int = Field(
        12 * 3600, ge=60, le=30 * 24 * 3600, description="Lifetime of a web page session (`POST /v1/login`).",
    )
    max_streams_per_token: int = Field(
        8, ge=1, le=10000, description="Server-sent event streams one caller may hold open at once (more: 429).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses/CIDRs of reverse proxies whose X-Forwarded-For/-Proto headers are believed "
        "(`I2V_TRUSTED_PROXIES`, comma-separated; empty: none).",
    )
    api_docs: bool = Field(True, description="Serve the OpenAPI page at /docs (its assets bundled, no CDN).")
    egress_allow: list[str] = Field(
        default_factory=list,
        description="CIDRs/hosts the farm may fetch from although they are loopback, private, link-local or "
        "metadata addresses (batch image URLs, webhooks); `I2V_EGRESS_ALLOW`, comma-separated.",
    )
    file_mode: str = Field(
        "0600", description="Mode of the files the farm writes (directories get x where r is set): "
        "0600 = the farm's user only, 0640/0660 for a shared group.",
    )
    backlog_limit: int = Field(100, ge=1, description="Queued jobs per class before new ones get 429.")
    max_attempts: int = Field(3, ge=1, le=10, description="Tries per job (worker death, out of memory).")
    spill: bool = Field(True, description="Let jobs spill up to a larger idle class when theirs is backed up.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Model dtype: auto = fp16 on GPU, fp32 on CPU."
    )
    cpu_offload: bool = Field(False, description="diffusers model CPU offload (less VRAM, slower).")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernels of the workers.")
    decode_chunk_size: int = Field(
        1, ge=1, le=32, description="Frames the VAE decodes at once (more: faster, more VRAM)."
    )
    node_autoscaling: bool = Field(
        False, description="The Ray cluster adds GPU nodes on demand: request replicas for queued work even "
        "when no GPU of the class is free.",
    )
    sim_time_scale: float = Field(
        0.01, gt=0, le=10, description="`sim` model: fraction of the cost model's predicted seconds to sleep."
    )
    sim_vram_factor: float = Field(
        1.0, gt=0, le=10,
        description="`sim` model: true peak VRAM relative to the estimate (>1 simulates an underestimate -> OOM).",
    )
    max_image_bytes: int = Field(20 * 2**20, ge=1024, description="Largest accepted upload.")
    worker_cpus: float = Field(1.0, gt=0, description="Logical CPUs each worker replica reserves.")
    worker_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="CPU threads a worker's torch computes on (intra-op). 0 = auto: all of the node's cores "
        "when the worker runs without a GPU, `worker_cpus` (at least 1) with one.",
    )
    worker_cuda_alloc_conf: str = Field(
        "expandable_segments:True",
        description="`PYTORCH_CUDA_ALLOC_CONF` of GPU workers (empty: PyTorch's default). Expandable segments "
        "keep reserved memory near allocated memory: measured on an H200, a 12 GB card then holds 768p x 16 "
        "and 512p x 32, a 24 GB card 1024p x 24 (docs/benchmarks.md). A value set in the worker's "
        "environment wins.",
    )

    # --- fair sharing (issue 16) -------------------------------------------------------------
    fair_share: bool = Field(
        True, description="Within a priority, callers share each class's GPUs by deficit round robin over "
        "estimated GPU-seconds (the token's name is the caller); off: first come, first served.",
    )
    share_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Fair-share weight per caller name (default 1); `I2V_SHARE_WEIGHTS` as JSON, "
        'e.g. {"render-team": 2}.',
    )
    spill_rule: Literal["earliest_finish", "idle"] = Field(
        "earliest_finish", description="With `spill` on, where a job runs: `earliest_finish` (the class "
        "among its own and those it may spill to that would finish it first, counting the work queued and "
        "running there) or `idle` (the rule before issue 16: its own class, or a larger one with an idle GPU "
        "when its own has none).",
    )
    progress_interval_s: float = Field(
        0.25, ge=0, le=60, description="Least time between two progress events a worker sends for one job "
        "(the first and last steps always go); 0 sends every step.",
    )
    # --- live previews, adapters, webhooks, reuse (issue 18) ---------------------------------
    preview_interval_s: float = Field(
        1.0, ge=0, le=60, description="Seconds between live previews of a denoising job (0: no previews).",
    )
    preview_max_side: int = Field(
        160, ge=16, le=1024, description="Longest side in pixels of a live preview frame.",
    )
    adapters_url: str = Field(
        "", description="LoRA adapter registry: a directory or `s3://BUCKET/PREFIX` "
        "(default: `adapters/` beside the job store).",
    )
    adapter_cache_bytes: int = Field(
        2 * 2**30, ge=0, description="Memory a worker may keep for recently used LoRA adapters (LRU).",
    )
    adapter_affinity_wait_s: float = Field(
        10.0, ge=0, le=3600, description="Longest a job waits for a worker that already holds its adapters "
        "while a worker of its class without them is free.",
    )
    adapter_affinity: bool = Field(
        True, description="Route a job with LoRA adapters to a free worker of its class that holds them "
        "(Serve model multiplexing; off: plain routing, for comparison).",
    )
    webhook_retry_s: float = Field(
        3600.0, ge=0, le=7 * 24 * 3600, description="How long a failing webhook delivery is retried "
        "(with backoff) before it is given up.",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Timeout of one webhook POST.")
    webhook_backoff_s: float = Field(
        1.0, gt=0, le=300, description="Wait before the first retry of a failing webhook delivery; each "
        "later wait doubles, at most 300 s.",
    )

    @field_validator("file_mode")
    @classmethod
    def _file_mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError("must be an octal mode such as 0600 or 0640") from None
        if mode & ~0o666 or not mode & 0o600 == 0o600:
            raise ValueError("must give the owner read+write and no execute bits, e.g. 0600, 0640, 0660")
        if mode & 0o006:
            raise ValueError("must not give others access (use a group: 0640 or 0660)")
        return "0" + format(mode, "o")

    @property
    def file_mode_bits(self) -> int:
        """`file_mode` as an int (0o600)."""
        return int(self.file_mode, 8)

    @property
    def dir_mode_bits(self) -> int:
        """Directory mode from `file_mode`: x wherever r is set (0o600 -> 0o700, 0o640 -> 0o750)."""
        from .files import dir_mode_for

        return dir_mode_for(self.file_mode_bits)

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        if not (value.startswith("file://") or value.startswith("s3://")):
            raise ValueError("must start with file:// or s3://")
        return value

    @model_validator(mode="after")
    def _workers_name_classes(self) -> "FarmSettings":
        names = {c.name for c in self.classes}
        ClassSet(self.classes)  # duplicate names, bad spill rules
        for name, scaling in self.workers.items():
            if name not in names:
                raise ValueError(f"workers: unknown VRAM class {name!r}; classes: {', '.join(sorted(names))}")
            if scaling.min_replicas > scaling.max_replicas:
                raise ValueError(f"workers.{name}: min_replicas > max_replicas")
        return self

    # ---------------------------------------------------------------------------------------

    @property
    def class_set(self) -> ClassSet:
        return ClassSet(self.classes)

    @property
    def active_classes(self) -> ClassSet:
        """The classes that have a worker deployment (max_replicas > 0)."""
        names = [n for n, w in self.workers.items() if w.max_replicas > 0]
        return self.class_set.subset(names)

    def resolved(self) -> "FarmSettings":
        """Relative paths made absolute (deployments may run with another working directory)."""
        update: dict[str, Any] = {"job_db": str(Path(self.job_db).expanduser().resolve())}
        if self.tokens_file:
            update["tokens_file"] = str(Path(self.tokens_file).expanduser().resolve())
        if self.ray_token_file:
            update["ray_token_file"] = str(Path(self.ray_token_file).expanduser().resolve())
        if self.storage_url.startswith("file://"):
            update["storage_url"] = "file://" + str(Path(self.storage_url[len("file://"):]).expanduser().resolve())
        return self.model_copy(update=update)


#: Settings also read from MinIO's usual environment variables (I2V_* wins).
MINIO_ENV = {
    "s3_endpoint": ("MINIO_ENDPOINT",),
    "s3_access_key": ("MINIO_ACCESS_KEY", "MINIO_ROOT_USER"),
    "s3_secret_key": ("MINIO_SECRET_KEY", "MINIO_ROOT_PASSWORD"),
    "s3_secure": ("MINIO_SECURE",),
    "s3_region": ("MINIO_REGION",),
}


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> FarmSettings:
    """Settings from `I2V_CONFIG` (file), `I2V_*` variables and `overrides` (None values ignored)."""
    env = dict(os.environ if env is None else env)
    data: dict[str, Any] = {}
    path = env.get("I2V_CONFIG")
    if path:
        data.update(_read_file(Path(path)))
    for name, var in MINIO_ENV.items():  # MinIO's own variable names, as a fallback
        for candidate in var:
            if env.get(candidate):
                data[name] = env[candidate]
                break
    for name in FarmSettings.model_fields:
        value = env.get("I2V_" + name.upper())
        if value is not None and value != "":
            data[name] = _env_value(name, value)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return FarmSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ValueError(f"invalid setting {where}: {err['msg']}") from None


#: Settings given as comma-separated lists in the environment.
LIST_FIELDS = ("trusted_proxies", "egress_allow")


def _env_value(name: str, value: str) -> Any:
    field = FarmSettings.model_fields[name]
    as_text = ("model", "host", "storage_url", "job_db", "dtype", "auth", "tokens_file", "attention",
               "ray_auth", "ray_token_file", "file_mode", "adapters_url")
    if field.annotation in (str,) or name in as_text \
            or name.startswith("s3_") and name != "s3_secure" or name == "spool_dir":
        return value
    if value.lstrip()[:1] in "[{":
        return json.loads(value)
    if name in LIST_FIELDS:  # comma-separated
        return [part.strip() for part in value.split(",") if part.strip()]
    return value  # pydantic converts numbers and booleans from strings


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read settings file {path}: {exc.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path} must hold a mapping")
    return data
