"""HTTP API v1, the Serve ingress (FastAPI; OpenAPI at `/docs`).

    POST /v1/jobs                 multipart (image file + fields) or JSON (base64 image) -> 202
    GET  /v1/jobs                 ?status=&limit=&cursor=
    GET  /v1/jobs/{id}            status, progress, params, timings, result, error
    POST /v1/jobs/{id}/cancel
    GET  /v1/jobs/{id}/video      the MP4
    GET  /v1/jobs/{id}/events     server-sent events: progress, live previews and status changes
    GET  /v1/jobs/{id}/preview    the latest live preview (JPEG strip) of a running job
    GET  /v1/cluster              classes, replicas, queue depth, capacity, nodes
    GET  /healthz, /readyz
    GET  /metrics                 Prometheus metrics of the farm (`monitoring/metrics.py`)
    POST /v1/estimate             peak VRAM, VRAM class and seconds of a request, before submitting
    GET  /v1/info                 the model (and what its output is), presets, field ranges, tips
    GET  /v1/me                   the calling token: {name, admin, max_priority}
    POST /v1/login, /v1/logout    the web page's session cookie (a random session id, never the token)
    GET  /, /ui/{file}            the web page (`serving/web`)
    GET  /docs, /openapi.json     the API (swagger-ui from the `fastapi-offline` package; `api_docs`)

Access control is `serving.access` (its middleware, the caller of a request, login/logout): every
response carries the security headers of `serving.auth.security_headers` (CSP, frame-ancestors
'none', nosniff, no referrer), and state-changing requests a browser sends from another origin are
refused (403 `cross_origin`).

The ingress validates everything it can (fields, image) before anything is queued, and answers
errors as `{"error": {"code", "message", "field"}}`: every error is a `pipeline.errors.I2VError`
(its `http_status`, `code`, `field`), the job manager's included. Job state lives in the job
manager; what the page asks before submitting (`/v1/info`, `/v1/estimate`) and the page's files
are `serving.info`'s.
"""



import asyncio
import base64
import json
import logging
import re
import time
import weakref
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitoring.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pipeline.errors import I2VError
from pipeline.images import load_image
from pipeline.preview import frame_count as preview_frame_count
from pipeline.request import parse_params

from .access import AccessMiddleware, Guard, caller_info, caller_of, check_priority
from .backends import SIM
from .bodies import image_format, json_body, read_body, read_submission
from .config import FarmSettings
from .egress import EgressPolicy
from .files import apply_umask
from .info import docs_file, docs_page, estimate_request, farm_info, web_file
from .jobs import FINISHED, JobStatus
from .protocol import ERROR_RESPONSES, ClusterStatus, ErrorResponse, Job, JobList, JobRequest, Me
from .reuse import pop_reuse
from .storage import StorageUnavailable, content_type, open_storage
from .webhooks import pop_webhook

logger = logging.getLogger(__name__)
TERMINAL = FINISHED  # serving.jobs: the one definition
_STATUS_PATTERN = f"^({'|'.join(s.value for s in JobStatus)})$"  # ^(queued|running|...)$
_JOB_ID = re.compile(r"[0-9a-f]{32}")
EVENT_POLL_S = 0.5

app = FastAPI(
    title="i2v-farm",
    version="1",
    description="Image-to-video render farm (I2VGen-XL) on GPUs of several sizes.",
    docs_url=None,  # served by FarmApi.docs from bundled assets (no CDN)
    redoc_url=None,
)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


