"""Issue 14, the HTTP side, driven the way an attacker would: login body limits and content types,
login/logout CSRF, session cookies that are not the token, SSE stream caps and revocation, security
headers, priorities per token, `/v1/me`, and forwarded headers believed only from trusted proxies."""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time

import pytest
import requests

from serving.auth import COOKIE
from tests.integration.conftest import deploy_secured, png_bytes, undeploy

PROXY = "127.0.0.2"  # a trusted reverse proxy: tests connect from this source address
LONG = {"resolution": "512p", "num_frames": 16, "num_inference_steps": 100}


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    many = {"rate_per_min": 1000, "max_active": 50}
    farm, tokens, store = deploy_secured(ray_cluster, tmp, {
        "alice": many, "mallory": many, "boss": {**many, "max_priority": "high"},
        "lowly": {**many, "max_priority": "low"}, "ops": {"admin": True}, "streamer": many,
    }, trusted_proxies=[PROXY], max_streams_per_token=3, sim_time_scale=0.2,
        workers={"12gb": {"min_replicas": 1, "max_replicas": 1}})
    yield farm, tokens, store
    undeploy()


def _h(token, **more):
    return {"Authorization": f"Bearer {token}", **more}


def _port(farm) -> int:
    return int(farm.url.rsplit(":", 1)[1])


def _raw(farm, method, path, body=b"", headers=None, source=None):
    """One request from a chosen source address (a trusted proxy is 127.0.0.2)."""
    conn = http.client.HTTPConnection("127.0.0.1", _port(farm), timeout=30,
                                      source_address=(source, 0) if source else None)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


# --- 1. login: body limit, content types, cross-origin ---------------------------------------------

