"""API tokens: hashed at rest, verified, limited; access on by default beyond loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from fastapi import Request  # the test app's routes (annotations are resolved in this module)

from serving.auth import RateLimiter, TokenStore, auth_enabled, hash_token


def test_auth_is_on_by_default_beyond_loopback():
    assert not auth_enabled("auto", "127.0.0.1") and not auth_enabled("auto", "localhost")
    assert auth_enabled("auto", "0.0.0.0") and auth_enabled("auto", "10.1.2.3")
    assert auth_enabled("on", "127.0.0.1") and not auth_enabled("off", "0.0.0.0")


def test_tokens_are_stored_hashed_and_verified(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("alice", rate_per_min=5, max_active=2)
    assert token.startswith("i2v_") and len(token) > 40
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    caller = store.verify(token)
    assert (caller.name, caller.admin, caller.rate_per_min, caller.max_active) == ("alice", False, 5, 2)
    assert store.verify(token + "x") is None and store.verify("") is None and store.verify(None) is None
    with pytest.raises(ValueError, match="exists"):
        store.create("alice")
    with pytest.raises(ValueError):
        store.create("bad name!")
    # another process (the CLI) revokes it; this store sees the change
    time.sleep(0.01)
    assert TokenStore(tmp_path / "tokens.json").revoke("alice")
    assert store.verify(token) is None


def test_rate_limiter_is_a_token_bucket():
    from serving.auth import Caller

    limiter = RateLimiter()
    caller = Caller("c", False, rate_per_min=3, max_active=10)
    assert [limiter.take(caller) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take(caller)
    assert 19 <= wait <= 20.5  # one submission per 20 s refills
    other = Caller("d", False, rate_per_min=3, max_active=10)
    assert limiter.take(other) == 0.0  # per caller


def test_token_command_creates_lists_and_revokes(tmp_path):
    env = {**os.environ, "I2V_TOKENS_FILE": str(tmp_path / "t.json")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "serving.cli", "token", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    made = run("create", "ops", "--admin", "--rate", "10")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    entries = json.loads((tmp_path / "t.json").read_text())
    assert entries[0]["name"] == "ops" and entries[0]["admin"] and token not in json.dumps(entries)
    listed = run("list")
    assert "ops\tadmin\t10/min" in listed.stdout and token not in listed.stdout
    assert "priority up to high" in listed.stdout
    made = run("create", "vip", "--max-priority", "high")
    assert made.returncode == 0 and json.loads((tmp_path / "t.json").read_text())[1]["max_priority"] == "high"
    assert "vip\tuser\t30/min\tmax 20 active\tpriority up to high" in run("list").stdout
    assert run("create", "x", "--max-priority", "urgent").returncode == 2  # argparse: not a choice
    assert run("create", "week", "--expires-days", "7").returncode == 0
    assert "\texpires 20" in [line for line in run("list").stdout.splitlines() if line.startswith("week")][0]
    assert run("revoke", "ops").returncode == 0
    gone = run("revoke", "ops")
    assert gone.returncode == 2 and "no token named 'ops'" in gone.stderr


# --- issue 14: sessions, origins, proxies, redirects, headers, priorities ------------------------

def test_sessions_are_random_ids_that_expire_and_are_revoked():
    from serving.auth import SessionStore

    now = [1000.0]
    sessions = SessionStore(ttl_s=60, per_token=2, clock=lambda: now[0])
    th = hash_token("i2v_secret")
    sid = sessions.create(th)
    assert "i2v_secret" not in sid and len(sid) >= 40 and sessions.token_hash(sid) == th
    assert sessions.token_hash(sid + "x") is None and sessions.token_hash(None) is None
    assert sessions.revoke(sid) and sessions.token_hash(sid) is None and not sessions.revoke(sid)  # logout
    sid = sessions.create(th)
    now[0] += 61
    assert sessions.token_hash(sid) is None  # expired
    a, b, c = sessions.create(th), sessions.create(th), sessions.create(th)
    assert sessions.token_hash(a) is None and sessions.token_hash(b) == sessions.token_hash(c) == th  # per_token cap
    other = sessions.create(hash_token("i2v_other"))
    assert sessions.revoke_token(th) == 2 and sessions.token_hash(c) is None and sessions.token_hash(other)


def test_token_max_priority_defaults_to_normal_and_admins_get_high(tmp_path):
    from serving.auth import Caller

    store = TokenStore(tmp_path / "tokens.json")
    low = store.verify(store.create("low", max_priority="low"))
    normal = store.verify(store.create("normal"))
    ops = store.verify(store.create("ops", admin=True))
    assert (low.max_priority, normal.max_priority, ops.max_priority) == ("low", "normal", "high")
    assert low.may_use("low") and not low.may_use("normal") and normal.may_use("normal")
    assert not normal.may_use("high") and ops.may_use("high") and normal.may_use(None)
    with pytest.raises(ValueError):
        store.create("x", max_priority="urgent")
    # a tokens file written before max_priority existed reads as normal
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"name": "bob", "sha256": hash_token("i2v_b"), "admin": False,
                                "rate_per_min": 5, "max_active": 2}]))
    assert TokenStore(old).verify("i2v_b") == Caller("bob", False, 5, 2, "normal")
    assert TokenStore(old).by_hash(hash_token("i2v_b")).name == "bob"


@pytest.mark.parametrize("origin, fetch_site, ok", [
    (None, None, True),                              # curl, the CLI: no browser headers
    ("http://127.0.0.1:8000", "same-origin", True),
    ("http://127.0.0.1:8000", None, True),
    ("http://127.0.0.1:8001", None, False),          # another port: another origin, same site
    ("http://127.0.0.1:8000", "same-site", False),
    ("https://127.0.0.1:8000", None, False),         # another scheme
    ("http://evil.example", "cross-site", False),
    ("null", None, False),                           # sandboxed iframe, data: page
    (None, "cross-site", False),
])
def test_origin_check_of_state_changing_requests(origin, fetch_site, ok):
    from serving.auth import origin_allowed

    assert origin_allowed(origin, fetch_site, "http", "127.0.0.1:8000") is ok


def test_forwarded_headers_are_believed_only_from_trusted_proxies():
    from serving.auth import client_address, parse_networks, request_host, request_scheme

    trusted = parse_networks(["10.0.0.0/8", "localhost"])
    fwd = {"x-forwarded-for": "203.0.113.7, 10.0.0.2", "x-forwarded-proto": "https", "x-forwarded-host": "farm.org"}
    assert client_address("10.0.0.3", fwd, trusted) == "203.0.113.7"
    assert request_scheme("http", "10.0.0.3", fwd, trusted) == "https"
    assert request_host("10.0.0.3", {**fwd, "host": "127.0.0.1:8000"}, trusted) == "farm.org"
    # an untrusted peer: its own address, its claims ignored
    assert client_address("198.51.100.9", fwd, trusted) == "198.51.100.9"
    assert request_scheme("https", "198.51.100.9", fwd, trusted) == "http"
    assert request_host("198.51.100.9", {**fwd, "host": "h:1"}, trusted) == "h:1"
    assert client_address("198.51.100.9", fwd, []) == "198.51.100.9"
    # Serve's uvicorn already swapped in X-Forwarded-For's address (a loopback peer): no trusted proxies
    assert client_address("10.0.0.2", fwd, []) == "127.0.0.1"
    assert request_scheme("https", "10.0.0.2", fwd, []) == "http"
    assert request_scheme("https", "1.2.3.4", {}, []) == "https"  # TLS at Serve itself


def test_credentials_are_dropped_on_a_redirect_to_another_origin():
    import urllib.request

    from serving.client import CredentialSafeRedirects, same_origin

    assert same_origin("http://a:80/x", "http://a/y") and not same_origin("http://a:8000/", "http://a:9000/")
    assert not same_origin("https://a/", "http://a/") and not same_origin("http://a/", "http://b/")
    handler = CredentialSafeRedirects()
    req = urllib.request.Request("http://127.0.0.1:8000/v1/jobs/x/video",
                                 headers={"Authorization": "Bearer i2v_t", "Cookie": "i2v_session=s"})
    away = handler.redirect_request(req, None, 307, "", {}, "http://127.0.0.1:9000/bucket/v.mp4?X-Amz-Signature=1")
    assert not away.has_header("Authorization") and not away.has_header("Cookie")
    home = handler.redirect_request(req, None, 307, "", {}, "http://127.0.0.1:8000/elsewhere")
    assert home.get_header("Authorization") == "Bearer i2v_t"


def test_security_headers_forbid_framing_sniffing_referrers_and_foreign_scripts():
    from serving.auth import security_headers

    h = security_headers(media_origins=["https://files.example.org"])
    csp = dict(d.strip().split(" ", 1) for d in h["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["object-src"] == "'none'"
    assert "https://files.example.org" in csp["media-src"] and "blob:" in csp["img-src"]
    assert "unsafe" not in h["Content-Security-Policy"]
    assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff"
    assert h["Referrer-Policy"] == "no-referrer"
    assert "unsafe-eval" not in security_headers(docs=True)["Content-Security-Policy"]


def test_stream_limiter_caps_per_caller():
    from serving.auth import StreamLimiter

    lim = StreamLimiter(2)
    assert lim.acquire("a") and lim.acquire("a") and not lim.acquire("a") and lim.acquire("b")
    lim.release("a")
    assert lim.acquire("a") and lim.count("a") == 2


def test_an_expired_token_stops_working(tmp_path, monkeypatch):
    import serving.auth as auth

    store = TokenStore(tmp_path / "tokens.json")
    token = store.create("temp", expires_in_s=3600)
    forever = store.create("forever")
    assert store.verify(token).name == "temp" and store.by_hash(hash_token(token)).name == "temp"
    later = time.time() + 3601
    monkeypatch.setattr(auth.time, "time", lambda: later)
    assert store.verify(token) is None and store.by_hash(hash_token(token)) is None
    assert store.verify(forever).name == "forever"
    with pytest.raises(ValueError):
        store.create("never", expires_in_s=0)


# --- serving.access: the ingress's guard, driven as ASGI (no Ray, no server) ---------------------

def _guarded_app(tmp_path, **settings):
    """A FastAPI app with the farm's access middleware and error handler, and routes that say who called."""
    from fastapi import FastAPI

    from pipeline.errors import I2VError
    from serving.access import AccessMiddleware, Guard, caller_of
    from serving.api import _i2v_error
    from serving.config import FarmSettings

    app = FastAPI()
    app.add_middleware(AccessMiddleware)
    app.exception_handler(I2VError)(_i2v_error)
    guard = Guard(FarmSettings(tokens_file=str(tmp_path / "tokens.json"), **settings))
    app.state.guard = guard

    @app.get("/v1/jobs")
    async def jobs(request: Request):
        return {"caller": caller_of(request).name}

    @app.post("/v1/jobs")
    async def submit(request: Request):
        return {"caller": caller_of(request).name}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/v1/login")
    async def login(request: Request):
        return await guard.login(request)

    @app.post("/v1/logout")
    async def logout(request: Request):
        return guard.logout(request)

    return app, guard


