"""Faults on the shared simulated cluster (12gb:2, 24gb:1): none loses an accepted job or a
finished result; each ends `succeeded` after a retry, or `failed` with a reason a person reads.

Already covered elsewhere: a worker replica killed mid-job and a farm restart (`sim`, test_farm.py),
out of memory retried then failed (test_farm_limits.py), the S3 store down mid-run
(test_storage_s3.py). Here: a whole GPU node removed mid-job, the job manager's process killed
mid-run, a job that keeps killing its worker, and the worker kill and farm restart again with the
real model code (`tiny-random`, `slow`: `make test-all`), checking the MP4 each leaves in storage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray

from serving import harness
from tests.helpers import ffprobe
from tests.integration.conftest import deploy, png_bytes, undeploy

WORKERS = {"12gb": {"min_replicas": 2, "max_replicas": 2}, "24gb": {"min_replicas": 1, "max_replicas": 1}}
ONLY_12GB = {"12gb": {"min_replicas": 2, "max_replicas": 2}}
# sim: 512p x 16 frames x 100 steps takes ~4.2 s on a 12gb (RTX 3060) worker
LONG_512 = {"resolution": "512p", "num_frames": 16, "num_inference_steps": 100}
# tiny-random on a CPU: the smallest render the farm takes (512p, 8 frames), a few steps of seconds each
TINY_JOB = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 3, "seed": 7}


def _kill_replica(replica: str) -> None:
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)


def _stored_video(farm, job: dict) -> dict:
    """The finished job's MP4 and parameter record in storage, checked; returns ffprobe's facts."""
    root = Path(farm.settings.storage_url[len("file://"):])
    video = root / job["result"]["key"]
    assert video.is_file() and video.stat().st_size == job["result"]["bytes"], job["result"]
    stream = ffprobe(video)
    assert stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p", stream
    assert int(stream["nb_read_frames"]) == job["result"]["frames"] == job["params"]["num_frames"], stream
    record = json.loads((root / job["prefix"] / "params.json").read_text())
    assert record["params"]["seed"] == job["params"]["seed"] and record["node"] == job["node"]
    assert (root / job["result"]["input_key"]).read_bytes() == png_bytes()
    return stream


def _wait_for_replicas(farm, wanted: dict[str, int], timeout: float = 120) -> None:
    harness.wait_ready(farm.url, wanted, timeout, poll=0.5)  # FarmNotReady says what it saw


# --- sim -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_farm(ray_cluster, tmp_path_factory):
    """One `sim` farm for the sim tests (each leaves it idle at full strength for the next)."""
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("faults"), workers=WORKERS, spill_rule="idle")
    yield farm
    undeploy()


def test_a_gpu_node_removed_mid_job_loses_no_job(ray_cluster, sim_farm):
    """The machine running a job goes away (its raylet and every process on it): the job is run
    again on another GPU and succeeds, with the lost attempt on record. The shared cluster gets a
    new 12gb node afterwards, and the farm its full replica count, for the tests that follow."""
    sim, _ = ray_cluster
    farm = sim_farm  # `idle` spill rule: the job runs on a 12gb node
    removed = None
    try:
        job = farm.submit_ok(**LONG_512)
        running = farm.wait(job["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 2)
        node = running["node"]
        assert farm.node_class(node) == "12gb"
        sim.remove_node(node)
        removed = node
        assert node not in sim.nodes_by_class()["12gb"]

        done = farm.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        assert [(f["code"], f["node"]) for f in done["failures"]] == [("worker_died", node)], done["failures"]
        assert "died" in done["failures"][0]["message"]
        assert done["node"] != node and farm.node_class(done["node"]) in ("12gb", "24gb")
        _stored_video(farm, done)
        assert farm.job(job["id"])["result"] == done["result"]  # and it stays so

        # the farm keeps working on what is left
        again = farm.submit_ok(resolution="512p", num_frames=8, num_inference_steps=5)
        assert farm.wait(again["id"], timeout=60)["status"] == "succeeded"
        lost = [n for n in farm.cluster()["nodes"] if n["id"] == node]
        assert lost and not lost[0]["alive"]
    finally:
        if removed is not None:
            sim.add_class_node("12gb")
            _wait_for_replicas(farm, {"12gb": 2, "24gb": 1})
    assert {name: len(ids) for name, ids in sim.nodes_by_class().items()} == {"12gb": 2, "24gb": 1}


def test_the_job_manager_process_killed_mid_run_loses_no_job(sim_farm):
    """The process holding the scheduler dies without warning (not a clean restart): Serve starts
    a new one, which reads the job store back; every accepted job still ends `succeeded`, each
    once in the store, each with its video."""
    farm = sim_farm
    _wait_for_replicas(farm, {"12gb": 2, "24gb": 1})
    earlier = {j["id"] for j in farm.client.call("GET", "/v1/jobs?limit=500")["jobs"]}
    jobs = [farm.submit_ok(resolution="512p", num_frames=16, num_inference_steps=60) for _ in range(5)]
    farm.wait(jobs[0]["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 1)
    from ray.util import list_named_actors

    managers = [a["name"] for a in list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "#JobManager#" in a["name"]]
    assert len(managers) == 1, managers
    _kill_replica(managers[0])

    deadline = time.monotonic() + 60  # the API answers 5xx/timeouts until the new one is up
    while True:
        try:
            if farm.session.get(farm.url + "/readyz", timeout=10).status_code == 200:
                break
        except Exception:  # noqa: BLE001
            pass
        assert time.monotonic() < deadline, "the job manager did not come back"
        time.sleep(0.5)
    done = [farm.wait(j["id"], timeout=120) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 5, done
    assert any(d.get("note") == "requeued after a farm restart" for d in done), done
    listed = [j["id"] for j in farm.client.call("GET", "/v1/jobs?limit=500")["jobs"] if j["id"] not in earlier]
    assert sorted(listed) == sorted(j["id"] for j in jobs)  # none lost, none doubled
    for d in done:
        _stored_video(farm, d)


@pytest.mark.slow  # the rule itself: tests/unit/test_manager.py (fake worker); this is the same through Ray
def test_a_job_that_keeps_killing_its_worker_fails_with_the_reason(ray_cluster, tmp_path):
    """A job whose every attempt takes its worker down (a poison input, a driver bug) is not
    retried forever: after `max_attempts` it is `failed`, saying so, with every attempt listed;
    the farm goes on with other work."""
    farm = deploy(ray_cluster, tmp_path, workers=ONLY_12GB, max_attempts=3)
    try:
        job = farm.submit_ok(**LONG_512)
        killed: list[str] = []
        deadline = time.monotonic() + 180
        while True:
            current = farm.job(job["id"])
            if current["status"] in ("succeeded", "failed", "canceled"):
                break
            replica = current.get("replica")
            if (current["status"] == "running" and replica and replica not in killed
                    and current["attempts"] == len(current.get("failures", []))
                    and (current["progress"] or {}).get("step", 0) >= 1):
                _kill_replica(replica)
                killed.append(replica)
            assert time.monotonic() < deadline, current
            time.sleep(0.1)

        assert current["status"] == "failed", current
        assert current["error"]["code"] == "worker_died"
        message = current["error"]["message"]
        assert "died 3 times" in message and "max_attempts 3" in message, message
        assert current["attempts"] == 3 and [f["code"] for f in current["failures"]] == ["worker_died"] * 3
        assert current["result"] is None
        assert 1 <= len(killed) <= 3
        inbox = Path(farm.settings.job_db).parent / "inbox"
        assert not (inbox / job["id"]).exists()  # nothing left waiting for it

        _wait_for_replicas(farm, {"12gb": 2})
        other = farm.submit_ok(resolution="512p", num_frames=8, num_inference_steps=5)
        assert farm.wait(other["id"], timeout=60)["status"] == "succeeded"
    finally:
        undeploy()


# --- tiny-random: the real model code on the CPU -----------------------------------------------
# `slow` (in `make test-all`, not the default run; ~65 s and ~86 s on 2 cores): the same faults
# with `sim` above and in test_farm.py, the JobManager's recovery in tests/unit/test_manager.py,
# and the real model rendering in the farm in tests/e2e/test_farm_up.py and test_preview.py
# cover the default run; these two add the combination, at the price of loading the model twice.


@pytest.mark.slow
def test_tiny_random_worker_killed_mid_job_loses_no_job(ray_cluster, tmp_path, tiny_model):
    farm = deploy(ray_cluster, tmp_path, model="tiny-random", workers=ONLY_12GB)
    try:
        job = farm.submit_ok(**TINY_JOB)
        running = farm.wait(job["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 1,
                            timeout=120)
        _kill_replica(running["replica"])

        done = farm.wait(job["id"], timeout=240)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and [f["code"] for f in done["failures"]] == ["worker_died"]
        assert done["failures"][0]["node"] == running["node"]
        stream = _stored_video(farm, done)
        assert (stream["width"], stream["height"]) == (done["result"]["width"], done["result"]["height"]) \
            == (done["output_size"]["width"], done["output_size"]["height"]) == (560, 464)  # 96x80 in, 512p
        assert done["device"] and "cpu" in str(done["device"]).lower()
    finally:
        undeploy()


@pytest.mark.slow
def test_tiny_random_farm_restart_loses_no_job(ray_cluster, tmp_path, tiny_model):
    workers = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
    farm = deploy(ray_cluster, tmp_path, model="tiny-random", workers=workers)
    jobs = [farm.submit_ok(**TINY_JOB), farm.submit_ok(**{**TINY_JOB, "num_inference_steps": 2, "seed": 8})]
    farm.wait(jobs[0]["id"], statuses=("running",), until=lambda j: j["progress"]["step"] >= 1, timeout=120)
    assert farm.job(jobs[1]["id"])["status"] == "queued"
    undeploy()  # the farm goes away with one job running and one queued

    farm = deploy(ray_cluster, tmp_path, model="tiny-random", workers=workers)  # same job store, storage
    try:
        done = [farm.wait(j["id"], timeout=300) for j in jobs]
        assert [d["status"] for d in done] == ["succeeded"] * 2, done
        assert done[0]["note"] == "requeued after a farm restart" and done[0]["attempts"] == 1
        for d in done:
            _stored_video(farm, d)
        counts = farm.cluster()["jobs"]
        assert counts["succeeded"] == 2 and sum(counts.values()) == 2
    finally:
        undeploy()
