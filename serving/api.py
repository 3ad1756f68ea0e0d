"""HTTP API v1, the Serve ingress (FastAPI; OpenAPI at `/docs`).

    POST /v1/jobs                 multipart (image file + fields) or JSON (base64 image) -> 202
    GET  /v1/jobs                 ?status=&limit=&cursor=
    GET  /v1/jobs/{id}            status, progress, params, timings, result, error
    POST /v1/jobs/{id}/cancel
    GET  /v1/jobs/{id}/video      the MP4
    GET  /v1/jobs/{id}/events     server-sent events: progress and status changes
    GET  /v1/cluster              classes, replicas, queue depth, capacity, nodes
    GET  /healthz, /readyz
    GET  /metrics                 Prometheus metrics of the farm (`monitoring/metrics.py`)
    POST /v1/estimate             peak VRAM, VRAM class and seconds of a request, before submitting
    GET  /v1/info                 the model (and what its output is), presets, field ranges, tips
    GET  /v1/me                   the calling token: {name, admin, max_priority}
    POST /v1/login, /v1/logout    the web page's session cookie (a random session id, never the token)
    GET  /, /ui/{file}            the web page (`serving/web`)
    GET  /docs, /openapi.json     the API (swagger-ui from the `fastapi-offline` package; `api_docs`)

Every response carries the security headers of `serving.auth.security_headers` (CSP,
frame-ancestors 'none', nosniff, no referrer). State-changing requests a browser sends from another
origin are refused (403 `cross_origin`).

The ingress validates everything it can (fields, image) before anything is queued, and answers
errors as `{"error": {"code", "message", "field"}}`. Job state lives in the job manager.
"""



import asyncio
import base64
import binascii
import json
import logging
import math
import re
import weakref
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitoring.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pipeline.errors import I2VError, InvalidRequest
from pipeline.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, load_image
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

from .auth import (
    ANONYMOUS,
    COOKIE,
    PROXY_HEADERS,
    Caller,
    RateLimiter,
    SessionStore,
    StreamLimiter,
    TokenStore,
    auth_enabled,
    client_address,
    hash_token,
    origin_allowed,
    parse_networks,
    request_host,
    request_scheme,
    security_headers,
    tokens_path,
)
from .backends import SIM
from .config import FarmSettings
from .files import apply_umask
from .jobs import ACTIVE, FINISHED, JobStatus
from .protocol import ERROR_RESPONSES, ClusterStatus, ErrorResponse, Job, JobList, JobRequest, Me
from .scheduler import NoClassFits, Scheduler
from .scheduler import estimate_request as estimate_cost
from .storage import StorageUnavailable, content_type, open_storage

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


#: Reachable without a token: the page's shell, health, docs, metrics, the login itself.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/docs", "/openapi.json",
                          "/metrics", "/v1/info", "/v1/login", "/v1/logout"})