def _call(app, method, path, headers=None, body=b""):
    """One request through the ASGI app: (status, headers (lower-case names), JSON body)."""
    import asyncio

    headers = {"host": "127.0.0.1:8000", **(headers or {})}
    if body:
        headers["content-length"] = str(len(body))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out_headers: dict[str, list[str]] = {}
    for k, v in start["headers"]:
        out_headers.setdefault(k.decode().lower(), []).append(v.decode())
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], out_headers, json.loads(data) if data else None


def test_guard_lets_tokens_in_keeps_others_out_and_sets_the_security_headers(tmp_path):
    app, guard = _guarded_app(tmp_path, auth="on")
    token = guard.tokens.create("alice")
    status, headers, body = _call(app, "GET", "/v1/jobs")
    assert status == 401 and body["error"]["code"] == "unauthorized" and headers["www-authenticate"] == ["Bearer"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"][0]  # on refusals too
    assert _call(app, "GET", "/v1/jobs", {"authorization": "Bearer " + token + "x"})[0] == 401
    status, headers, body = _call(app, "GET", "/v1/jobs", {"authorization": "Bearer " + token})
    assert (status, body) == (200, {"caller": "alice"}) and headers["x-frame-options"] == ["DENY"]
    assert _call(app, "GET", "/healthz")[0] == 200  # public
    # a browser on another origin may not change anything, whatever token it carries
    status, _, body = _call(app, "POST", "/v1/jobs", {"authorization": "Bearer " + token,
                                                      "origin": "http://evil.example", "sec-fetch-site": "cross-site"})
    assert (status, body["error"]["code"]) == (403, "cross_origin")
    assert _call(app, "POST", "/v1/jobs", {"authorization": "Bearer " + token,
                                           "origin": "http://127.0.0.1:8000"})[2] == {"caller": "alice"}


def test_the_security_headers_are_added_to_streamed_answers_and_never_replace_a_routes_own(tmp_path):
    from fastapi.responses import Response, StreamingResponse

    app, _ = _guarded_app(tmp_path, auth="off")

    @app.get("/v1/own")
    async def own():
        return Response(b"{}", media_type="application/json", headers={"X-Frame-Options": "SAMEORIGIN"})

    @app.get("/v1/stream")
    async def stream():
        async def chunks():
            yield b'{"a": '
            yield b"1}"
        return StreamingResponse(chunks(), media_type="application/json")

    status, headers, _ = _call(app, "GET", "/v1/own")
    assert status == 200 and headers["x-frame-options"] == ["SAMEORIGIN"]  # the route's own, once
    assert headers["x-content-type-options"] == ["nosniff"]
    status, headers, body = _call(app, "GET", "/v1/stream")
    assert (status, body) == (200, {"a": 1}) and headers["x-frame-options"] == ["DENY"]


def test_login_makes_a_session_cookie_that_logout_and_revocation_end(tmp_path):
    from serving.auth import COOKIE

    app, guard = _guarded_app(tmp_path, auth="on")
    token = guard.tokens.create("bob", max_priority="low")
    status, _, body = _call(app, "POST", "/v1/login", {"content-type": "text/plain"}, b"token=" + token.encode())
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    status, _, body = _call(app, "POST", "/v1/login", {"content-type": "application/json"}, b'{"token": "i2v_no"}')
    assert (status, body["error"]["code"], body["error"]["field"]) == (401, "unauthorized", "token")
    status, headers, body = _call(app, "POST", "/v1/login", {"content-type": "application/x-www-form-urlencoded"},
                                  b"token=" + token.encode())
    assert (status, body) == (200, {"name": "bob", "admin": False, "max_priority": "low", "auth": True})
    cookie = headers["set-cookie"][0]
    assert cookie.startswith(COOKIE + "=") and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert token not in cookie and guard.sessions.token_hash(sid) == hash_token(token)
    with_cookie = {"cookie": f"{COOKIE}={sid}"}
    assert _call(app, "GET", "/v1/jobs", with_cookie)[2] == {"caller": "bob"}
    # a sibling site's fetch carries the cookie along: it counts for nothing
    assert _call(app, "GET", "/v1/jobs", {**with_cookie, "sec-fetch-site": "same-site", "sec-fetch-mode": "cors"})[0] == 401
    assert _call(app, "POST", "/v1/logout", with_cookie)[0] == 200
    assert _call(app, "GET", "/v1/jobs", with_cookie)[0] == 401
    # a new session ends when its token is revoked
    sid = _call(app, "POST", "/v1/login", {"content-type": "application/json"},
                json.dumps({"token": token}).encode())[1]["set-cookie"][0].split(";")[0].split("=", 1)[1]
    assert _call(app, "GET", "/v1/jobs", {"cookie": f"{COOKIE}={sid}"})[0] == 200
    time.sleep(0.01)
    assert TokenStore(tmp_path / "tokens.json").revoke("bob")
    assert _call(app, "GET", "/v1/jobs", {"cookie": f"{COOKIE}={sid}"})[0] == 401
    assert guard.sessions.token_hash(sid) is None


def test_open_loopback_farm_refuses_proxied_requests_and_checks_rate_and_priority(tmp_path):
    from pipeline.errors import I2VError
    from serving.access import check_priority
    from serving.auth import Caller

    app, guard = _guarded_app(tmp_path)  # auth: auto on 127.0.0.1: off
    assert _call(app, "GET", "/v1/jobs")[2] == {"caller": "anonymous"}
    status, _, body = _call(app, "GET", "/v1/jobs", {"x-forwarded-for": "203.0.113.9"})
    assert (status, body["error"]["code"]) == (403, "proxy_without_auth")
    assert _call(app, "GET", "/healthz", {"x-forwarded-for": "203.0.113.9"})[0] == 200
    caller = Caller("c", False, rate_per_min=2, max_active=5, max_priority="normal")
    guard.check_rate(caller)
    guard.check_rate(caller)
    with pytest.raises(I2VError) as refused:
        guard.check_rate(caller)
    assert refused.value.http_status == 429 and refused.value.code == "rate_limited"
    assert int(refused.value.headers()["Retry-After"]) >= 1
    check_priority(caller, "normal")
    with pytest.raises(I2VError) as refused:
        check_priority(caller, "high")
    assert (refused.value.http_status, refused.value.code, refused.value.field) == (403, "priority_not_allowed",
                                                                                     "priority")
