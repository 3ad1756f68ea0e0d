"""`python -m serving.batch` as a real Ray job (Jobs SDK, the shared cluster's dashboard) against
the farm on the shared simulated cluster (`sim` model): results and summary in storage, a re-run
renders nothing new, a stopped job loses nothing that finished."""

from __future__ import annotations

import functools
import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.simulated import LOOPBACK_ENV
from serving.storage import LocalStorage
from tests.integration.conftest import deploy, png_bytes, undeploy

WORKERS = {"12gb": {"min_replicas": 2, "max_replicas": 2}, "24gb": {"min_replicas": 1, "max_replicas": 1}}
JOB_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def farm(ray_cluster, tmp_path_factory):
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("batch-farm"), workers=WORKERS)
    yield farm
    undeploy()


@pytest.fixture(scope="module")
def jobs(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    sim, _ = ray_cluster
    return JobSubmissionClient(sim.dashboard_url)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """http://127.0.0.1:PORT/ serving a directory of images (an http image source)."""
    root = tmp_path_factory.mktemp("www")
    (root / "e.png").write_bytes(png_bytes(112, 96, seed=5))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _storage(farm) -> LocalStorage:
    return LocalStorage(farm.settings.storage_url[len("file://"):])


def _farm_jobs(farm) -> int:
    return sum(farm.cluster()["jobs"].values())


def _jsonl(rows: list) -> str:
    return "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows)


def _workdir(tmp_path: Path, manifest_name: str, manifest_text: str) -> Path:
    """A working directory like a user's: images under img/, a corrupt one, the manifest."""
    work = tmp_path / "work"
    (work / "img").mkdir(parents=True)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        (work / "img" / f"{name}.png").write_bytes(png_bytes(96, 80, seed=seed))
    (work / "img" / "corrupt.png").write_bytes(png_bytes()[:150])
    (tmp_path / "outside.png").write_bytes(png_bytes(seed=4))
    (work / manifest_name).write_text(manifest_text)
    return work


def _submit(jobs, farm, work: Path, args: str) -> str:
    env = {
        "I2V_STORAGE_URL": farm.settings.storage_url,
        "I2V_EGRESS_ALLOW": "127.0.0.1",  # the image server of these tests is on loopback (refused by default)
        # `python` of the entrypoint is the farm's environment (here: the test's virtualenv)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **LOOPBACK_ENV,
    }
    # --row-timeout: a job the farm never finishes fails the run (with the farm's view) instead of hanging it
    return jobs.submit_job(entrypoint=f"python -m serving.batch {args} --url {farm.url} --poll 0.2 --row-timeout 60",
                           runtime_env={"working_dir": str(work), "env_vars": env})


def _wait(jobs, job_id: str, until=("SUCCEEDED",), timeout: float = JOB_TIMEOUT_S, farm=None) -> str:
    """Wait until the Ray job ends; its log (the batch's stdout). Fails with the log (and the farm's
    view of the rows still running, from the summary) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        status = jobs.get_job_status(job_id)
        if status.is_terminal() or str(status.value) in until:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {status} after {timeout}s:\n{jobs.get_job_logs(job_id)}"
                        + (_rows_not_done(farm) if farm else ""))
        time.sleep(0.5)
    logs = jobs.get_job_logs(job_id)
    assert str(status.value) in until, (f"job {job_id} ended {status} ({jobs.get_job_info(job_id).message}):\n{logs}"
                                        + (_rows_not_done(farm) if farm else ""))
    return logs


def _rows_not_done(farm) -> str:
    """The farm's record of every row with a job that a summary in storage lists as not done."""
    out = []
    storage = _storage(farm)
    for obj in storage.list():
        if obj.key.endswith("/summary.jsonl"):
            for line in storage.get_bytes(obj.key).decode().splitlines():
                row = json.loads(line)
                if row["status"] in ("running", "failed") and row["job_id"]:
                    out.append(f"{obj.key} line {row['line']}: {json.dumps(farm.job(row['job_id']))}")
    return "\nrows not done:\n" + "\n".join(out) + f"\ncluster: {json.dumps(farm.cluster())}"


def _summary(storage: LocalStorage, prefix: str) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in storage.get_bytes(prefix + "summary.jsonl").decode().splitlines()]
    return lines, json.loads(storage.get_bytes(prefix + "summary.json"))


