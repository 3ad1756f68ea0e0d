"""HTTP API v1, the Serve ingress (FastAPI; OpenAPI at `/docs`).

    POST /v1/jobs                 multipart (image file + fields) or JSON (base64 image) -> 202
    GET  /v1/jobs                 ?status=&limit=&cursor=
    GET  /v1/jobs/{id}            status, progress, params, timings, result, error
    POST /v1/jobs/{id}/cancel
    GET  /v1/jobs/{id}/video      the MP4
    GET  /v1/jobs/{id}/events     server-sent events: progress and status changes
    GET  /v1/cluster              classes, replicas, queue depth, capacity, nodes
    GET  /healthz, /readyz

The ingress validates everything it can (fields, image) before anything is queued, and answers
errors as `{"error": {"code", "message", "field"}}`. Job state lives in the job manager.
"""



import asyncio
import base64
import binascii
import json
from typing import Any

from fastapi import FastAPI, Query, Request
from ray import serve
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import I2VError, InvalidRequest
from pipeline.images import load_image
from pipeline.request import parse_params

from .config import FarmSettings
from .protocol import ERROR_RESPONSES, ClusterStatus, Job, JobList, JobRequest
from .storage import open_storage

TERMINAL = ("succeeded", "failed", "canceled")
EVENT_POLL_S = 0.5

app = FastAPI(
    title="i2v-farm",
    version="1",
    description="Image-to-video render farm (I2VGen-XL) on GPUs of several sizes.",
)


class ApiError(I2VError):
    def __init__(self, message: str, *, code: str, status: int = 400, field: str | None = None):
        super().__init__(message, field=field, code=code)
        self.http_status = status


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


@app.exception_handler(I2VError)
async def _i2v_error(request: Request, exc: I2VError) -> JSONResponse:
    return error_response(getattr(exc, "http_status", 400), exc.code, exc.message, exc.field)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = str(err["loc"][-1]) if err.get("loc") else None
    return error_response(422, "invalid_request", f"{field}: {err['msg']}", field)


