"""Access control through HTTP: tokens, whose jobs a caller sees, rate and concurrency limits."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

from tests.integration.conftest import deploy_secured, png_bytes, undeploy

LONG = {"resolution": "512p", "num_frames": 16, "num_inference_steps": 100}


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    farm, tokens, store = deploy_secured(ray_cluster, tmp, {
        "alice": {"rate_per_min": 100, "max_active": 10},
        "bob": {"rate_per_min": 100, "max_active": 10},
        "ops": {"admin": True},
        "slow": {"rate_per_min": 2, "max_active": 10},
        "single": {"rate_per_min": 100, "max_active": 1},
    }, workers={"12gb": {"min_replicas": 2, "max_replicas": 2}})
    yield farm, tokens, store, tmp
    undeploy()


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_only_public_pages_answer(secured):
    farm, tokens, _, _ = secured
    r = requests.post(farm.url + "/v1/jobs", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "token" in r.json()["error"]["message"]
    assert requests.get(farm.url + "/v1/jobs", headers=_h("i2v_wrong"), timeout=10).status_code == 401
    for public in ("/healthz", "/", "/openapi.json", "/v1/info", "/ui/app.js"):
        assert requests.get(farm.url + public, timeout=10).status_code == 200, public


def test_callers_see_only_their_own_jobs_and_admins_all(secured):
    farm, tokens, _, _ = secured
    a = farm.submit_ok(headers=_h(tokens["alice"]), num_frames=8, num_inference_steps=3)
    b = farm.submit_ok(headers=_h(tokens["bob"]), num_frames=8, num_inference_steps=3)
    assert a["owner"] == "alice" and b["owner"] == "bob"
    url = farm.url + "/v1/jobs/"
    assert requests.get(url + a["id"], headers=_h(tokens["bob"]), timeout=10).status_code == 404
    assert requests.post(url + a["id"] + "/cancel", headers=_h(tokens["bob"]), timeout=10).status_code == 404
    assert requests.get(url + a["id"], headers=_h(tokens["alice"]), timeout=10).status_code == 200
    mine = requests.get(farm.url + "/v1/jobs", headers=_h(tokens["bob"]), timeout=10).json()["jobs"]
    assert {j["owner"] for j in mine} == {"bob"}
    every = requests.get(farm.url + "/v1/jobs", headers=_h(tokens["ops"]), timeout=10).json()["jobs"]
    assert {a["id"], b["id"]} <= {j["id"] for j in every}
    # the same Idempotency-Key from two callers makes two jobs
    k = {"Idempotency-Key": "same"}
    ja = farm.submit_ok(headers={**_h(tokens["alice"]), **k}, num_frames=8, num_inference_steps=2)
    jb = farm.submit_ok(headers={**_h(tokens["bob"]), **k}, num_frames=8, num_inference_steps=2)
    assert ja["id"] != jb["id"]


def test_the_web_page_signs_in_with_a_cookie(secured):
    farm, tokens, _, _ = secured
    s = requests.Session()
    bad = s.post(farm.url + "/v1/login", json={"token": "i2v_nope"}, timeout=10)
    assert bad.status_code == 401
    ok = s.post(farm.url + "/v1/login", json={"token": tokens["alice"]}, timeout=10)
    assert ok.status_code == 200 and ok.json()["name"] == "alice"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    job = s.post(farm.url + "/v1/jobs", json={"prompt": "waves", "num_frames": 8, "num_inference_steps": 2,
                                              "image": base64.b64encode(png_bytes()).decode()},
                 timeout=30)
    assert job.status_code == 202
    job_url = f"{farm.url}/v1/jobs/{job.json()['id']}"
    deadline = time.monotonic() + 60
    while s.get(job_url, timeout=10).json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    video = s.get(job_url + "/video", timeout=10)  # what a <video> element fetches: the cookie, no header
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert requests.get(job_url + "/video", timeout=10).status_code == 401
    s.post(farm.url + "/v1/logout", timeout=10)
    assert s.get(farm.url + "/v1/jobs", timeout=10).status_code == 401


def test_rate_and_concurrency_limits_answer_429(secured):
    farm, tokens, _, _ = secured
    codes = [farm.submit(headers=_h(tokens["slow"]), num_frames=8, num_inference_steps=2).status_code
             for _ in range(3)]
    assert codes[:2] == [202, 202]
    r = farm.submit(headers=_h(tokens["slow"]), num_frames=8, num_inference_steps=2)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1

    first = farm.submit(headers=_h(tokens["single"]), **LONG)
    assert first.status_code == 202
    second = farm.submit(headers=_h(tokens["single"]), **LONG)
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_active_jobs"
    assert "Retry-After" in second.headers
    requests.post(farm.url + f"/v1/jobs/{first.json()['id']}/cancel", headers=_h(tokens["single"]), timeout=10)
    assert farm.submit(headers=_h(tokens["single"]), num_frames=8, num_inference_steps=2).status_code == 202


def test_no_token_in_storage_records_or_revoked_tokens_work(secured):
    farm, tokens, store, tmp = secured
    job = farm.submit_ok(headers=_h(tokens["alice"]), num_frames=8, num_inference_steps=2)
    r = requests.get(farm.url + f"/v1/jobs/{job['id']}", headers=_h(tokens["alice"]), timeout=10)
    assert r.status_code == 200
    deadline = time.monotonic() + 60
    while r.json()["status"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)
        r = requests.get(farm.url + f"/v1/jobs/{job['id']}", headers=_h(tokens["alice"]), timeout=10)
    done = r.json()
    root = farm.settings.storage_url[len("file://"):]
    record = open(f"{root}/{done['prefix']}params.json").read()
    db = (tmp / "jobs.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp.glob("jobs.sqlite3-*"))
    metrics = requests.get(farm.url + "/metrics", timeout=10).text
    for token in tokens.values():
        assert token not in record and token.encode() not in db and token not in metrics
    assert json.loads(record)["params"]["prompt"] == "waves rolling in"

    store.revoke("bob")
    assert requests.get(farm.url + "/v1/jobs", headers=_h(tokens["bob"]), timeout=10).status_code == 401