def test_batch_job_renders_the_valid_rows_reports_bad_ones_and_a_rerun_renders_nothing(farm, jobs, image_server,
                                                                                         tmp_path):
    quick = {"num_inference_steps": 3}
    rows = [
        {"image": "img/a.png", "prompt": "waves rolling in", "preset": "fast", **quick},
        {"id": "sku-2", "image": "img/b.png", "prompt": "a cat turning its head", "resolution": "768p",
         "num_frames": 16, **quick},
        {"image": "img/c.png", "prompt": "camera zooming in", "resolution": "1024p", "num_frames": 16, **quick},
        {"image": "s3://inputs/d.png", "prompt": "flowers blooming", "preset": "standard", "num_frames": 8, **quick},
        {"image": f"{image_server}/e.png", "prompt": "ocean waves", "num_frames": 8, "priority": "high", **quick},
        {"image": "img/a.png", "prompt": "waves rolling in", "preset": "fast", **quick},  # again: a second take
        {"image": "img/a.png", **quick},                                                 # 7: no prompt
        {"image": "img/a.png", "prompt": "too long", "num_frames": 64},                   # 8: out of range
        {"image": "img/missing.png", "prompt": "x"},                                     # 9: not found
        {"image": "../outside.png", "prompt": "x"},                                      # 10: escapes the dir
        {"image": "img/corrupt.png", "prompt": "x"},                                     # 11: corrupt
        {"image": "img/a.png", "prompt": "x", "strength": 0.8},                          # 12: unknown field
        "{not json\n",                                                                   # 13
    ]
    work = _workdir(tmp_path, "manifest.jsonl", _jsonl(rows))
    storage = _storage(farm)
    storage.put_bytes("inputs/d.png", png_bytes(128, 96, seed=6))
    before = _farm_jobs(farm)

    t0 = time.monotonic()
    logs = _wait(jobs, _submit(jobs, farm, work, "manifest.jsonl --concurrency 3"), farm=farm)
    first_s = time.monotonic() - t0
    lines, summary = _summary(storage, "batches/manifest/")
    assert summary["counts"] == {"rows": 13, "succeeded": 6, "failed": 0, "invalid": 7, "skipped": 0,
                                 "running": 0, "pending": 0}, logs
    assert summary["finished"] and summary["exit_code"] == 0
    assert [line["line"] for line in lines] == list(range(1, 14))
    assert [line["status"] for line in lines] == ["succeeded"] * 6 + ["invalid"] * 7
    errors = {line["line"]: line["error"] for line in lines if line["error"]}
    assert errors[7]["field"] == "prompt" and errors[8]["field"] == "num_frames"
    assert errors[9]["code"] == "image_not_found" and errors[10]["code"] == "image_outside_working_dir"
    assert errors[11]["code"] == "corrupt_image" and "strength" in errors[12]["message"]
    assert "not valid JSON" in errors[13]["message"]
    assert lines[1]["id"] == "sku-2" and lines[5]["id"] == lines[0]["id"] + "-2"
    for line in lines[:6]:
        job = farm.job(line["job_id"])
        assert job["status"] == "succeeded" and job["result"]["key"] == line["video_key"]
        assert storage.exists(line["video_key"]) and line["vram_class"] == job["vram_class"]
        assert line["seed"] == job["params"]["seed"] and line["timings"]
    assert farm.job(lines[2]["job_id"])["home_class"] == "24gb"  # 1024p x 16 frames
    assert farm.job(lines[4]["job_id"])["params"]["priority"] == "high"
    assert _farm_jobs(farm) == before + 6
    assert "line 9" in logs and "6 succeeded, 0 failed, 7 invalid, 0 skipped" in logs

    t0 = time.monotonic()
    logs = _wait(jobs, _submit(jobs, farm, work, "manifest.jsonl --concurrency 3"), farm=farm)
    again_s = time.monotonic() - t0
    lines2, summary2 = _summary(storage, "batches/manifest/")
    assert summary2["counts"]["skipped"] == 6 and summary2["counts"]["succeeded"] == 0, logs
    assert summary2["counts"]["invalid"] == 7
    assert [line["video_key"] for line in lines2[:6]] == [line["video_key"] for line in lines[:6]]
    assert _farm_jobs(farm) == before + 6  # nothing new submitted
    print(f"batch job: first run {first_s:.1f}s, re-run {again_s:.1f}s")


