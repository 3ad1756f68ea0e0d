"""Access control of the HTTP ingress: who a request comes from, and whether it may come in.

`serving.auth` holds the parts that need no web framework (tokens, sessions, rate and stream
limits, proxy and origin rules, security headers); this module applies them to requests:

- `Guard`: one ingress replica's access state; `authenticate` finds the caller of a request
  (`Authorization: Bearer TOKEN`, else the session cookie), `recheck` tells whether a credential
  still holds (an event stream asks before each event), `stream_key` says whose event streams
  are counted together; `check_rate` refuses submissions over the token's rate (429);
  `login`/`logout` answer `POST /v1/login` and `/v1/logout`.
- `AccessMiddleware`: on every request, the proxy and cross-origin refusals (403), the token
  check (401 outside `PUBLIC_PATHS`; `admit`), `request.state.caller`, and the security headers.
- `caller_of(request)`: the caller the middleware found (the anonymous admin when access control
  is off); `caller_info`: what `GET /v1/me` answers about it; `check_priority`: 403
  `priority_not_allowed` above the token's `max_priority`.

Refusals are `{"error": {"code", "message", "field"}}`, like every other error of the API.
"""

from __future__ import annotations

import logging
import math
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.errors import I2VError

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
from .bodies import json_body, read_body
from .config import FarmSettings

logger = logging.getLogger(__name__)

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

    def check_rate(self, caller: Caller) -> None:
        """429 `rate_limited` (with `Retry-After`) when the caller submits faster than its `rate_per_min`."""
        wait = self.limiter.take(caller)
        if wait > 0:
            raise I2VError(f"token {caller.name!r} may submit {caller.rate_per_min:g} jobs per minute",
                           code="rate_limited", http_status=429, retry_after=max(1, math.ceil(wait)))

    async def login(self, request: Request) -> JSONResponse:
        """`POST /v1/login`: the token (JSON `{"token"}` or a urlencoded form, at most
        `LOGIN_MAX_BYTES`) for an HttpOnly session cookie holding a random session id."""
        ctype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype not in LOGIN_TYPES:
            raise I2VError(f"send the token as application/json ({{\"token\": ...}}) or a urlencoded form, "
                           f"not {ctype or 'no content type'!r}", code="unsupported_media_type", http_status=415)
        body = await read_body(request, LOGIN_MAX_BYTES, "a login needs only the token", chunked=True)
        invalid = "the body is not valid JSON or form data"
        if ctype == "application/json":
            data = json_body(body, empty={}, invalid=invalid, objects=False)
            token = data.get("token") if isinstance(data, dict) else None
        else:
            try:
                token = (parse_qs(body.decode(), max_num_fields=8).get("token") or [None])[0]
            except (ValueError, UnicodeDecodeError):
                raise I2VError(invalid, code="invalid_json") from None
        token = token.strip() if isinstance(token, str) else None
        caller = self.tokens.verify(token) if self.enabled else ANONYMOUS
        if caller is None:
            raise I2VError("unknown or revoked token", code="unauthorized", http_status=401, field="token")
        resp = JSONResponse({**caller_info(caller), "auth": self.enabled})
        if self.enabled:
            self.sessions.revoke(request.cookies.get(COOKIE))  # a previous session of this browser
            sid = self.sessions.create(hash_token(token))
            resp.set_cookie(COOKIE, sid, max_age=self.settings.session_ttl_s, httponly=True, samesite="strict",
                            path="/", secure=getattr(request.state, "scheme", "http") == "https")
        return resp

    def logout(self, request: Request) -> JSONResponse:
        """`POST /v1/logout`: the session ends at once (the cookie stops working wherever it was copied)."""
        self.sessions.revoke(request.cookies.get(COOKIE))
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=getattr(request.state, "scheme", "http") == "https")
        return resp


def caller_info(caller: Caller) -> dict:
    """`GET /v1/me`: the calling token's name, whether it is an admin, its highest priority."""
    return {"name": caller.name, "admin": caller.admin, "max_priority": caller.max_priority}


