"""Result reuse (issue 18) on the shared simulated cluster, as callers meet it: over HTTP with
tokens (own jobs only, an admin anyone's), `reuse: false`, no explicit seed, the metrics, a result
deleted by `gc`, and a batch manifest run twice (the second run's rows are reused)."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest

from serving.batch.runner import run_batch
from serving.client import FarmClient
from serving.retention import collect_garbage
from serving.storage import LocalStorage
from tests.integration.conftest import deploy_secured, png_bytes, undeploy

WORKERS = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
QUICK = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 2}
TOKENS = {"alice": {}, "bob": {}, "root": {"admin": True}}


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory):
    farm, tokens, _ = deploy_secured(ray_cluster, tmp_path_factory.mktemp("reuse"), TOKENS, workers=WORKERS)
    yield farm, tokens
    undeploy()


def _as(farm, token: str, **fields):
    return farm.submit(headers={"Authorization": f"Bearer {token}"}, **{**QUICK, **fields})


def _get(farm, token: str, path: str):
    r = farm.session.get(farm.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _done(farm, token: str, job_id: str, timeout: float = 90) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while True:
        job = _get(farm, token, f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _metric(farm, name: str) -> float:
    text = farm.session.get(farm.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_an_identical_request_answers_at_once_with_the_stored_result(secured):
    farm, tok = secured
    reused_before = _metric(farm, "i2v_jobs_reused_total")
    saved_before = _metric(farm, "i2v_reuse_gpu_seconds_saved_total")
    first = _as(farm, tok["alice"], seed=5)
    assert first.status_code == 202, first.text
    first = _done(farm, tok["alice"], first.json()["id"])
    assert first["status"] == "succeeded" and first.get("reused_from") is None

    again = _as(farm, tok["alice"], seed=5, priority="low")  # priority does not change the video
    assert again.status_code == 202, again.text
    job = again.json()
    assert job["status"] == "succeeded" and job["id"] != first["id"]  # at once, a new job
    assert job["reused_from"] == first["id"]
    assert job["result"]["key"] == first["result"]["key"] and job["result"]["url"] == f"/v1/jobs/{job['id']}/video"
    assert job["params"]["priority"] == "low" and job["params"]["seed"] == 5
    assert _get(farm, tok["alice"], f"/v1/jobs/{job['id']}/video").content == \
        _get(farm, tok["alice"], f"/v1/jobs/{first['id']}/video").content
    assert _get(farm, tok["alice"], f"/v1/jobs/{job['id']}").json()["reused_from"] == first["id"]
    assert _metric(farm, "i2v_jobs_reused_total") == reused_before + 1
    assert _metric(farm, "i2v_reuse_gpu_seconds_saved_total") - saved_before == pytest.approx(
        first["timings"]["total"], abs=1e-3)

    # a reuse of a reuse points at the job that rendered
    third = _as(farm, tok["alice"], seed=5).json()
    assert third["status"] == "succeeded" and third["reused_from"] == first["id"]

    # reuse: false always renders
    fresh = _as(farm, tok["alice"], seed=5, reuse=False)
    assert fresh.status_code == 202 and fresh.json()["status"] == "queued", fresh.text
    fresh = _done(farm, tok["alice"], fresh.json()["id"])
    assert fresh["status"] == "succeeded" and fresh.get("reused_from") is None

    # anything that changes the video renders: another seed, fps, image; no explicit seed never reuses
    for fields in ({"seed": 6}, {"seed": 5, "fps": 12}, {"seed": 5, "image": png_bytes(seed=9)}, {}, {}):
        other = _as(farm, tok["alice"], **fields)
        assert other.status_code == 202 and other.json()["status"] == "queued", (fields, other.text)
        assert _done(farm, tok["alice"], other.json()["id"])["status"] == "succeeded"

    bad = _as(farm, tok["alice"], seed=5, reuse="perhaps")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "reuse"


def test_only_the_callers_own_jobs_are_reused_and_an_admin_reuses_anyones(secured):
    farm, tok = secured
    mine = _done(farm, tok["alice"], _as(farm, tok["alice"], seed=21).json()["id"])
    assert mine["status"] == "succeeded"
    other = _as(farm, tok["bob"], seed=21).json()
    assert other["status"] == "queued" and other.get("reused_from") is None  # bob's own render
    other = _done(farm, tok["bob"], other["id"])
    admin = _as(farm, tok["root"], seed=21).json()
    assert admin["status"] == "succeeded" and admin["reused_from"] in (mine["id"], other["id"])
    # bob's reused job never shows alice's job to bob, and alice's job stays hers
    r = farm.session.get(f"{farm.url}/v1/jobs/{mine['id']}", headers={"Authorization": f"Bearer {tok['bob']}"})
    assert r.status_code == 404


def test_a_batch_run_twice_reuses_every_row_the_second_time(secured, tmp_path):
    farm, tok = secured
    work = tmp_path / "work"
    (work / "img").mkdir(parents=True)
    for name, seed in (("a", 31), ("b", 32)):
        (work / "img" / f"{name}.png").write_bytes(png_bytes(96, 80, seed=seed))
    rows = [{"image": "img/a.png", "prompt": "a boat", "seed": 1, **QUICK},
            {"image": "img/b.png", "prompt": "a kite", "seed": 2, **QUICK}]
    manifest = work / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    storage = LocalStorage(farm.settings.storage_url[len("file://"):])
    client = FarmClient(farm.url, timeout=30, token=tok["alice"])

    def run(prefix: str) -> list[dict]:
        out = io.StringIO()
        code = run_batch(manifest, client=client, storage=storage, root=work, out=out, prefix=prefix, poll_s=0.2,
                         row_timeout=60)
        assert code == 0, out.getvalue()
        lines = storage.get_bytes(prefix + "summary.jsonl").decode().splitlines()
        return [_get(farm, tok["alice"], f"/v1/jobs/{json.loads(line)['job_id']}").json() for line in lines]

    first = run("batches/reuse-1/")
    assert [j["status"] for j in first] == ["succeeded"] * 2 and not any(j.get("reused_from") for j in first)
    second = run("batches/reuse-2/")  # another batch of the same rows (new Idempotency-Keys)
    assert [j["status"] for j in second] == ["succeeded"] * 2
    assert [j["reused_from"] for j in second] == [j["id"] for j in first]
    assert [j["result"]["key"] for j in second] == [j["result"]["key"] for j in first]


def test_a_result_deleted_by_gc_is_not_reused(secured):
    """Last in this module: gc deletes every result older than 0 s."""
    farm, tok = secured
    first = _done(farm, tok["alice"], _as(farm, tok["alice"], seed=41).json()["id"])
    assert _as(farm, tok["alice"], seed=41).json()["reused_from"] == first["id"]
    report = collect_garbage(LocalStorage(farm.settings.storage_url[len("file://"):]), timedelta(seconds=0))
    assert first["prefix"] in report.prefixes
    again = _as(farm, tok["alice"], seed=41).json()
    assert again["status"] == "queued" and again.get("reused_from") is None  # rendered anew
    again = _done(farm, tok["alice"], again["id"])
    assert again["status"] == "succeeded"
    assert _as(farm, tok["alice"], seed=41).json()["reused_from"] == again["id"]