def test_login_refuses_text_plain_and_other_types(secured):
    farm, tokens, _ = secured
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x", ""):
        r = requests.post(farm.url + "/v1/login", data=f'{{"token": "{tokens["mallory"]}"}}',
                          headers={"Content-Type": ctype} if ctype else {}, timeout=10)
        assert r.status_code == 415, (ctype, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type" and COOKIE not in r.cookies
    form = requests.post(farm.url + "/v1/login", data={"token": tokens["alice"]}, timeout=10)  # urlencoded
    assert form.status_code == 200 and form.json()["name"] == "alice" and COOKIE in form.cookies


def test_login_body_is_limited_while_it_is_read_chunked_too(secured):
    farm, tokens, _ = secured
    r = requests.post(farm.url + "/v1/login", data=b"{" + b" " * 100_000 + b"}",
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    # 256 MiB chunked, no Content-Length: the answer must come long before it is all sent
    sock = socket.create_connection(("127.0.0.1", _port(farm)), timeout=30)
    sock.sendall(b"POST /v1/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * (1 << 20)
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent, answer = [0], []

    def send():
        try:
            while sent[0] < 256 and not answer:
                sock.sendall(frame)
                sent[0] += 1
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sock.settimeout(60)
    head = b""
    while b"\r\n\r\n" not in head:
        part = sock.recv(65536)
        if not part:
            break
        head += part
    answer.append(head)
    sock.close()
    sender.join(10)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent[0] < 128, f"{sent[0]} MiB were taken before the farm answered"


def test_login_and_logout_from_another_origin_are_refused(secured):
    farm, tokens, _ = secured
    evil = f"http://127.0.0.1:{_port(farm) + 1}"  # same site (loopback), another origin
    for headers, data in [({"Origin": evil}, {"token": tokens["mallory"]}),
                          ({"Origin": "null"}, {"token": tokens["mallory"]}),
                          ({"Sec-Fetch-Site": "cross-site"}, {"token": tokens["mallory"]}),
                          ({"Origin": evil, "Sec-Fetch-Site": "same-site"}, {"token": tokens["mallory"]})]:
        r = requests.post(farm.url + "/v1/login", data=data, headers=headers, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", headers
        assert COOKIE not in r.cookies
    ok = requests.post(farm.url + "/v1/login", json={"token": tokens["alice"]},
                       headers={"Origin": farm.url, "Sec-Fetch-Site": "same-origin"}, timeout=10)
    assert ok.status_code == 200
    sid = ok.cookies[COOKIE]
    out = requests.post(farm.url + "/v1/logout", cookies={COOKIE: sid}, headers={"Origin": evil}, timeout=10)
    assert out.status_code == 403  # a hostile page cannot log the user out either
    assert requests.get(farm.url + "/v1/me", cookies={COOKIE: sid}, timeout=10).status_code == 200
    # other state-changing calls with the cookie from another origin: refused too
    job = requests.post(farm.url + "/v1/jobs", cookies={COOKIE: sid}, headers={"Origin": evil}, timeout=10,
                        json={"prompt": "x", "image": base64.b64encode(png_bytes()).decode()})
    assert job.status_code == 403 and job.json()["error"]["code"] == "cross_origin"
    # a sibling origin's fetch/<video>/EventSource carries the (same-site) cookie: it is ignored
    sibling = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}
    assert requests.get(farm.url + "/v1/jobs", cookies={COOKIE: sid}, headers=sibling, timeout=10).status_code == 401
    mine = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert requests.get(farm.url + "/v1/jobs", cookies={COOKIE: sid}, headers=mine, timeout=10).status_code == 200


# --- 2. sessions -----------------------------------------------------------------------------------

def test_the_cookie_is_a_session_id_that_dies_with_logout_and_with_the_token(secured):
    farm, tokens, store = secured
    temp = store.create("temp", rate_per_min=100, max_active=5)
    r = requests.post(farm.url + "/v1/login", json={"token": temp}, timeout=10)
    assert r.status_code == 200
    sid = r.cookies[COOKIE]
    cookie = r.headers["set-cookie"]
    assert temp not in cookie and temp not in sid
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie  # plain HTTP, no trusted proxy said https
    copied = {COOKIE: sid}  # what an attacker who saw the cookie replays
    assert requests.get(farm.url + "/v1/me", cookies=copied, timeout=10).json()["name"] == "temp"
    assert requests.post(farm.url + "/v1/logout", cookies=copied, timeout=10).status_code == 200
    assert requests.get(farm.url + "/v1/me", cookies=copied, timeout=10).status_code == 401
    assert requests.get(farm.url + "/v1/jobs", cookies={COOKIE: temp}, timeout=10).status_code == 401  # the raw token

    second = requests.post(farm.url + "/v1/login", json={"token": temp}, timeout=10).cookies[COOKIE]
    assert requests.get(farm.url + "/v1/jobs", cookies={COOKIE: second}, timeout=10).status_code == 200
    store.revoke("temp")  # `i2v-farm token revoke temp`
    assert requests.get(farm.url + "/v1/jobs", cookies={COOKIE: second}, timeout=10).status_code == 401


def test_secure_cookie_only_when_a_trusted_proxy_says_https(secured):
    farm, tokens, _ = secured
    body = b'{"token": "%s"}' % tokens["alice"].encode()
    headers = {"Content-Type": "application/json", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5",
               "X-Forwarded-Host": "farm.example.org", "Origin": "https://farm.example.org"}
    resp, _ = _raw(farm, "POST", "/v1/login", body, headers, source=PROXY)
    assert resp.status == 200 and "Secure" in resp.getheader("set-cookie")
    # the same claims from a peer that is not a trusted proxy are ignored (and its Origin is foreign)
    resp, _ = _raw(farm, "POST", "/v1/login", body, {k: v for k, v in headers.items() if k != "Origin"})
    assert resp.status == 200 and "Secure" not in resp.getheader("set-cookie")
    resp, _ = _raw(farm, "POST", "/v1/login", body, headers)
    assert resp.status == 403


# --- 4. server-sent events --------------------------------------------------------------------------

def test_event_streams_are_capped_per_token_and_end_when_it_is_revoked(secured):
    farm, tokens, store = secured
    token = tokens["streamer"]
    job = farm.submit_ok(headers=_h(token), **LONG)
    url = f"{farm.url}/v1/jobs/{job['id']}/events"
    opened = [requests.get(url, headers=_h(token), stream=True, timeout=30) for _ in range(3)]
    try:
        assert all(r.status_code == 200 for r in opened)
        over = requests.get(url, headers=_h(token), timeout=10)
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_streams"
        assert "max_streams_per_token" in over.json()["error"]["message"] and int(over.headers["Retry-After"]) > 0
        ops = requests.get(url, headers=_h(tokens["ops"]), stream=True, timeout=30)  # other callers unaffected
        assert ops.status_code == 200
        ops.close()
        opened.pop().close()
        deadline = time.monotonic() + 10
        while (again := requests.get(url, headers=_h(token), stream=True, timeout=30)).status_code == 429:
            assert time.monotonic() < deadline, "a closed stream was never released"
            time.sleep(0.3)
        opened.append(again)

        store.revoke("streamer")
        started = time.monotonic()
        for r in opened:
            lines = list(r.iter_lines(decode_unicode=True))  # ends: the farm closes the stream
            assert "event: error" in lines and any("revoked" in x for x in lines)
        assert time.monotonic() - started < 15
    finally:
        for r in opened:
            r.close()
    assert requests.get(url, headers=_h(token), timeout=10).status_code == 401


def test_a_logged_out_session_ends_its_stream(secured):
    farm, tokens, _ = secured
    s = requests.Session()
    assert s.post(farm.url + "/v1/login", json={"token": tokens["alice"]}, timeout=10).status_code == 200
    job = farm.submit_ok(headers=_h(tokens["alice"]), **LONG)
    stream = s.get(f"{farm.url}/v1/jobs/{job['id']}/events", stream=True, timeout=30)
    assert stream.status_code == 200
    requests.post(farm.url + "/v1/logout", cookies={COOKIE: s.cookies[COOKIE]}, timeout=10)
    lines = list(stream.iter_lines(decode_unicode=True))
    assert "event: error" in lines
    requests.post(f"{farm.url}/v1/jobs/{job['id']}/cancel", headers=_h(tokens["alice"]), timeout=10)


# --- 5. security headers ------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 200), ("GET", "/ui/app.js", 200), ("GET", "/v1/jobs", 401), ("GET", "/openapi.json", 200),
    ("GET", "/docs", 200), ("GET", "/healthz", 200), ("POST", "/v1/login", 415), ("GET", "/ui/nothing.js", 404),
])
def test_every_response_carries_the_security_headers(secured, method, path, status):
    farm, _, _ = secured
    r = requests.request(method, farm.url + path, timeout=10)
    assert r.status_code == status
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_docs_are_served_from_the_farm_not_a_cdn(secured):
    farm, _, _ = secured
    page = requests.get(farm.url + "/docs", timeout=10)
    assert page.status_code == 200 and "http" not in page.text and "<script>" not in page.text
    for asset in ("docs/swagger-ui-bundle.js", "docs/swagger-ui.css", "ui/docs.js"):
        assert asset in page.text
        r = requests.get(f"{farm.url}/{asset}", timeout=30)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert requests.get(farm.url + "/docs/..%2Ftokens.json", timeout=10).status_code == 404


# --- 6. priority, 8. /v1/me ---------------------------------------------------------------------------

def test_priority_above_the_tokens_maximum_is_refused(secured):
    farm, tokens, _ = secured
    r = farm.submit(headers=_h(tokens["alice"]), priority="high", num_frames=8, num_inference_steps=2)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("priority_not_allowed", "priority") and "'normal'" in err["message"]
    multipart = requests.post(farm.url + "/v1/jobs", headers=_h(tokens["alice"]), timeout=30,
                              files={"image": ("a.png", png_bytes(), "image/png")},
                              data={"prompt": "x", "priority": "high"})
    assert multipart.status_code == 403 and multipart.json()["error"]["field"] == "priority"
    est = requests.post(farm.url + "/v1/estimate", json={"priority": "high"}, headers=_h(tokens["alice"]), timeout=10)
    assert est.status_code == 403 and est.json()["error"]["code"] == "priority_not_allowed"
    low = farm.submit(headers=_h(tokens["lowly"]), priority="normal", num_frames=8, num_inference_steps=2)
    assert low.status_code == 403
    jobs = lambda: requests.get(farm.url + "/v1/cluster", headers=_h(tokens["ops"]), timeout=10).json()["jobs"]  # noqa: E731
    before = jobs()
    for name, prio in [("alice", "normal"), ("boss", "high"), ("ops", "high"), ("lowly", "low")]:
        ok = farm.submit(headers=_h(tokens[name]), priority=prio, num_frames=8, num_inference_steps=2)
        assert ok.status_code == 202, (name, ok.text)
        requests.post(farm.url + f"/v1/jobs/{ok.json()['id']}/cancel", headers=_h(tokens[name]), timeout=10)
    assert sum(jobs().values()) == sum(before.values()) + 4  # nothing queued for the refusals


def test_me_names_the_calling_token(secured):
    farm, tokens, _ = secured
    me = lambda t: requests.get(farm.url + "/v1/me", headers=_h(t), timeout=10)  # noqa: E731
    assert me(tokens["alice"]).json() == {"name": "alice", "admin": False, "max_priority": "normal"}
    assert me(tokens["ops"]).json() == {"name": "ops", "admin": True, "max_priority": "high"}
    assert me(tokens["lowly"]).json()["max_priority"] == "low"
    assert requests.get(farm.url + "/v1/me", timeout=10).status_code == 401