def test_csv_manifest_with_an_output_prefix_and_low_priority(farm, jobs, tmp_path):
    csv_text = ("id,image,prompt,preset,num_frames,num_inference_steps\n"
                "hero,img/a.png,\"A person walking forward, naturally\",fast,,3\n"
                ",img/b.png,Camera slowly zooming in,,8,3\n"
                "bad,img/c.png,too many frames,,33,3\n")
    work = _workdir(tmp_path, "shots.csv", csv_text)
    storage = _storage(farm)
    before = _farm_jobs(farm)
    logs = _wait(jobs, _submit(jobs, farm, work, "shots.csv --out campaigns/spring --priority low"), farm=farm)
    lines, summary = _summary(storage, "campaigns/spring/")
    assert summary["counts"]["succeeded"] == 2 and summary["counts"]["invalid"] == 1, logs
    assert [(line["line"], line["status"]) for line in lines] == [(2, "succeeded"), (3, "succeeded"), (4, "invalid")]
    assert lines[0]["id"] == "hero" and len(lines[1]["id"]) == 16 and lines[2]["id"] == "bad"
    assert lines[2]["error"]["field"] == "num_frames"
    assert all(farm.job(line["job_id"])["params"]["priority"] == "low" for line in lines[:2])
    assert _farm_jobs(farm) == before + 2


def test_a_stopped_batch_job_keeps_what_finished_and_a_rerun_completes_without_rendering_twice(farm, jobs, tmp_path):
    # ~1.3 s per row on a 12gb worker (sim: 1% of an RTX 3060's time), one row at a time: the stop
    # comes after 2 rows, with ~10 s of rows left
    rows = [{"image": "img/a.png", "prompt": f"shot {i}", "resolution": "512p", "num_frames": 16,
             "num_inference_steps": 30} for i in range(10)]
    work = _workdir(tmp_path, "story.jsonl", _jsonl(rows))
    storage = _storage(farm)
    before = _farm_jobs(farm)
    job_id = _submit(jobs, farm, work, "story.jsonl --concurrency 1")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:  # until the summary in storage lists two finished rows
        try:
            lines, _ = _summary(storage, "batches/story/")
        except KeyError:
            lines = []
        if sum(line["status"] == "succeeded" for line in lines) >= 2:
            break
        assert time.monotonic() < deadline and not jobs.get_job_status(job_id).is_terminal(), \
            jobs.get_job_logs(job_id)
        time.sleep(0.2)
    jobs.stop_job(job_id)
    logs = _wait(jobs, job_id, until=("STOPPED",))
    lines, summary = _summary(storage, "batches/story/")
    finished = {line["id"]: line for line in lines if line["status"] == "succeeded"}
    assert summary["stopped"] and not summary["finished"], logs
    assert 2 <= len(finished) < 10, summary
    assert all(storage.exists(line["video_key"]) for line in finished.values())

    logs = _wait(jobs, _submit(jobs, farm, work, "story.jsonl --concurrency 2"), farm=farm)
    lines2, summary2 = _summary(storage, "batches/story/")
    assert summary2["finished"] and summary2["counts"]["failed"] == 0, logs
    assert summary2["counts"]["skipped"] == len(finished)
    assert summary2["counts"]["succeeded"] == 10 - len(finished)
    for line in lines2:
        if line["id"] in finished:
            assert line["status"] == "skipped" and line["job_id"] == finished[line["id"]]["job_id"]
    assert _farm_jobs(farm) == before + 10  # the row in flight at the stop was picked up, not rendered again