def refuse(request: Request, status: int, code: str, message: str, **headers: str) -> JSONResponse:
    """A refusal before the request reaches its route, logged (401 at info, others at warning)."""
    log = logger.info if status == 401 else logger.warning
    log("refused %s %s from %s: %s %s", request.method, request.url.path[:200],
        getattr(request.state, "client_ip", None), status, code)
    return JSONResponse({"error": I2VError(message, code=code).to_dict()}, status_code=status,
                        headers=headers or None)


class AccessMiddleware:
    """The HTTP middleware of the ingress (`app.add_middleware(AccessMiddleware)`): the app's
    `state.guard` (none: every caller is the anonymous admin, as in tests of the bare app) decides
    (`admit`), and every answer gets the security headers (the API page's own set under /docs).

    A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` (`app.middleware("http")`) runs each
    request's app in a task group with memory streams for its body and answer: 13 % of the
    ingress's Python time under `bench.control_plane` (docs/benchmarks.md)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        guard: Guard | None = getattr(request.app.state, "guard", None)
        if guard is None:
            request.state.caller = ANONYMOUS
            await self.app(scope, receive, send)
            return
        refusal = admit(guard, request)
        path = request.url.path
        headers = guard.docs_headers if path == "/docs" or path.startswith("/docs/") else guard.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent = MutableHeaders(scope=message)
                for name, value in headers.items():
                    sent.setdefault(name, value)
            await send(message)

        await (self.app if refusal is None else refusal)(scope, receive, send_with_headers)


def admit(guard: Guard, request: Request) -> JSONResponse | None:
    """Whether a request may come in: None (it may; `request.state.caller` is its caller), or the
    refusal to answer (403 through a proxy with access control off or from another origin, 401
    without a valid token outside `PUBLIC_PATHS`)."""
    headers = request.headers
    client_host = request.client.host if request.client else None
    request.state.client_ip = client_address(client_host, headers, guard.trusted)
    request.state.scheme = request_scheme(request.url.scheme, client_host, headers, guard.trusted)
    request.state.credential = None
    path = request.url.path
    if (guard.mode == "auto" and not guard.enabled and path not in ("/healthz", "/readyz")
            and any(h in headers for h in PROXY_HEADERS)):
        return refuse(request, 403, "proxy_without_auth",
                      "this farm is reached through a proxy (the request carries X-Forwarded-For, Forwarded "
                      "or X-Real-IP) but listens on loopback with access control off, which would make every "
                      "caller an admin: turn tokens on (`I2V_AUTH=on`, then `i2v-farm token create NAME`), "
                      "or set `auth: off` to run it open on purpose")
    if request.method not in SAFE_METHODS and not origin_allowed(
            headers.get("origin"), headers.get("sec-fetch-site"), request.state.scheme,
            request_host(client_host, headers, guard.trusted)):
        return refuse(request, 403, "cross_origin",
                      "a browser sent this request from another site or origin: the farm takes state-changing "
                      "requests only from its own page (behind a reverse proxy: pass the Host header, or "
                      "X-Forwarded-Host/-Proto and list the proxy in `trusted_proxies`)")
    if not guard.enabled:
        request.state.caller = ANONYMOUS
        return None
    caller, cred = guard.authenticate(request)
    if (cred is not None and cred.kind == "session" and headers.get("sec-fetch-site") in ("cross-site", "same-site")
            and headers.get("sec-fetch-mode") != "navigate"):
        caller, cred = None, None  # the cookie rides along a sibling site's fetch/<video>/EventSource: ignore it
    if caller is None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
        return refuse(request, 401, "unauthorized",
                      "a valid API token is required: send `Authorization: Bearer TOKEN` "
                      "(tokens: `i2v-farm token create NAME` on the farm's head node)",
                      **{"WWW-Authenticate": "Bearer"})
    request.state.caller = caller
    request.state.credential = cred if caller else None
    return None


def caller_of(request: Request) -> Caller:
    return getattr(request.state, "caller", None) or ANONYMOUS


def check_priority(caller: Caller, priority: str | None) -> None:
    """403 `priority_not_allowed` when the caller's token may not ask for `priority`."""
    if not caller.may_use(priority):
        raise I2VError(f"token {caller.name!r} may ask for priority up to {caller.max_priority!r}, not {priority!r} "
                       "(an operator grants more with `i2v-farm token create NAME --max-priority high`)",
                       code="priority_not_allowed", http_status=403, field="priority")
