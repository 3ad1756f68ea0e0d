"""The job lifecycle as types: what crosses a boundary between the farm's parts.

- `JobStatus`: a job's status, as the job store keeps it and the HTTP API returns it; `FINISHED`
  (and `JobStatus.finished`) is the one definition of a job that will not change any more.
  `JobDetail.UPLOADING`: a `running` job whose video is rendered and waits in its worker's spool.
- `FailureKind`: how an attempt on a worker failed (what the scheduler decides on), and
  `ErrorCode`: the codes a job's `failures` and `error` carry for them.
- `RenderRequest`: what the job manager sends a worker (`Worker.run`).
- The events a worker streams back (`StartedEvent`, `ProgressEvent`, `PreviewEvent`, `DoneEvent`,
  `ErrorEvent`, `CanceledEvent`): the worker builds them, the manager reads them with `parse_worker_event`,
  which refuses a malformed event with a `WorkerEventError` naming what is wrong.

Every enum is a `str` subclass, so JSON, SQLite and the HTTP API see the same strings as before;
the wire format of requests and events is a plain dict (`to_dict()`), as Ray carries it.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class _StrEnum(str, Enum):
    """A `str` whose `str()` and f-string are its value (not `Class.MEMBER`)."""

    def __str__(self) -> str:
        return str.__str__(self)

    __format__ = str.__format__  # type: ignore[assignment]


class JobStatus(_StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        """Succeeded, failed or canceled: the job will not change any more."""
        return self in FINISHED

    @property
    def active(self) -> bool:
        """Queued or running: it may still be canceled."""
        return self in ACTIVE


#: Every status, in lifecycle order (the job store's allowed values).
STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
#: The statuses a job ends in (the one definition: store, API, client, metrics and web page).
FINISHED: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
#: The statuses of a job still in the farm (counted against a token's limit, recovered at start).
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


def is_finished(status: str | None) -> bool:
    """Whether a status string (as stored or returned) is a finished one."""
    return status in FINISHED


class JobDetail(_StrEnum):
    """The record's `detail`: more about a status (None when there is nothing more)."""

    UPLOADING = "uploading"
    """`running`, rendered: the results wait in the worker's spool until storage takes them."""


class ErrorCode(_StrEnum):
    """Codes of a job's `error` and `failures` entries that the lifecycle itself sets."""

    OUT_OF_MEMORY = "out_of_memory"
    WORKER_DIED = "worker_died"
    GENERATION_FAILED = "generation_failed"
    ERROR = "error"
    CANCELED = "canceled"
    NO_CLASS_FITS = "no_class_fits"


class FailureKind(_StrEnum):
    """How an attempt failed: `oom` (retry on a larger class), `worker_died` (retry on the same
    class), `error` (the job itself is bad: fail at once)."""

    OOM = "oom"
    WORKER_DIED = "worker_died"
    ERROR = "error"

    @property
    def code(self) -> ErrorCode:
        """The code of this attempt's entry in the job's `failures`."""
        return _FAILURE_CODES[self]

    @property
    def fail_code(self) -> ErrorCode:
        """The code of the job's `error` when the scheduler gives up after this kind."""
        return _FAIL_CODES[self]

    @classmethod
    def of_error(cls, code: str | None) -> FailureKind:
        """The kind of a worker's `error` event with this code."""
        return cls.OOM if code == ErrorCode.OUT_OF_MEMORY else cls.ERROR


_FAILURE_CODES = {FailureKind.OOM: ErrorCode.OUT_OF_MEMORY, FailureKind.WORKER_DIED: ErrorCode.WORKER_DIED,
                  FailureKind.ERROR: ErrorCode.ERROR}
_FAIL_CODES = {FailureKind.OOM: ErrorCode.OUT_OF_MEMORY, FailureKind.WORKER_DIED: ErrorCode.WORKER_DIED,
               FailureKind.ERROR: ErrorCode.GENERATION_FAILED}


