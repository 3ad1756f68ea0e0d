"""Live previews through HTTP on the farm with the real model code (`tiny-random`, CPU): the SSE
`preview` events of a denoising job, `GET /v1/jobs/{id}/preview` while it runs and after, a job
that turns previews off, and the same video either way (previews never touch the result). The
same farm's worker also shows the default CPU threads rule (issue 17; see test_worker_threads.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import PIL.Image
import pytest
import requests

from pipeline.video import ffmpeg_exe
from tests.integration.conftest import deploy, undeploy
from tests.integration.test_worker_threads import _status, _workers

ONE_12GB = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
# tiny-random on a CPU: the smallest render the farm takes (512p, 8 frames), two steps
JOB = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 2, "seed": 7}
TINY_JOB = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 2, "seed": 8, "preview": False}


@pytest.fixture(scope="module")
def farm(ray_cluster, tmp_path_factory, tiny_model):
    # an interval far below a CPU step: a preview after every step
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("preview"), model="tiny-random", workers=ONE_12GB,
                  preview_interval_s=0.01, preview_max_side=64)
    try:
        yield farm
    finally:
        undeploy()


def _events(farm, job_id: str, on_event=None) -> list[tuple[str, dict]]:
    """Every SSE event of a job until the stream ends (the job finished)."""
    out: list[tuple[str, dict]] = []
    with requests.get(f"{farm.url}/v1/jobs/{job_id}/events", stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[len("data: "):])))
                if on_event is not None:
                    on_event(*out[-1])
    return out


def _decoded(farm, job: dict) -> bytes:
    """The job's MP4 from storage, decoded to raw RGB frames."""
    path = Path(farm.settings.storage_url[len("file://"):]) / job["result"]["key"]
    return subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          check=True, capture_output=True, timeout=60).stdout


def test_previews_stream_while_the_job_runs_and_leave_the_video_alone(farm):
    job = farm.submit_ok(**JOB)
    job_id = job["id"]
    assert job["links"]["preview"] == f"/v1/jobs/{job_id}/preview"
    fetched: list[requests.Response] = []

    def on_event(name, data):
        if name == "preview" and not fetched:  # the latest preview, asked for while the job runs
            fetched.append(requests.get(f"{farm.url}/v1/jobs/{job_id}/preview", timeout=30))

    events = _events(farm, job_id, on_event)
    previews = [data for name, data in events if name == "preview"]
    assert previews, [name for name, _ in events]
    first = previews[0]
    assert 1 <= first["step"] <= first["total"] == JOB["num_inference_steps"]
    assert first["frames"] == 8 and first["url"] == f"/v1/jobs/{job_id}/preview"
    assert first["image"].startswith("data:image/jpeg;base64,")
    strip = PIL.Image.open(io.BytesIO(base64.b64decode(first["image"].partition(",")[2])))
    # 560x464 output -> 70x58 latents -> frames of 64x53, 8 of them side by side
    assert strip.format == "JPEG" and strip.size == (8 * 64, 53)
    assert len(json.dumps(first)) < 64 * 1024  # small events
    assert [p["seq"] for p in previews] == sorted({p["seq"] for p in previews})  # each preview once, in order

    r = fetched[0]
    if r.status_code == 200:  # still running
        assert r.headers["content-type"] == "image/jpeg" and r.headers["cache-control"] == "no-store"
        assert int(r.headers["x-preview-step"]) >= first["step"] and r.headers["x-preview-frames"] == "8"
        assert PIL.Image.open(io.BytesIO(r.content)).size == (8 * 64, 53)
    else:  # it finished in between: the clear 404
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_preview", r.text

    done = farm.wait(job_id)
    assert done["status"] == "succeeded" and "preview" not in done, done
    after = farm.session.get(f"{farm.url}/v1/jobs/{job_id}/preview", timeout=30)
    assert after.status_code == 404, after.text
    err = after.json()["error"]
    assert err["code"] == "no_preview" and "not stored" in err["message"]
    # nothing of the previews lands with the results
    prefix = Path(farm.settings.storage_url[len("file://"):]) / done["prefix"]
    assert sorted(p.name for p in prefix.iterdir()) == sorted(
        ["video.mp4", "params.json", "poster.jpg", done["input"]["name"]])

    metrics = farm.session.get(farm.url + "/metrics", timeout=30).text
    sent = [line for line in metrics.splitlines() if line.startswith('i2v_previews_total{vram_class="12gb"}')]
    assert sent and float(sent[0].split()[-1]) >= len(previews), sent

    # The same job with previews off: no preview event, a 404 that says why, the same video.
    off = farm.submit_ok(**JOB, preview=False, reuse=False)  # rendered again, not the first job's result reused
    assert off["params"]["preview"] is False
    running = farm.wait(off["id"], statuses=("running", "succeeded"))
    r = farm.session.get(f"{farm.url}/v1/jobs/{off['id']}/preview", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_preview", r.text
    if running["status"] == "running":
        assert "turned previews off" in r.json()["error"]["message"]
    events_off = _events(farm, off["id"])
    assert [name for name, _ in events_off if name == "preview"] == []
    done_off = farm.wait(off["id"])
    assert done_off["status"] == "succeeded" and done_off["params"]["seed"] == done["params"]["seed"]
    assert _decoded(farm, done_off) == _decoded(farm, done)


def test_a_bad_preview_field_is_a_422_naming_it(farm):
    r = farm.submit(**JOB, preview="sometimes")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "preview"


# --- the same farm's CPU worker (issue 17) -------------------------------------------------------


def test_cpu_worker_computes_on_the_nodes_cores(farm):
    """A worker on a node without a GPU computes on the node's cores (not the one thread Ray's
    OMP_NUM_THREADS=num_cpus would give it), says so in `GET /v1/cluster`, and `i2v-farm status`
    prints it (on this module's farm: `worker_cpus` 1, the default; previews change nothing here)."""
    cores = len(os.sched_getaffinity(0))
    [worker] = _workers(farm)
    assert worker["device"] == "cpu" and worker["threads_rule"] == "auto_cpu", worker
    assert worker["threads"] == worker["node_cores"] == cores, worker  # torch threads of its render thread
    assert worker["worker_cpus"] == 1.0
    assert worker["torch_imported_before"] is False, worker  # its settings came before torch loaded
    assert worker["cuda_alloc_conf"] is None, worker  # no GPU: no allocator config

    job = farm.submit_ok(**TINY_JOB)
    done = farm.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    assert done["replica"] == worker["replica"]

    out = _status(farm)
    assert f"12gb: 1 replicas running (1-1), 0 busy, 0 queued; cpu threads {cores}\n" in out, out
    assert f": cpu, {cores} cpu threads (auto: no GPU, the node's {cores} cores), node {worker['node'][:8]}" in out