@app.exception_handler(I2VError)
async def _i2v_error(request: Request, exc: I2VError) -> JSONResponse:
    return error_response(exc.http_status, exc.code, exc.message, exc.field, exc.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


app.add_middleware(AccessMiddleware)  # serving.access: who calls, and whether they may


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = str(err["loc"][-1]) if err.get("loc") else None
    return error_response(422, "invalid_request", f"{field}: {err['msg']}", field)


def _reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Manager replies carry either a result or an error (`I2VError.reply()`), raised here again."""
    if "error" in reply:
        raise I2VError.from_reply(reply)
    return reply


def _links(job: dict[str, Any]) -> dict[str, Any]:
    base = f"/v1/jobs/{job['id']}"
    job["links"] = {"self": base, "video": base + "/video", "events": base + "/events",
                    "cancel": base + "/cancel"}
    job["links"]["poster"] = base + "/poster"
    job["links"]["preview"] = base + "/preview"
    if job.get("result"):
        job["result"] = {**job["result"], "url": base + "/video", "poster_url": base + "/poster"}
    return job


def preview_frames(job: dict[str, Any]) -> int:
    """How many frames a live preview strip of this job holds."""
    return preview_frame_count(int(job["params"].get("num_frames") or 1))


def preview_event(job: dict[str, Any], preview: dict[str, Any]) -> dict[str, Any]:
    """The data of an SSE `preview` event: the step, the strip's frame count, the image as a data
    URL (a few kB to tens of kB) and the link to the latest one."""
    return {"step": preview["step"], "total": preview["total"], "seq": preview["seq"],
            "frames": preview_frames(job), "media_type": preview["media_type"],
            "image": f"data:{preview['media_type']};base64,{base64.b64encode(preview['image']).decode()}",
            "url": f"/v1/jobs/{job['id']}/preview"}


#: Seconds `GET /v1/cluster` keeps the worker reports and Ray's nodes it read (each page polls it).
CLUSTER_DETAILS_S = 2.0


def _read_cluster_details() -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    import ray

    from .worker import farm_worker_reports

    prefix = "vram_"
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "address": n["NodeManagerAddress"],
              "gpus": n["Resources"].get("GPU", 0),
              "vram_classes": sorted(k[len(prefix):] for k in n["Resources"] if k.startswith(prefix))}
             for n in ray.nodes()]
    return farm_worker_reports(), nodes


@serve.ingress(app)
class FarmApi:
    """The ingress deployment: validate, forward to the job manager, shape responses."""

    def __init__(self, manager: Any, settings: dict[str, Any]):
        self.manager = manager
        self.settings = FarmSettings.model_validate(settings)
        apply_umask(self.settings)  # this process's files: file_mode (0600), directories 0700
        self.storage = open_storage(self.settings)
        self.guard = Guard(self.settings)
        app.state.guard = self.guard
        self.egress = EgressPolicy.from_settings(self.settings)  # webhook URLs (issue 18)
        self._details: tuple[float, tuple, Any] = (0.0, (), None)  # `_cluster_details`, cached
        self._details_lock = asyncio.Lock()

    @app.post("/v1/jobs", status_code=202, response_model=Job, responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": JobRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"],
                                                     "properties": {"image": {"type": "string",
                                                                              "format": "binary"}}}}}}})
    async def create_job(self, request: Request):
        """Submit an image and a prompt. Answers 202 with the job id, its VRAM class and estimate.

        Send `Idempotency-Key` to make retries safe: the same key returns the same job.
        """
        caller = caller_of(request)
        self.guard.check_rate(caller)
        fields, image_bytes = await read_submission(request, self.settings.max_image_bytes)
        hook_fields = {k: fields.pop(k) for k in ("webhook", "webhook_events") if k in fields}  # not generation
        reuse = pop_reuse(fields)  # fields: serving.webhooks, serving.reuse
        params = parse_params(fields)  # field errors before the (slower) image check
        check_priority(caller, params.priority)
        image = load_image(image_bytes, max_bytes=self.settings.max_image_bytes)
        webhook = await asyncio.to_thread(pop_webhook, hook_fields, self.egress) if hook_fields else None
        reply = await self.manager.submit.remote(
            params.model_dump(exclude_none=True),
            image_bytes, image_format(image_bytes), image.width, image.height,
            request.headers.get("idempotency-key"), caller.name, caller.max_active,
            webhook=webhook, reuse=reuse, admin=caller.admin,
        )
        out = _reply(reply)
        return JSONResponse(_links(out["job"]), status_code=202 if out["created"] else 200)

    @app.get("/v1/jobs", response_model=JobList, responses=ERROR_RESPONSES)
    async def list_jobs(self, request: Request,
                        status: str | None = Query(None, pattern=_STATUS_PATTERN),
                        limit: int = Query(50, ge=1, le=500),
                        cursor: int | None = Query(None, ge=0, le=2**63 - 1)):  # a SQLite integer
        """Jobs, newest first, optionally of one status; page with `cursor`. A caller sees their own
        jobs (an admin token: every job)."""
        caller = caller_of(request)
        reply = await self.manager.list.remote(status, limit, cursor, None if caller.admin else caller.name)
        return {"jobs": [_links(j) for j in reply["jobs"]], "next_cursor": reply["next_cursor"]}

    @app.get("/v1/jobs/{job_id}", response_model=Job, responses=ERROR_RESPONSES)
    async def get_job(self, job_id: str, request: Request):
        return _links(await self._job(job_id, request))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses=ERROR_RESPONSES)
    async def cancel_job(self, job_id: str, request: Request):
        """Cancel a queued or running job (a running one stops between denoising steps)."""
        await self._job(job_id, request)  # exists and is the caller's
        out = _reply(await self.manager.cancel.remote(job_id))
        return _links(out["job"])

    @app.get("/v1/jobs/{job_id}/video", responses={**ERROR_RESPONSES, 200: {"content": {"video/mp4": {}}},
                                                  307: {"description": "Redirect to a presigned URL (S3)"}})
    async def get_video(self, job_id: str, request: Request):
        """The MP4 of a succeeded job: streamed (with Range support) from local storage, or a
        redirect to a presigned URL on S3/MinIO, valid for `presign_expiry_s`."""
        job = await self._job(job_id, request)
        if job["status"] != JobStatus.SUCCEEDED:
            raise I2VError(f"job {job_id} is {job['status']}; the video exists once it has succeeded",
                           code="not_ready", http_status=409)
        return await self._object(job["result"]["key"], f"video_{job_id[:8]}.mp4", f"the video of job {job_id}")

    @app.get("/v1/jobs/{job_id}/poster", responses={**ERROR_RESPONSES, 200: {"content": {"image/jpeg": {}}},
                                                   307: {"description": "Redirect to a presigned URL (S3)"}})
    async def get_poster(self, job_id: str, request: Request):
        """The first frame of a succeeded job's video, as a JPEG."""
        job = await self._job(job_id, request)
        if job["status"] != JobStatus.SUCCEEDED or not job["result"].get("poster_key"):
            raise I2VError(f"job {job_id} is {job['status']}; its poster exists once it has succeeded",
                           code="not_ready", http_status=409)
        return await self._object(job["result"]["poster_key"], None, f"the poster of job {job_id}")

    @app.get("/v1/jobs/{job_id}/preview", responses={
        **ERROR_RESPONSES, 200: {"content": {"image/jpeg": {}}, "description": "The latest live preview"},
        204: {"description": "Queued, or running without a preview yet: ask again in a second"}})
    async def get_preview(self, job_id: str, request: Request):
        """The latest live preview of a running job: a JPEG strip of `X-Preview-Frames` frames side
        by side (evenly spread over the clip), as the model predicts the video at denoising step
        `X-Preview-Step` of `X-Preview-Total`. 204 while the job is queued or before its first
        preview; 404 `no_preview` once the job has ended (previews are never stored: its video is
        the result), when the job turned previews off (`preview: false`), or the farm makes none."""
        job = await self._job(job_id, request)
        reason = self._no_preview_reason(job)
        if reason:
            raise I2VError(f"no preview of job {job_id}: {reason}", code="no_preview", http_status=404)
        found = await self.manager.preview.remote(job_id) if job["status"] == JobStatus.RUNNING else None
        if found is None:
            return Response(status_code=204, headers={"Cache-Control": "no-store", "Retry-After": "1"})
        return Response(found["image"], media_type=found["media_type"], headers={
            "Cache-Control": "no-store", "X-Preview-Step": str(found["step"]), "X-Preview-Total": str(found["total"]),
            "X-Preview-Seq": str(found["seq"]), "X-Preview-Frames": str(preview_frames(job))})

    def _no_preview_reason(self, job: dict[str, Any]) -> str | None:
        if job["status"] in TERMINAL:
            return (f"it is {job['status']}; previews exist only while a job runs and are not stored "
                    f"(the result is at /v1/jobs/{job['id']}/video)")
        if not job["params"].get("preview", True):
            return "the job turned previews off (`preview: false`)"
        if self.settings.preview_interval_s <= 0:
            return "this farm makes no previews (`preview_interval_s: 0`)"
        if self.settings.model == SIM:
            return "the sim model makes no previews (it has no latents)"
        return None

    async def _object(self, key: str, filename: str | None, what: str):
        if self.storage.kind == "file":
            path = self.storage.path(key)
            if not path.is_file():
                return error_response(404, "not_found", f"{what} is no longer in storage")
            return FileResponse(path, media_type=content_type(key), filename=filename,
                                content_disposition_type="inline")
        try:
            found = await asyncio.to_thread(self.storage.stat, key)
        except StorageUnavailable as exc:
            return error_response(503, "storage_unavailable", f"storage is unreachable: {exc}")
        if found is None:
            return error_response(404, "not_found", f"{what} is no longer in storage")
        url = self.storage.presigned_url(key, self.settings.presign_expiry_s)
        return RedirectResponse(url, status_code=307)

    @app.get("/v1/jobs/{job_id}/events", responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def job_events(self, job_id: str, request: Request):
        """Server-sent events: `progress` ({step, total}) and `status` (the whole job) on each
        change, `preview` ({step, total, seq, frames, media_type, image: a data URL, url}) for each
        live preview while it denoises, ending after the job reaches succeeded, failed or canceled."""
        job = await self._job(job_id, request)
        guard, cred = self.guard, getattr(request.state, "credential", None)
        key = guard.stream_key(request)
        if not guard.streams.acquire(key):
            return error_response(429, "too_many_streams",
                                  f"{guard.settings.max_streams_per_token} event streams are open for this caller "
                                  "already (`max_streams_per_token`): close one (or poll GET /v1/jobs/{id})",
                                  headers={"Retry-After": "5"})

        async def stream():
            last_status, last_progress, last_preview = None, None, None
            current = job
            try:
                while True:
                    if guard.recheck(cred) is None:  # token revoked, session logged out or expired
                        yield ('event: error\ndata: {"code": "unauthorized", '
                               '"message": "the token was revoked or the session ended"}\n\n')
                        return
                    if current["status"] != last_status:
                        last_status = current["status"]
                        yield f"event: status\ndata: {json.dumps(_links(current))}\n\n"
                    if current.get("progress") != last_progress:
                        last_progress = current.get("progress")
                        yield f"event: progress\ndata: {json.dumps(last_progress)}\n\n"
                    seq = (current.get("preview") or {}).get("seq")
                    if seq is not None and seq != last_preview and current["status"] == JobStatus.RUNNING:
                        last_preview = seq
                        found = await self.manager.preview.remote(job_id)
                        if found is not None:
                            yield f"event: preview\ndata: {json.dumps(preview_event(current, found))}\n\n"
                    if current["status"] in TERMINAL:
                        return
                    await asyncio.sleep(EVENT_POLL_S)
                    current = await self.manager.get.remote(job_id) or current
            finally:
                release()

        released = []

        def release() -> None:  # once: when the stream ends, or its generator is dropped unstarted
            if not released:
                released.append(True)
                guard.streams.release(key)

        events = stream()
        weakref.finalize(events, release)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/cluster", response_model=ClusterStatus)
    async def cluster(self):
        """VRAM classes with their replicas, busy workers and queues; the Ray nodes."""
        from .worker import attach_worker_reports  # per class: its replicas' threads, CUDA allocator

        info = await self.manager.cluster.remote()
        replicas = tuple((c.get("name"), json.dumps(c.get("replicas"), sort_keys=True))
                         for c in info.get("classes", []))
        reports, info["nodes"] = await self._cluster_details(replicas)
        return attach_worker_reports(info, reports)

    async def _cluster_details(self, replicas: tuple) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        """The worker replicas' reports and Ray's nodes for `/v1/cluster`: reads of Ray's GCS that
        grow with the fleet (every named actor, a report per replica, every node), so they are read
        at most every `CLUSTER_DETAILS_S` however many pages poll, and again at once when the
        classes' replica counts (`replicas`) change; the classes and queues are never cached."""
        async with self._details_lock:
            at, seen, details = self._details
            if details is None or seen != replicas or time.monotonic() - at >= CLUSTER_DETAILS_S:
                details = await asyncio.to_thread(_read_cluster_details)
                self._details = (time.monotonic(), replicas, details)
            return details

    @app.get("/v1/adapters", responses=ERROR_RESPONSES)
    async def adapters(self):
        """The registered LoRA adapters (`adapters_url`): name, rank, alpha, bytes, sha256,
        target_modules, note, created_at. A job names them in `lora` (docs/adapters.md)."""
        reply = await self.manager.adapters.remote()
        if "error" in reply:
            return _reply(reply)
        return reply

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(self):
        """Prometheus scrape target: the job manager keeps the farm's metrics (monitoring/metrics.py)."""
        return Response(await self.manager.metrics_text.remote(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        """200 once the job manager answers and at least one worker replica runs."""
        try:
            ready = await asyncio.wait_for(self.manager.ready.remote(), 5)
        except Exception as exc:  # noqa: BLE001
            return error_response(503, "not_ready", f"job manager not reachable: {type(exc).__name__}")
        if not ready["ready"]:
            return error_response(503, "not_ready", "no worker replica is running yet (models loading?)")
        return {"status": "ready", "replicas": ready["replicas"]}

    @app.post("/v1/estimate", responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
                  "type": "object", "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}},
                  "description": "The fields of POST /v1/jobs (no image; prompt optional) plus the image's size."}}}}})
    async def estimate(self, request: Request):
        """What a request would cost, before it is submitted: `{fits, reason, vram_class, gpu,
        vram_bytes, seconds, width, height, num_frames, fps, duration_s, params}`.

        The body is JSON: the request fields (presets apply) plus the image's `width` and `height`
        (default: square). Placement is the one `POST /v1/jobs` makes: the smallest of the farm's
        classes that holds the peak-VRAM estimate; `seconds` is the cost model's time on that
        class's GPU. A job no class can hold answers `fits: false` and the reason (no error).
        """
        data = json_body(await read_body(request, 2**20, "an estimate needs only the fields"), empty={})
        data.pop("image", None)  # only its size matters, and that is width/height
        reply = estimate_request(self.settings, data)
        check_priority(caller_of(request), reply["params"].get("priority"))
        return reply

    @app.get("/v1/info")
    async def info(self):
        """The model (with a note when its output is noise or a placeholder, and how to point the
        farm at real weights), presets, field ranges, image limits, prompt tips and examples, and
        the farm's VRAM classes: what a client shows before asking."""
        return farm_info(self.settings)

    @app.get("/", include_in_schema=False)
    async def page(self):
        """The web page."""
        return web_file("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def page_asset(self, name: str):
        return web_file(name)

    async def _job(self, job_id: str, request: Request) -> dict[str, Any]:
        job = await self.manager.get.remote(job_id) if _JOB_ID.fullmatch(job_id) else None
        caller = caller_of(request)
        if job is None or not (caller.admin or job.get("owner") == caller.name):
            raise I2VError(f"no job {job_id[:64]}", code="not_found", http_status=404)
        return job

    @app.get("/v1/me", response_model=Me, responses=ERROR_RESPONSES)
    async def me(self, request: Request):
        """The calling token: its name, whether it is an admin, and the highest priority it may use
        (access control off: the anonymous admin)."""
        return caller_info(caller_of(request))

    @app.post("/v1/login", include_in_schema=True, responses={**ERROR_RESPONSES, 401: {
        "model": ErrorResponse, "description": "Unknown or revoked token"}},
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": {"type": "object", "required": ["token"],
                                                  "properties": {"token": {"type": "string"}}}},
                  "application/x-www-form-urlencoded": {"schema": {"type": "object", "required": ["token"],
                                                                   "properties": {"token": {"type": "string"}}}}}}})
    async def login(self, request: Request):
        """Exchange an API token for an HttpOnly session cookie (what the web page does): the cookie
        holds a random session id, valid `session_ttl_s`, until logout or until the token is revoked.

        The body (JSON `{"token"}` or a urlencoded form, at most 4 KiB) comes only from the farm's
        own origin when a browser sends it."""
        return await self.guard.login(request)

    @app.post("/v1/logout", include_in_schema=True)
    async def logout(self, request: Request):
        """End the page's session (the cookie stops working at once, everywhere it was copied)."""
        return self.guard.logout(request)

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        """The API's OpenAPI page: swagger-ui from the `fastapi-offline` package, nothing from a CDN."""
        if not self.settings.api_docs:
            raise I2VError("the API page is off on this farm (`api_docs: false`); the API is at /openapi.json",
                           code="not_found", http_status=404)
        return docs_page()

    @app.get("/docs/{name}", include_in_schema=False)
    async def docs_asset(self, name: str):
        if not self.settings.api_docs:
            raise I2VError(f"no docs asset {name!r}", code="not_found", http_status=404)
        return docs_file(name)
