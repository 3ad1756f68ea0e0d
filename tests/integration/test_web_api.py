"""What the web page uses, through HTTP on the shared simulated cluster (`sim` model): the page and
its files, `GET /v1/info`, and `POST /v1/estimate` agreeing with what `POST /v1/jobs` then does."""

from __future__ import annotations

import pytest

from tests.integration.conftest import deploy, png_bytes, undeploy

WORKERS = {"12gb": {"min_replicas": 1, "max_replicas": 1}}  # one small class: big jobs fit nowhere


@pytest.fixture(scope="module")
def farm(ray_cluster, tmp_path_factory):
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("farm-web"), workers=WORKERS)
    yield farm
    undeploy()


def test_the_page_and_its_files_are_served_by_the_farm(farm):
    page = farm.session.get(farm.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<h2 id=\"input-title\">Input</h2>" in page.text and 'src="ui/app.js"' in page.text
    for name, ctype in [("app.js", "text/javascript"), ("style.css", "text/css"), ("index.html", "text/html")]:
        r = farm.session.get(f"{farm.url}/ui/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), name
    for bad in ["/ui/nothing.js", "/ui/..%2Fapi.py", "/ui/%2e%2e%2fconfig.py"]:
        r = farm.session.get(farm.url + bad, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad
    paths = farm.session.get(farm.url + "/openapi.json", timeout=30).json()["paths"]
    assert "/v1/estimate" in paths and "/v1/info" in paths and "/ui/{name}" not in paths and "/" not in paths


def test_info_tells_the_page_the_model_presets_ranges_and_classes(farm):
    info = farm.session.get(farm.url + "/v1/info", timeout=30).json()
    assert info["model"] == "sim" and "placeholder" in info["note"]
    assert info["presets"]["fast"]["num_frames"] == 8
    assert info["fields"]["num_inference_steps"]["maximum"] == 200
    assert "Camera slowly zooming in on the face" in info["prompt_examples"]
    assert [c["name"] for c in info["classes"]] == ["12gb"]


def test_estimate_matches_what_submission_places_and_estimates(farm):
    fields = {"preset": "fast", "num_inference_steps": 2}
    est = farm.session.post(farm.url + "/v1/estimate", json={**fields, "width": 160, "height": 90}, timeout=30)
    assert est.status_code == 200, est.text
    est = est.json()
    assert est["fits"] and est["vram_class"] == "12gb" and (est["width"], est["height"]) == (680, 384)
    job = farm.submit_ok(image=png_bytes(160, 90), **fields)
    assert job["vram_class"] == est["vram_class"]
    assert job["estimate"] == {"vram_bytes": est["vram_bytes"], "seconds": est["seconds"]}
    assert farm.wait(job["id"])["status"] == "succeeded"


def test_estimate_of_a_job_no_class_holds_says_why_and_queues_nothing(farm):
    before = farm.cluster()["jobs"]
    big = {"resolution": "1024p", "num_frames": 16}
    r = farm.session.post(farm.url + "/v1/estimate", json={**big, "width": 96, "height": 80}, timeout=30)
    assert r.status_code == 200
    est = r.json()
    assert est["fits"] is False and est["vram_class"] is None and "12gb (12.0 GiB)" in est["reason"]
    refused = farm.submit(image=png_bytes(96, 80), **big)  # and submission refuses it the same way
    assert refused.status_code == 422 and refused.json()["error"]["message"] == est["reason"]
    assert farm.cluster()["jobs"] == before


@pytest.mark.parametrize("body, status, code, field", [
    ({"num_frames": 99}, 422, "invalid_request", "num_frames"),
    ({"width": -5}, 422, "invalid_request", "width"),
    ({"colour": "red"}, 422, "invalid_request", "colour"),
    ("not json", 400, "invalid_json", None),
    ([1, 2], 400, "invalid_json", None),
])
def test_estimate_errors_use_the_api_error_format(farm, body, status, code, field):
    if isinstance(body, str):
        r = farm.session.post(farm.url + "/v1/estimate", data=body, headers={"Content-Type": "application/json"},
                              timeout=30)
    else:
        r = farm.session.post(farm.url + "/v1/estimate", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["field"] == field