def _problems(exc: ValidationError, tag: str | None = None) -> str:
    """The errors of a validation, one `field: message` each (never the values: they may be big).
    `tag`: the union member's name, which pydantic puts first in each location."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = err["loc"][1:] if tag is not None and err["loc"][:1] == (tag,) else err["loc"]
        loc = ".".join(str(p) for p in loc) or "(event)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# --- the render request ---------------------------------------------------------------------


class RenderRequestError(ValueError):
    """A render request a worker cannot run (says which fields are wrong)."""


class RenderRequest(BaseModel):
    """What the job manager sends a worker's `run()`: the job, its input image and where its
    results go (`prefix` + file names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    params: dict[str, Any] = Field(description="The validated generation parameters (`GenerationParams`).")
    image: bytes = Field(description="The input image, as submitted.")
    attempt: int = Field(1, ge=1, description="1 for the first run of the job, 2 for its first retry, ...")
    prefix: str = Field(description="Storage key prefix of the job's files.")
    input_name: str = Field(description="File name of the input image under `prefix` (`input.png`, ...).")

    @classmethod
    def parse(cls, data: Any) -> RenderRequest:
        if isinstance(data, RenderRequest):
            return data
        if not isinstance(data, dict):
            raise RenderRequestError(f"a render request must be a dict, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RenderRequestError(f"malformed render request for job {data.get('id')!r}: "
                                     f"{_problems(exc)}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @property
    def input_key(self) -> str:
        return self.prefix + self.input_name


# --- the events a worker streams back ---------------------------------------------------------


class WorkerEventError(ValueError):
    """A worker sent an event the manager cannot read (says which event and what is wrong)."""


class _Event(BaseModel):
    # extra: fields this side does not read travel on (`stats`, which `WorkerStats` adds, ...)
    model_config = ConfigDict(extra="allow")

    event: str

    def to_dict(self) -> dict[str, Any]:
        """The event as it travels: the fields that were set, `event` always."""
        return {"event": self.event, **self.model_dump(exclude_unset=True, exclude={"event"})}


class StartedEvent(_Event):
    event: Literal["started"] = "started"
    node: str = Field(description="Ray node id of the worker.")
    replica: str | None = None
    vram_class: str | None = None
    pid: int | None = None
    threads: int | None = None


class ProgressEvent(_Event):
    """After every denoising step."""

    event: Literal["progress"] = "progress"
    step: int = Field(ge=0)
    total: int = Field(ge=0)


class PreviewEvent(_Event):
    """A live preview (`pipeline.preview`): a JPEG strip of the clip as the model sees it at `step`.
    The manager keeps only the latest one per running job, in memory (never stored)."""

    event: Literal["preview"] = "preview"
    step: int = Field(ge=0)
    total: int = Field(ge=0)
    image: bytes = Field(max_length=4 * 2**20, description="The preview image (`media_type`).")
    media_type: str = "image/jpeg"
    seconds: float = Field(0.0, ge=0, description="What making it took on the worker.")


class DoneEvent(_Event):
    """Rendered. `uploaded: False`: storage was unreachable, the files wait in the worker's spool
    (the job is `running`, detail `uploading`, until the manager hears `upload_finished`)."""

    event: Literal["done"] = "done"
    result: dict[str, Any]
    timings: dict[str, float] = Field(description="Seconds per stage (render, encode, total, ...).")
    peak_vram_bytes: int | None
    device: str | None = None
    model: str | None = None
    uploaded: bool = True
    upload_error: str | None = None
    adapters: dict[str, Any] | None = Field(
        None, description="LoRA adapter loads of the job: {hits, misses, load_seconds} (None: no adapters).")


class ErrorEvent(_Event):
    """The attempt failed (`code`: `out_of_memory`, `generation_failed`, an `I2VError` code)."""

    event: Literal["error"] = "error"
    code: str | None = None
    message: str = ""

    @property
    def kind(self) -> FailureKind:
        return FailureKind.of_error(self.code)


class CanceledEvent(_Event):
    """Stopped between steps after the manager canceled the stream."""

    event: Literal["canceled"] = "canceled"


WorkerEvent = Annotated[Union[StartedEvent, ProgressEvent, PreviewEvent, DoneEvent, ErrorEvent, CanceledEvent],
                        Field(discriminator="event")]
EVENT_NAMES: tuple[str, ...] = ("started", "progress", "done", "error", "canceled", "preview")
_EVENTS: TypeAdapter[Any] = TypeAdapter(WorkerEvent)


def parse_worker_event(
        data: Any) -> StartedEvent | ProgressEvent | PreviewEvent | DoneEvent | ErrorEvent | CanceledEvent:
    """One event as a worker streamed it (a dict), typed; `WorkerEventError` if it is malformed."""
    if isinstance(data, _Event):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise WorkerEventError(f"a worker event must be a dict, got {type(data).__name__}")
    name = data.get("event")
    if name not in EVENT_NAMES:
        raise WorkerEventError(f"unknown worker event {name!r} (expected one of {', '.join(EVENT_NAMES)})")
    try:
        return _EVENTS.validate_python(data)
    except ValidationError as exc:
        raise WorkerEventError(f"malformed worker event {name!r}: {_problems(exc, name)}") from None


# --- the job record ---------------------------------------------------------------------------


class JobRecordError(ValueError):
    """A job-store row that is not a job record (says which fields are wrong)."""


class JobRecord(BaseModel):
    """A job as the job store keeps it (`serving.job_store`; the manager writes it, `GET
    /v1/jobs/{id}` shows most of it). Reads every row the store holds, older ones included (the
    fields added later are optional); fields it does not name are kept (`extra`)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: JobStatus
    detail: JobDetail | None = None
    owner: str = "anonymous"
    vram_class: str
    home_class: str | None = None
    node: str | None = None
    progress: dict[str, int | None] | None = None
    params: dict[str, Any]
    estimate: dict[str, Any]
    prefix: str | None = None
    input: dict[str, Any] | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    peak_vram_bytes: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    failures: list[dict[str, Any]] = Field(default_factory=list)
    attempts: int = 0
    created_at: str
    seq: int | None = None
    # webhooks and result reuse (issue 18; serving/webhooks.py, serving/reuse.py)
    webhook: dict[str, Any] | None = Field(None, description="{url, events}: where the job's end is POSTed.")
    deliveries: list[dict[str, Any]] | None = Field(None, description="Its webhook deliveries (id, event, state, "
                                                    "attempts, last_status, last_error, delivered_at).")
    reuse_key: str | None = Field(None, description="SHA-256 of what makes its video (explicit seed only).")
    reused_from: str | None = Field(None, description="The job whose stored result this one answered with.")
    gpu_seconds_saved: float | None = Field(None, description="A reused job: the GPU time its answer saved.")
    # set by the job manager as the job moves on (serving/manager/)
    started_at: str | None = None
    finished_at: str | None = None
    spilled: bool | None = Field(None, description="Runs on a larger class than its home one.")
    replica: str | None = None
    device: str | None = None
    note: str | None = None
    upload_error: str | None = Field(None, description="Why its rendered files still wait in the worker's spool.")
    output_size: dict[str, int] | None = None

    @property
    def finished(self) -> bool:
        return self.status.finished

    @classmethod
    def parse(cls, row: Any) -> JobRecord:
        if not isinstance(row, dict):
            raise JobRecordError(f"a job record must be a dict, got {type(row).__name__}")
        try:
            return cls.model_validate(row)
        except ValidationError as exc:
            raise JobRecordError(f"malformed job record {row.get('id')!r}: {_problems(exc)}") from None

    def to_dict(self) -> dict[str, Any]:
        """The record as stored (JSON types; the fields it was read or made with)."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def check_changes(cls, job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """`fields` to write into job `job_id`'s record, checked before anything is written: each
        must be a field this type names (a misspelt key is refused, not stored beside the record)
        with a value of that field's type. Returns `fields` as given; `JobRecordError` if not."""
        problems = []
        for name, value in fields.items():
            if name not in cls.model_fields:
                problems.append(f"{name}: not a field of a job record")
                continue
            try:
                _field_type(name).validate_python(value)
            except ValidationError as exc:
                problems += [f"{'.'.join(str(p) for p in (name, *e['loc']))}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False)]
        if problems:
            raise JobRecordError(f"bad change to job record {job_id!r}: {'; '.join(problems)}")
        return fields

    @classmethod
    def new(cls, fields: dict[str, Any]) -> JobRecord:
        """A record about to be created: a valid job record, every key a field this type names."""
        cls.check_changes(fields.get("id", "?"), {k: v for k, v in fields.items() if k not in cls.model_fields})
        return cls.parse(fields)


@functools.lru_cache(maxsize=None)
def _field_type(name: str) -> TypeAdapter[Any]:
    """The type of `JobRecord` field `name`, to check a value written to it."""
    return TypeAdapter(JobRecord.model_fields[name].annotation)