PUBLIC_PREFIXES = ("/ui/", "/docs/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A body larger than this at `POST /v1/login` is refused while it is read (chunked too).
LOGIN_MAX_BYTES = 4096
LOGIN_TYPES = ("application/json", "application/x-www-form-urlencoded")


def media_origins(settings: FarmSettings) -> list[str]:
    """Where the page's <video>/<img> may load from besides the farm: the S3 endpoint clients reach
    (presigned URLs), when results live on S3."""
    if not settings.storage_url.startswith("s3://"):
        return []
    public = settings.s3_public_endpoint or settings.s3_endpoint
    if not public:
        return []
    if "://" not in public:
        public = ("https://" if settings.s3_secure else "http://") + public
    return [public.rstrip("/")]


class Credential:
    """How a request proved who it is: a bearer token (its hash) or a session (cookie value)."""

    __slots__ = ("kind", "token_hash", "session")

    def __init__(self, kind: str, token_hash: str, session: str | None = None):
        self.kind, self.token_hash, self.session = kind, token_hash, session


class Guard:
    """Access control of one ingress replica (see `serving.auth`)."""

    def __init__(self, settings: FarmSettings):
        self.settings = settings
        self.mode = settings.auth
        self.enabled = auth_enabled(settings.auth, settings.host)
        self.tokens = TokenStore(tokens_path(settings))
        self.sessions = SessionStore(settings.session_ttl_s)
        self.limiter = RateLimiter()
        self.streams = StreamLimiter(settings.max_streams_per_token)
        self.trusted = parse_networks(settings.trusted_proxies)
        self.headers = security_headers(media_origins=media_origins(settings))
        self.docs_headers = security_headers(media_origins=media_origins(settings), docs=True)

    def authenticate(self, request: Request) -> tuple[Caller | None, Credential | None]:
        """The caller of a request: `Authorization: Bearer TOKEN`, else the session cookie."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
            caller = self.tokens.verify(token)
            return (caller, Credential("bearer", hash_token(token))) if caller else (None, None)
        sid = request.cookies.get(COOKIE)
        token_hash = self.sessions.token_hash(sid)
        if token_hash is None:
            return None, None
        cred = Credential("session", token_hash, sid)
        return self.recheck(cred), cred

    def recheck(self, cred: Credential | None) -> Caller | None:
        """The caller while its credential still holds (token not revoked, session not ended);
        with access control off, always the anonymous admin."""
        if not self.enabled:
            return ANONYMOUS
        if cred is None:
            return None
        if cred.kind == "session" and self.sessions.token_hash(cred.session) != cred.token_hash:
            return None
        caller = self.tokens.by_hash(cred.token_hash)
        if caller is None and cred.kind == "session":
            self.sessions.revoke_token(cred.token_hash)  # the token was revoked: all its sessions end
        return caller

    def stream_key(self, request: Request) -> str:
        """Whose streams are counted together: the token's name, or (access control off) the address."""
        if self.enabled:
            return "token:" + caller_of(request).name
        return "addr:" + str(getattr(request.state, "client_ip", None))


def _refuse(request: Request, status: int, code: str, message: str, **headers: str) -> JSONResponse:
    log = logger.info if status == 401 else logger.warning
    log("refused %s %s from %s: %s %s", request.method, request.url.path[:200],
        getattr(request.state, "client_ip", None), status, code)
    return error_response(status, code, message, headers=headers or None)


@app.middleware("http")
async def _access(request: Request, call_next):
    guard: Guard | None = getattr(request.app.state, "guard", None)
    if guard is None:
        request.state.caller = ANONYMOUS
        return await call_next(request)
    response = await _guarded(guard, request, call_next)
    path = request.url.path
    headers = guard.docs_headers if path == "/docs" or path.startswith("/docs/") else guard.headers
    for name, value in headers.items():
        response.headers.setdefault(name, value)
    return response


async def _guarded(guard: Guard, request: Request, call_next):
    headers = request.headers
    client_host = request.client.host if request.client else None
    request.state.client_ip = client_address(client_host, headers, guard.trusted)
    request.state.scheme = request_scheme(request.url.scheme, client_host, headers, guard.trusted)
    request.state.credential = None
    path = request.url.path
    if (guard.mode == "auto" and not guard.enabled and path not in ("/healthz", "/readyz")
            and any(h in headers for h in PROXY_HEADERS)):
        return _refuse(request, 403, "proxy_without_auth",
                       "this farm is reached through a proxy (the request carries X-Forwarded-For, Forwarded "
                       "or X-Real-IP) but listens on loopback with access control off, which would make every "
                       "caller an admin: turn tokens on (`I2V_AUTH=on`, then `i2v-farm token create NAME`), "
                       "or set `auth: off` to run it open on purpose")
    if request.method not in SAFE_METHODS and not origin_allowed(
            headers.get("origin"), headers.get("sec-fetch-site"), request.state.scheme,
            request_host(client_host, headers, guard.trusted)):
        return _refuse(request, 403, "cross_origin",
                       "a browser sent this request from another site or origin: the farm takes state-changing "
                       "requests only from its own page (behind a reverse proxy: pass the Host header, or "
                       "X-Forwarded-Host/-Proto and list the proxy in `trusted_proxies`)")
    if not guard.enabled:
        request.state.caller = ANONYMOUS
        return await call_next(request)
    caller, cred = guard.authenticate(request)
    if (cred is not None and cred.kind == "session" and headers.get("sec-fetch-site") in ("cross-site", "same-site")
            and headers.get("sec-fetch-mode") != "navigate"):
        caller, cred = None, None  # the cookie rides along a sibling site's fetch/<video>/EventSource: ignore it
    if caller is None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
        return _refuse(request, 401, "unauthorized",
                       "a valid API token is required: send `Authorization: Bearer TOKEN` "
                       "(tokens: `i2v-farm token create NAME` on the farm's head node)",
                       **{"WWW-Authenticate": "Bearer"})
    request.state.caller = caller
    request.state.credential = cred if caller else None
    return await call_next(request)


def caller_of(request: Request) -> Caller:
    return getattr(request.state, "caller", None) or ANONYMOUS


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = str(err["loc"][-1]) if err.get("loc") else None
    return error_response(422, "invalid_request", f"{field}: {err['msg']}", field)


def _check_priority(caller: Caller, priority: str | None) -> None:
    if not caller.may_use(priority):
        raise ApiError(f"token {caller.name!r} may ask for priority up to {caller.max_priority!r}, not {priority!r} "
                       "(an operator grants more with `i2v-farm token create NAME --max-priority high`)",
                       code="priority_not_allowed", status=403, field="priority")


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
    job["links"]["poster"] = base + "/poster"
    if job.get("result"):
        job["result"] = {**job["result"], "url": base + "/video", "poster_url": base + "/poster"}
    return job


async def _read_body(request: Request, limit: int, too_large: str, field: str | None = None,
                     chunked: bool = False) -> bytes:
    """The whole body, sized up before it is read: refused without a Content-Length (411; Ray
    Serve's proxy would buffer a chunked upload of any size; `chunked=True`: read, but never past
    `limit`) or above `limit` bytes (413), and never read past `limit` whatever the header said."""
    length = request.headers.get("content-length", "")
    code = "image_too_large" if field == "image" else "request_too_large"
    if chunked and not length:
        length = "0"  # no size announced: read, never past `limit`
    if not length.isdigit():
        raise ApiError("send the request with a Content-Length header (chunked uploads are not accepted)",
                       code="length_required", status=411)
    if int(length) > limit:
        raise ApiError(f"the request is {int(length) / 2**20:.1f} MiB; {too_large}", code=code, status=413,
                       field=field)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(f"the request is over {limit / 2**20:.1f} MiB; {too_large}", code=code, status=413,
                           field=field)
        chunks.append(chunk)
    request._body = body = b"".join(chunks)  # Starlette's cache of the body: request.form() parses it
    return body


async def _read_submission(request: Request, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """(fields, image bytes) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "")
    media = ctype.partition(";")[0].strip().lower()  # media types are case-insensitive; no prefixes
    # base64 grows the image by 4/3; the other fields are small
    limit = max_bytes * 4 // 3 + 2**20
    too_large = f"images may be at most {max_bytes / 2**20:.0f} MiB"
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        await _read_body(request, limit, too_large, "image")
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
    if media == "application/json" or not media:
        body = await _read_body(request, limit, too_large, "image")
        try:
            data = json.loads(body or b"null")
        except ValueError as exc:
            raise ApiError(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise ApiError("the body is not valid JSON: nested too deeply", code="invalid_json") from None
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


# --- the web page, and what it asks before submitting ----------------------------------------

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
        raise ApiError(f"no page asset {name!r}", code="not_found", status=404)
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
        wait = self.guard.limiter.take(caller)
        if wait > 0:
            return error_response(429, "rate_limited",
                                  f"token {caller.name!r} may submit {caller.rate_per_min:g} jobs per minute",
                                  headers={"Retry-After": str(max(1, math.ceil(wait)))})
        fields, image_bytes = await _read_submission(request, self.settings.max_image_bytes)
        params = parse_params(fields)  # field errors before the (slower) image check
        _check_priority(caller, params.priority)
        image = load_image(image_bytes, max_bytes=self.settings.max_image_bytes)
        reply = await self.manager.submit.remote(
            params.model_dump(exclude_none=True),
            image_bytes, _image_format(image_bytes), image.width, image.height,
            request.headers.get("idempotency-key"), caller.name, caller.max_active,
        )
        out = _reply(reply)
        if isinstance(out, Response):
            return out
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
        return out if isinstance(out, Response) else _links(out["job"])

    @app.get("/v1/jobs/{job_id}/video", responses={**ERROR_RESPONSES, 200: {"content": {"video/mp4": {}}},
                                                  307: {"description": "Redirect to a presigned URL (S3)"}})
    async def get_video(self, job_id: str, request: Request):
        """The MP4 of a succeeded job: streamed (with Range support) from local storage, or a
        redirect to a presigned URL on S3/MinIO, valid for `presign_expiry_s`."""
        job = await self._job(job_id, request)
        if job["status"] != JobStatus.SUCCEEDED:
            raise ApiError(f"job {job_id} is {job['status']}; the video exists once it has succeeded",
                           code="not_ready", status=409)
        return await self._object(job["result"]["key"], f"video_{job_id[:8]}.mp4", f"the video of job {job_id}")

    @app.get("/v1/jobs/{job_id}/poster", responses={**ERROR_RESPONSES, 200: {"content": {"image/jpeg": {}}},
                                                   307: {"description": "Redirect to a presigned URL (S3)"}})
    async def get_poster(self, job_id: str, request: Request):
        """The first frame of a succeeded job's video, as a JPEG."""
        job = await self._job(job_id, request)
        if job["status"] != JobStatus.SUCCEEDED or not job["result"].get("poster_key"):
            raise ApiError(f"job {job_id} is {job['status']}; its poster exists once it has succeeded",
                           code="not_ready", status=409)
        return await self._object(job["result"]["poster_key"], None, f"the poster of job {job_id}")

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
        change, ending after the job reaches succeeded, failed or canceled."""
        job = await self._job(job_id, request)
        guard, cred = self.guard, getattr(request.state, "credential", None)
        key = guard.stream_key(request)
        if not guard.streams.acquire(key):
            return error_response(429, "too_many_streams",
                                  f"{guard.settings.max_streams_per_token} event streams are open for this caller "
                                  "already (`max_streams_per_token`): close one (or poll GET /v1/jobs/{id})",
                                  headers={"Retry-After": "5"})

        async def stream():
            last_status, last_progress = None, None
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
        import ray

        info = await self.manager.cluster.remote()
        from .worker import attach_worker_reports  # per class: its replicas' threads, CUDA allocator

        await asyncio.to_thread(attach_worker_reports, info)
        prefix = "vram_"
        info["nodes"] = [
            {"id": n["NodeID"], "alive": n["Alive"], "address": n["NodeManagerAddress"],
             "gpus": n["Resources"].get("GPU", 0),
             "vram_classes": sorted(k[len(prefix):] for k in n["Resources"] if k.startswith(prefix))}
            for n in await asyncio.to_thread(ray.nodes)
        ]
        return info

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
        try:
            data = json.loads(await _read_body(request, 2**20, "an estimate needs only the fields") or b"{}")
        except ValueError as exc:
            raise ApiError(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise ApiError("the body is not valid JSON: nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError("the JSON body must be an object", code="invalid_json")
        data.pop("image", None)  # only its size matters, and that is width/height
        reply = estimate_request(self.settings, data)
        _check_priority(caller_of(request), reply["params"].get("priority"))
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
            raise ApiError(f"no job {job_id[:64]}", code="not_found", status=404)
        return job

    @app.get("/v1/me", response_model=Me, responses=ERROR_RESPONSES)
    async def me(self, request: Request):
        """The calling token: its name, whether it is an admin, and the highest priority it may use
        (access control off: the anonymous admin)."""
        caller = caller_of(request)
        return {"name": caller.name, "admin": caller.admin, "max_priority": caller.max_priority}

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
        ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype not in LOGIN_TYPES:
            raise ApiError(f"send the token as application/json ({{\"token\": ...}}) or a urlencoded form, "
                           f"not {ctype or 'no content type'!r}", code="unsupported_media_type", status=415)
        body = await _read_body(request, LOGIN_MAX_BYTES, "a login needs only the token", chunked=True)
        token = None
        try:
            if ctype == "application/json":
                data = json.loads(body or b"{}")
                token = data.get("token") if isinstance(data, dict) else None
            else:
                from urllib.parse import parse_qs

                token = (parse_qs(body.decode(), max_num_fields=8).get("token") or [None])[0]
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError("the body is not valid JSON or form data", code="invalid_json") from None
        token = token.strip() if isinstance(token, str) else None
        caller = self.guard.tokens.verify(token) if self.guard.enabled else ANONYMOUS
        if caller is None:
            return error_response(401, "unauthorized", "unknown or revoked token", "token")
        resp = JSONResponse({"name": caller.name, "admin": caller.admin, "max_priority": caller.max_priority,
                             "auth": self.guard.enabled})
        if self.guard.enabled:
            self.guard.sessions.revoke(request.cookies.get(COOKIE))  # a previous session of this browser
            sid = self.guard.sessions.create(hash_token(token))
            resp.set_cookie(COOKIE, sid, max_age=self.settings.session_ttl_s, httponly=True, samesite="strict",
                            path="/", secure=getattr(request.state, "scheme", "http") == "https")
        return resp

    @app.post("/v1/logout", include_in_schema=True)
    async def logout(self, request: Request):
        """End the page's session (the cookie stops working at once, everywhere it was copied)."""
        self.guard.sessions.revoke(request.cookies.get(COOKIE))
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=getattr(request.state, "scheme", "http") == "https")
        return resp

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        """The API's OpenAPI page: swagger-ui from the `fastapi-offline` package, nothing from a CDN."""
        if not self.settings.api_docs:
            raise ApiError("the API page is off on this farm (`api_docs: false`); the API is at /openapi.json",
                           code="not_found", status=404)
        return Response(DOCS_HTML, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/docs/{name}", include_in_schema=False)
    async def docs_asset(self, name: str):
        path = _docs_files().get(name) if self.settings.api_docs else None
        if path is None:
            raise ApiError(f"no docs asset {name!r}", code="not_found", status=404)
        return FileResponse(path, media_type=WEB_TYPES.get(path.suffix, "application/octet-stream"),
                            headers={"Cache-Control": "max-age=86400"})