def _reply(reply: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """Manager replies carry either a result or {"error", "status", ...}."""
    if "error" not in reply:
        return reply
    headers = {"Retry-After": str(reply["retry_after"])} if "retry_after" in reply else None
    err = reply["error"]
    return error_response(reply["status"], err["code"], err["message"], err.get("field"), headers)


def _links(job: dict[str, Any]) -> dict[str, Any]:
    base = f"/v1/jobs/{job['id']}"
    job["links"] = {"self": base, "video": base + "/video", "events": base + "/events",
                    "cancel": base + "/cancel"}
    if job.get("result"):
        job["result"] = {**job["result"], "url": base + "/video"}
    return job


async def _read_submission(request: Request, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """(fields, image bytes) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    # base64 grows the image by 4/3; the other fields are small
    if length and length.isdigit() and int(length) > max_bytes * 4 // 3 + 2**20:
        raise ApiError(f"the request is {int(length) / 2**20:.1f} MiB; images may be at most "
                       f"{max_bytes / 2**20:.0f} MiB", code="image_too_large", status=413, field="image")
    if ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_part_size=max_bytes + 1)
        except Exception as exc:  # noqa: BLE001 - a malformed body is the client's error
            raise ApiError(f"could not read the form: {exc}", code="bad_form") from None
        fields: dict[str, Any] = {}
        image = None
        for key, value in form.multi_items():
            if key == "image":
                if isinstance(value, str):
                    raise InvalidRequest("image must be a file upload", field="image")
                image = await value.read()
            else:
                fields[key] = value
        if image is None:
            raise InvalidRequest("image is required (a JPEG, PNG or WEBP file)", field="image")
        return fields, image
    if ctype.startswith("application/json") or not ctype:
        body = await request.body()
        try:
            data = json.loads(body or b"null")
        except ValueError as exc:
            raise ApiError(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError("the JSON body must be an object", code="invalid_json")
        encoded = data.pop("image", None)
        if not isinstance(encoded, str) or not encoded:
            raise InvalidRequest("image is required: base64 of a JPEG, PNG or WEBP file", field="image")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            image = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("image is not valid base64", code="invalid_base64", field="image") from None
        return data, image
    raise ApiError(f"unsupported content type {ctype!r}: send multipart/form-data or application/json",
                   code="unsupported_media_type", status=415)


def _image_format(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    return "webp"


@serve.ingress(app)
class FarmApi:
    """The ingress deployment: validate, forward to the job manager, shape responses."""

    def __init__(self, manager: Any, settings: dict[str, Any]):
        self.manager = manager
        self.settings = FarmSettings.model_validate(settings)
        self.storage = open_storage(self.settings.storage_url)

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
        fields, image_bytes = await _read_submission(request, self.settings.max_image_bytes)
        params = parse_params(fields)  # field errors before the (slower) image check
        image = load_image(image_bytes, max_bytes=self.settings.max_image_bytes)
        reply = await self.manager.submit.remote(
            params.model_dump(exclude_none=True),
            image_bytes, _image_format(image_bytes), image.width, image.height,
            request.headers.get("idempotency-key"),
        )
        out = _reply(reply)
        if isinstance(out, Response):
            return out
        return JSONResponse(_links(out["job"]), status_code=202 if out["created"] else 200)

    @app.get("/v1/jobs", response_model=JobList, responses=ERROR_RESPONSES)
    async def list_jobs(self, status: str | None = Query(None, pattern="^(queued|running|succeeded|failed|canceled)$"),
                        limit: int = Query(50, ge=1, le=500), cursor: int | None = Query(None, ge=0)):
        """Jobs, newest first, optionally of one status; page with `cursor`."""
        reply = await self.manager.list.remote(status, limit, cursor)
        return {"jobs": [_links(j) for j in reply["jobs"]], "next_cursor": reply["next_cursor"]}

    @app.get("/v1/jobs/{job_id}", response_model=Job, responses=ERROR_RESPONSES)
    async def get_job(self, job_id: str):
        return _links(await self._job(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses=ERROR_RESPONSES)
    async def cancel_job(self, job_id: str):
        """Cancel a queued or running job (a running one stops between denoising steps)."""
        out = _reply(await self.manager.cancel.remote(job_id))
        return out if isinstance(out, Response) else _links(out["job"])

    @app.get("/v1/jobs/{job_id}/video", responses={**ERROR_RESPONSES, 200: {"content": {"video/mp4": {}}}})
    async def get_video(self, job_id: str):
        """The MP4 of a succeeded job."""
        job = await self._job(job_id)
        if job["status"] != "succeeded":
            raise ApiError(f"job {job_id} is {job['status']}; the video exists once it has succeeded",
                           code="not_ready", status=409)
        path = self.storage.path(job["result"]["key"])
        if not path.is_file():
            return error_response(404, "not_found", f"the video of job {job_id} is no longer in storage")
        return FileResponse(path, media_type="video/mp4", filename=f"video_{job_id[:8]}.mp4")

    @app.get("/v1/jobs/{job_id}/events", responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def job_events(self, job_id: str):
        """Server-sent events: `progress` ({step, total}) and `status` (the whole job) on each
        change, ending after the job reaches succeeded, failed or canceled."""
        job = await self._job(job_id)

        async def stream():
            last_status, last_progress = None, None
            current = job
            while True:
                if current["status"] != last_status:
                    last_status = current["status"]
                    yield f"event: status\ndata: {json.dumps(_links(current))}\n\n"
                if current.get("progress") != last_progress:
                    last_progress = current.get("progress")
                    yield f"event: progress\ndata: {json.dumps(last_progress)}\n\n"
                if current["status"] in TERMINAL:
                    return
                await asyncio.sleep(EVENT_POLL_S)
                current = await self.manager.get.remote(job_id) or current

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/cluster", response_model=ClusterStatus)
    async def cluster(self):
        """VRAM classes with their replicas, busy workers and queues; the Ray nodes."""
        import ray

        info = await self.manager.cluster.remote()
        prefix = "vram_"
        info["nodes"] = [
            {"id": n["NodeID"], "alive": n["Alive"], "address": n["NodeManagerAddress"],
             "gpus": n["Resources"].get("GPU", 0),
             "vram_classes": sorted(k[len(prefix):] for k in n["Resources"] if k.startswith(prefix))}
            for n in await asyncio.to_thread(ray.nodes)
        ]
        return info

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

    async def _job(self, job_id: str) -> dict[str, Any]:
        job = await self.manager.get.remote(job_id)
        if job is None:
            raise ApiError(f"no job {job_id}", code="not_found", status=404)
        return job
