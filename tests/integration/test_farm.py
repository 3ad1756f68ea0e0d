"""The farm through HTTP on the shared simulated cluster (12gb:2, 24gb:1), `sim` model.

Placement by the cost model's estimate, spill-up (never down), cancellation, a killed worker,
a farm restart, and the API's answers as clients meet them.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import ray
import requests

from tests.integration.conftest import deploy, png_bytes, undeploy

WORKERS = {"12gb": {"min_replicas": 2, "max_replicas": 2}, "24gb": {"min_replicas": 1, "max_replicas": 1}}
GiB = 2**30
# sim seconds = cost-model seconds on the class GPU x 0.01: 512p x 16 frames x 100 steps takes
# ~4.2 s on a 12gb (RTX 3060) worker and ~0.7 s on a 24gb (RTX 4090) one.
LONG_512 = {"resolution": "512p", "num_frames": 16, "num_inference_steps": 100}


def _deploy(ray_cluster, path):
    # `idle` spill rule: these tests pin where a job runs (its home class unless that is full);
    # the default earliest-finish rule is tested in test_fair_share.py
    return deploy(ray_cluster, path, workers=WORKERS, spill_rule="idle")


@pytest.fixture(scope="module")
def farm_dir(tmp_path_factory):
    """The farm's job store and storage, for the restart test to deploy it again on."""
    return tmp_path_factory.mktemp("farm")


@pytest.fixture(scope="module")
def farm(ray_cluster, farm_dir):
    farm = _deploy(ray_cluster, farm_dir)
    yield farm
    undeploy()


def _idle(farm, timeout=120):
    """Wait until no job runs or waits and every class runs all its replicas.

    Tests start from an idle farm at full strength: a test that killed a replica leaves Serve
    replacing it, which takes a while on a loaded 2-core machine.
    """
    deadline = time.monotonic() + timeout
    wanted = {name: w["max_replicas"] for name, w in WORKERS.items()}
    while True:
        info = farm.cluster()
        running = {c["name"]: c["replicas"]["running"] for c in info["classes"]}
        if info["running"] == 0 and info["queue_depth"] == 0 and running == wanted:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.2)


