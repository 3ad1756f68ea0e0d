"""HTTP API v1: the request and response models (what `/docs` shows).

Request fields are the ones of `pipeline.request.GenerationParams` plus `image`; a job carries
the fields the design names: `id`, `status`, `vram_class`, `node`, `progress`, `params`,
`estimate`, `timings`, `peak_vram_bytes`, `result`, `error`, `created_at`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.request import GenerationParams

#: `serving.jobs.JobStatus`'s values, spelled out for the OpenAPI schema (a test keeps them equal).
Status = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobRequest(GenerationParams):
    """`POST /v1/jobs` as JSON: the generation fields plus the image, base64 (a data URL is fine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(description="The input image (JPEG, PNG or WEBP), base64 or a data: URL.")
    webhook: str | None = Field(None, description="https URL the farm POSTs the job's JSON to when it ends "
                                "(signed: docs/webhooks.md); http only to hosts in egress_allow.")
    webhook_events: list[Literal["succeeded", "failed", "canceled", "all"]] | None = Field(
        None, description="Which endings call the webhook (default: all).")
    reuse: bool = Field(True, description="Answer with the stored result of an identical earlier job (same image, "
                        "parameters, explicit seed, model) when there is one; false: always render.")


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    total: int | None = Field(None, description="Steps in all.")


class Estimate(BaseModel):
    vram_bytes: int = Field(description="Cost-model peak VRAM of this job.")
    seconds: float = Field(description="Cost-model run time on the job's class GPU.")


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")

    key: str = Field(description="Storage key of the MP4.")
    url: str | None = Field(None, description="Where to fetch the MP4.")
    bytes: int
    frames: int
    width: int
    height: int
    fps: int


class ErrorInfo(BaseModel):
    code: str
    message: str
    field: str | None = None


class Links(BaseModel):
    self: str
    video: str
    events: str
    cancel: str
    poster: str


class Job(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    status: Status
    vram_class: str = Field(description="The class it is queued for, or runs/ran on (after a spill: the larger one).")
    node: str | None = Field(None, description="Ray node id of the worker that ran it.")
    progress: Progress | None = None
    params: dict[str, Any]
    estimate: Estimate
    timings: dict[str, float] = Field(default_factory=dict)
    peak_vram_bytes: int | None = None
    result: Result | None = None
    error: ErrorInfo | None = None
    created_at: str
    queue_position: int | None = Field(None, description="1 = next in its class queue (queued jobs only).")
    reused_from: str | None = Field(None, description="The earlier identical job whose stored result this job "
                                    "answered with (no GPU ran).")
    deliveries: list[dict[str, Any]] | None = Field(None, description="Webhook deliveries: id, event, state "
                                                    "(pending, delivered, failed), attempts, last_status, "
                                                    "last_error, delivered_at.")
    links: Links


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: int | None = Field(None, description="Pass as `cursor` for the next (older) page.")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Me(BaseModel):
    """`GET /v1/me`: the calling token."""

    name: str = Field(description="The token's name (with access control off: `anonymous`).")
    admin: bool = Field(description="Sees and cancels every job.")
    max_priority: Literal["low", "normal", "high"] = Field(description="Highest queue priority it may ask for.")


class ClassStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    memory_gib: float
    gpu: str
    resource: str
    replicas: dict[str, int]
    busy: int
    queued: int
    spill_to: list[str]


class ClusterStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    classes: list[ClassStatus]
    queue_depth: int
    running: int
    jobs: dict[str, int]
    nodes: list[dict[str, Any]] = Field(default_factory=list)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Bad request (malformed JSON, bad base64, corrupt or empty image)",
        401: "A valid API token is required (access control on)",
        403: "Not allowed: a priority above the token's `max_priority`, a cross-origin browser request, "
             "or a proxied request to a farm with access control off",
        404: "No such job",
        409: "Not possible in the job's status",
        413: "Image too large",
        415: "Unsupported image type",
        422: "A field is invalid, or no VRAM class can hold the job",
        429: "The class's backlog is full (see Retry-After)",
        503: "The farm is not ready",
    }.items()
}
