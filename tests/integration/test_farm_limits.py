"""Jobs no class can hold, full backlogs, and out-of-memory retries, through HTTP (`sim` model)."""

from __future__ import annotations

import re

import pytest

from pipeline.cost_model import GPUS, Workload, estimate
from tests.integration.conftest import deploy, undeploy

LONG_512 = {"resolution": "512p", "num_frames": 16, "num_inference_steps": 100}


@pytest.fixture(scope="module")
def small_farm(ray_cluster, tmp_path_factory):
    """Only 12gb workers, a backlog of 2 per class (one deployment for the tests below)."""
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("small-farm"),
                  workers={"12gb": {"min_replicas": 1, "max_replicas": 1}}, backlog_limit=2)
    yield farm
    undeploy()


def test_job_no_class_can_hold_is_refused_at_once(small_farm):
    farm = small_farm
    before = farm.cluster()["jobs"]
    r = farm.submit(resolution="1024p", num_frames=16)  # ~16.6 GiB > the only class, 12gb
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "no_class_fits"
    assert re.search(r"16\.[0-9] GiB", err["message"]) and "12gb (12.0 GiB)" in err["message"]
    assert farm.cluster()["jobs"] == before  # nothing queued, nothing stored


def test_full_backlog_answers_429_with_retry_after(small_farm):
    farm = small_farm
    first = farm.submit_ok(**LONG_512)
    farm.wait(first["id"], statuses=("running",))
    queued = [farm.submit_ok(**LONG_512) for _ in range(2)]
    r = farm.submit(**LONG_512)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "backlogged"
    # two queued jobs of the cost model's seconds each (x sim_time_scale 0.01) on one 12gb worker
    one = estimate(Workload(512, 512, 16, 100), GPUS["rtx3060-12gb"]).seconds * 0.01
    assert int(2 * one) <= int(r.headers["Retry-After"]) <= int(2 * one) + 2, (one, r.headers["Retry-After"])
    for job in [first, *queued]:
        assert farm.cancel(job["id"]).status_code == 200
    assert farm.submit(**LONG_512).status_code == 202  # room again


def test_out_of_memory_retries_on_the_next_larger_class_then_fails(ray_cluster, tmp_path):
    # The sim model's true peak is 1.5x the estimate: a cost model that underestimates.
    undeploy()  # the small farm of the tests above, if deployed: this one starts from none, as they did
    farm = deploy(ray_cluster, tmp_path, sim_vram_factor=1.5, spill_rule="idle",  # first try: its home class
                  workers={"12gb": {"min_replicas": 1, "max_replicas": 1},
                           "24gb": {"min_replicas": 1, "max_replicas": 1}})
    try:
        # ~10.9 GiB estimated -> 12gb; really 16.4 GiB: OOM there, fits 24gb
        job = farm.submit_ok(resolution="512p", num_frames=32, num_inference_steps=10)
        assert job["vram_class"] == "12gb"
        done = farm.wait(job["id"])
        assert done["status"] == "succeeded", done
        assert done["vram_class"] == "24gb" and farm.node_class(done["node"]) == "24gb"
        assert [(f["code"], f["vram_class"]) for f in done["failures"]] == [("out_of_memory", "12gb")]
        assert done["attempts"] == 2

        # ~22.3 GiB estimated -> 24gb; really 33.5 GiB: no larger class -> failed, with the reason
        big = farm.submit_ok(resolution="1024p", num_frames=24, num_inference_steps=10)
        assert big["vram_class"] == "24gb"
        failed = farm.wait(big["id"])
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "out_of_memory"
        assert "24gb" in failed["error"]["message"]
        assert failed["result"] is None
    finally:
        undeploy()