@pytest.mark.parametrize(
    "fields, home",
    [
        ({"resolution": "512p", "num_frames": 16}, "12gb"),
        ({"resolution": "512p", "num_frames": 32}, "12gb"),   # ~9.0 GiB: frames alone don't push it up
        ({"resolution": "768p", "num_frames": 16}, "12gb"),   # ~9.5 GiB
        ({"resolution": "768p", "num_frames": 32}, "24gb"),   # ~13.7 GiB: same resolution, more frames
        ({"resolution": "1024p", "num_frames": 16}, "24gb"),  # ~12.8 GiB
    ],
)
def test_job_runs_on_the_smallest_class_its_estimate_fits(farm, fields, home):
    _idle(farm)
    job = farm.submit_ok(num_inference_steps=10, **fields)
    assert job["status"] == "queued" and job["vram_class"] == home
    done = farm.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["vram_class"] == home and not done["spilled"]
    assert farm.node_class(done["node"]) == home
    memory = {"12gb": 12 * GiB, "24gb": 24 * GiB}
    assert done["estimate"]["vram_bytes"] <= memory[home]
    if home == "24gb":
        assert done["estimate"]["vram_bytes"] > memory["12gb"]
    assert done["peak_vram_bytes"] == done["estimate"]["vram_bytes"]  # sim: the estimate x 1.0
    r = farm.session.get(farm.url + done["result"]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.content[4:8] == b"ftyp" and len(r.content) == done["result"]["bytes"]


def test_spills_up_when_its_class_is_saturated_and_a_larger_one_idle(farm):
    _idle(farm)
    jobs = [farm.submit_ok(**LONG_512) for _ in range(3)]
    done = [farm.wait(j["id"]) for j in jobs]
    assert all(d["status"] == "succeeded" for d in done)
    assert all(d["home_class"] == "12gb" for d in done)
    spilled = [d for d in done if d["spilled"]]
    assert len(spilled) == 1, [(d["vram_class"], d["spilled"]) for d in done]
    assert spilled[0]["vram_class"] == "24gb" and farm.node_class(spilled[0]["node"]) == "24gb"
    on_12 = [d for d in done if not d["spilled"]]
    assert {farm.node_class(d["node"]) for d in on_12} == {"12gb"}
    assert len({d["node"] for d in on_12}) == 2  # both 12gb GPUs used


def test_never_spills_down(farm):
    _idle(farm)
    jobs = [farm.submit_ok(resolution="1024p", num_frames=16, num_inference_steps=40) for _ in range(3)]
    # While 24gb jobs wait, the idle 12gb workers must not take them.
    farm.wait(jobs[0]["id"], statuses=("running",))
    info = farm.cluster()
    by_name = {c["name"]: c for c in info["classes"]}
    assert by_name["24gb"]["queued"] == 2 and by_name["12gb"]["busy"] == 0
    done = [farm.wait(j["id"]) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 3
    assert {farm.node_class(d["node"]) for d in done} == {"24gb"}
    # they ran one after another on the single 24gb GPU
    spans = sorted((d["started_at"], d["finished_at"]) for d in done)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_cancel_queued_and_running_jobs(farm):
    _idle(farm)
    running = [farm.submit_ok(**LONG_512) for _ in range(3)]  # 2 x 12gb + 1 spilled to 24gb
    queued = farm.submit_ok(**LONG_512)
    target = farm.wait(running[0]["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 1)
    assert farm.job(queued["id"])["status"] == "queued"

    r = farm.cancel(queued["id"])
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = farm.cancel(target["id"])
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    step_at_cancel = farm.job(target["id"])["progress"]["step"]

    r = farm.cancel(queued["id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_cancelable"
    for other in running[1:]:
        assert farm.wait(other["id"])["status"] == "succeeded"
    time.sleep(1.0)
    final = farm.job(target["id"])
    assert final["status"] == "canceled" and final["result"] is None
    assert final["progress"]["step"] <= step_at_cancel + 1 < final["progress"]["total"]
    never = farm.job(queued["id"])
    assert never["status"] == "canceled" and never["node"] is None and never["result"] is None
    # the canceled job's GPU is free again
    after = farm.submit_ok(resolution="512p", num_frames=8, num_inference_steps=5)
    assert farm.wait(after["id"])["status"] == "succeeded"


def test_killed_worker_mid_job_does_not_lose_the_job(farm):
    _idle(farm)
    job = farm.submit_ok(**LONG_512)
    running = farm.wait(job["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 2)
    assert "Worker_12gb" in running["replica"]
    ray.kill(ray.get_actor(running["replica"], namespace="serve"), no_restart=True)

    done = farm.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert [f["code"] for f in done["failures"]] == ["worker_died"]
    assert done["failures"][0]["node"] == running["node"]
    assert done["result"]["frames"] == 16
    _replaced(running["replica"])
    _idle(farm)  # Serve has replaced the killed replica before the next test


def _replaced(killed: str, deployment: str = "Worker_12gb", timeout: float = 120) -> None:
    """Wait until Serve has replaced the killed replica and the replacement runs.

    Serve's controller notices the death only at its next health check of that replica (seconds
    after the job manager saw it): until then it still counts the dead replica as running, and
    `_idle` alone could pass on that stale count and the next test see one replica fewer.
    """
    from ray import serve

    from serving.app import APP_NAME

    wanted = WORKERS[deployment.removeprefix("Worker_")]["max_replicas"]
    deadline = time.monotonic() + timeout
    while True:
        others = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if f"#{deployment}#" in a["name"] and a["name"] != killed]
        dep = serve.status().applications[APP_NAME].deployments[deployment]
        states = {str(getattr(k, "value", k)): n for k, n in dep.replica_states.items() if n}
        if len(others) == wanted and states == {"RUNNING": wanted}:
            return
        assert time.monotonic() < deadline, f"Serve did not replace the killed replica: {states}"
        time.sleep(0.2)


def test_api_answers(farm):
    _idle(farm)
    url = farm.url
    # validation errors name the field; nothing is queued for them
    before = farm.cluster()["jobs"]
    r = farm.submit(num_frames=64)
    assert r.status_code == 422 and r.json()["error"]["field"] == "num_frames"
    r = farm.submit(colour="red")
    assert r.status_code == 422 and r.json()["error"]["field"] == "colour"
    r = farm.session.post(url + "/v1/jobs", json={"prompt": "x", "image": "%%%not base64"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "image"
    r = farm.submit(image=b"GIF89a" + b"\0" * 100)
    assert r.status_code == 415, r.text
    r = farm.submit(image=png_bytes()[:60])
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_image"
    huge = png_bytes() + b"\0" * (farm.settings.max_image_bytes)
    r = farm.submit(image=huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = farm.session.post(url + "/v1/jobs", data={"prompt": "x"}, files={"image": ("big.png", huge, "image/png")})
    assert r.status_code == 413 and r.json()["error"]["field"] == "image"
    r = farm.session.post(url + "/v1/jobs", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert farm.cluster()["jobs"] == before
    r = farm.session.get(url + "/v1/jobs/0123456789abcdef")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

    for quick in [farm.submit_ok(num_frames=8, num_inference_steps=2) for _ in range(2)]:
        farm.wait(quick["id"])

    # multipart, as a browser form sends it, with an Idempotency-Key
    form = {"prompt": "clouds drifting", "preset": "fast", "num_inference_steps": "4", "priority": "high"}
    files = {"image": ("in.png", png_bytes(120, 90), "image/png")}
    r = farm.session.post(url + "/v1/jobs", data=form, files=files, headers={"Idempotency-Key": "k-1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["params"]["num_frames"] == 8 and job["params"]["priority"] == "high"
    assert job["params"]["seed"] is not None  # fixed at submission, so a retry renders the same video
    again = farm.session.post(url + "/v1/jobs", data=form, files=files, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]

    # progress as server-sent events, ending with the final status
    events = []
    with farm.session.get(url + job["links"]["events"], stream=True, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    statuses = [d["status"] for n, d in events if n == "status"]
    assert statuses[-1] == "succeeded" and statuses[0] in ("queued", "running")
    steps = [d["step"] for n, d in events if n == "progress" and d]
    assert steps == sorted(steps) and steps[-1] == 4

    # the video, the input and params.json are stored under the job's prefix
    done = farm.job(job["id"])
    root = farm.settings.storage_url[len("file://"):]
    assert re.fullmatch(r"jobs/\d{4}/\d\d/\d\d/" + job["id"] + "/", done["prefix"])
    record = json.loads(open(f"{root}/{done['prefix']}params.json").read())
    assert record["params"]["seed"] == job["params"]["seed"] and record["vram_class"] == done["vram_class"]
    assert record["node"] == done["node"] and record["peak_vram_bytes"] == done["peak_vram_bytes"]
    assert open(f"{root}/{done['prefix']}input.png", "rb").read() == png_bytes(120, 90)
    poster = farm.session.get(url + done["result"]["poster_url"])
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    assert poster.content[:2] == b"\xff\xd8"
    # local files are streamed with Range support (browsers seek in videos this way)
    part = farm.session.get(url + done["result"]["url"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100

    # list: filter and page
    page1 = farm.session.get(url + "/v1/jobs", params={"status": "succeeded", "limit": 2}).json()
    assert len(page1["jobs"]) == 2 and all(j["status"] == "succeeded" for j in page1["jobs"])
    page2 = farm.session.get(url + "/v1/jobs", params={"status": "succeeded", "limit": 2,
                                                       "cursor": page1["next_cursor"]}).json()
    ids1, ids2 = {j["id"] for j in page1["jobs"]}, {j["id"] for j in page2["jobs"]}
    assert ids2 and not ids1 & ids2
    assert page1["jobs"][0]["id"] == job["id"]  # newest first
    r = farm.session.get(url + "/v1/jobs", params={"status": "bogus"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "status"

    # the cluster view and the OpenAPI document
    info = farm.cluster()
    assert [c["name"] for c in info["classes"]] == ["12gb", "24gb"]
    assert {c["name"]: c["replicas"]["running"] for c in info["classes"]} == {"12gb": 2, "24gb": 1}
    gpu_nodes = [n for n in info["nodes"] if n["gpus"] and n["alive"]]
    assert sorted(n["vram_classes"][0] for n in gpu_nodes) == ["12gb", "12gb", "24gb"]
    assert all(n["address"] == "127.0.0.1" for n in info["nodes"])
    spec = farm.session.get(url + "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/video",
            "/v1/jobs/{job_id}/events", "/v1/cluster", "/healthz", "/readyz"} <= set(spec["paths"])
    assert farm.session.get(url + "/docs").status_code == 200
    assert farm.session.get(url + "/healthz").json() == {"status": "ok"}


def test_video_of_an_unfinished_job_is_409(farm):
    _idle(farm)
    job = farm.submit_ok(**LONG_512)
    r = farm.session.get(farm.url + job["links"]["video"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
    farm.cancel(job["id"])


def test_farm_restart_resumes_queued_and_running_jobs(farm, ray_cluster, farm_dir):
    # the module's farm (the last test of the module: the farm it leaves is the redeployed one)
    _idle(farm)
    jobs = [farm.submit_ok(resolution="512p", num_frames=16, num_inference_steps=60) for _ in range(6)]
    farm.wait(jobs[0]["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 1)
    undeploy()  # the farm goes away with jobs running and queued
    with pytest.raises(requests.RequestException):
        requests.get(farm.url + "/healthz", timeout=2).raise_for_status()

    farm = _deploy(ray_cluster, farm_dir)  # same settings, job store and storage
    done = [farm.wait(j["id"], timeout=120) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 6, [(d["status"], d["error"], d["failures"], d["attempts"]) for d in done]
    requeued = [d for d in done if d.get("note") == "requeued after a farm restart"]
    assert requeued, "a job running at the restart is run again"
