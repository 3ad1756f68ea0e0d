"""The farm's metrics (monitoring/metrics.py) without Ray: what a job's life records, the gauges
of a scrape, and worker stats riding on events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import FarmMetrics, GiB, WorkerStats


class _Class:
    def __init__(self, name, gib):
        self.name, self.memory_bytes = name, gib * GiB


CLASSES = [_Class("12gb", 12), _Class("24gb", 24)]


def samples(text: bytes) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: bytes, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= set(ls)]
    assert found, f"no sample {name}{labels}"
    return sum(found)


CLUSTER = {
    "classes": [
        {"name": "12gb", "memory_gib": 12, "replicas": {"running": 2, "starting": 0, "min": 2, "max": 2},
         "busy": 1, "queued": 3},
        {"name": "24gb", "memory_gib": 24, "replicas": {"running": 0, "starting": 1, "min": 1, "max": 1},
         "busy": 0, "queued": 0},
    ],
    "jobs": {"queued": 3, "running": 1, "succeeded": 5, "failed": 1, "canceled": 0},
}


def _record(status, vram_class="12gb", **extra):
    now = datetime.now(timezone.utc)
    rec = {"id": "a" * 32, "status": status, "vram_class": vram_class, "params": {"resolution": "768p"},
           "created_at": (now - timedelta(seconds=42)).isoformat(), "finished_at": now.isoformat()}
    rec.update(extra)
    return rec


def test_every_enumerable_series_exists_at_zero_before_any_job():
    m = FarmMetrics(CLASSES)
    text = m.render(CLUSTER, {}, alive_nodes=[])
    assert value(text, "i2v_jobs_submitted_total", vram_class="24gb", resolution="1024p") == 0
    assert value(text, "i2v_jobs_finished_total", vram_class="12gb", status="failed") == 0
    assert value(text, "i2v_oom_total", vram_class="24gb") == 0
    assert value(text, "i2v_job_retries_total", vram_class="12gb", reason="oom") == 0
    assert value(text, "i2v_storage_upload_failures_total", vram_class="12gb") == 0
    assert value(text, "i2v_job_queue_wait_seconds_count", vram_class="24gb") == 0
    assert value(text, "i2v_jobs_rejected_total", reason="no_class_fits") == 0
    names = {n for n, _ in samples(text)}
    assert all(n.startswith("i2v_") for n in names), sorted(n for n in names if not n.startswith("i2v_"))
    assert not any("job_id" in dict(ls) or "id" in dict(ls) for _, ls in samples(text))


def test_scrape_gauges_come_from_the_managers_state():
    m = FarmMetrics(CLASSES)
    text = m.render(CLUSTER, {"12gb": {"RUNNING": 2}, "24gb": {"STARTING": 1, "RECOVERING": 1}}, alive_nodes=[])
    assert value(text, "i2v_queue_depth", vram_class="12gb") == 3
    assert value(text, "i2v_workers_busy", vram_class="12gb") == 1
    assert value(text, "i2v_worker_replicas", vram_class="12gb", state="running") == 2
    assert value(text, "i2v_worker_replicas", vram_class="12gb", state="starting") == 0
    assert value(text, "i2v_worker_replicas", vram_class="24gb", state="running") == 0
    assert value(text, "i2v_worker_replicas", vram_class="24gb", state="recovering") == 1
    assert value(text, "i2v_worker_replicas_min", vram_class="24gb") == 1
    assert value(text, "i2v_vram_class_memory_bytes", vram_class="24gb") == 24 * GiB
    assert value(text, "i2v_jobs", status="succeeded") == 5
    # a state that went away is gone from the next scrape (no stale gauge)
    text = m.render(CLUSTER, {"24gb": {"RUNNING": 1}}, alive_nodes=[])
    assert ("i2v_worker_replicas", (("state", "recovering"), ("vram_class", "24gb"))) not in samples(text)


def test_a_jobs_life_is_counted_once_with_its_class_and_resolution():
    m = FarmMetrics(CLASSES)
    m.job_submitted("12gb", "768p")
    m.job_started("j", "12gb", (datetime.now(timezone.utc) - timedelta(seconds=3)).isoformat())
    m.worker_event("12gb", {"event": "progress", "step": 1, "total": 2})
    m.worker_event("12gb", {"event": "error", "code": "out_of_memory"})
    m.attempt_ended("12gb", "oom", 1.5)
    m.attempt_failed("j", "12gb", "oom", retried=True)
    m.job_started("j", "24gb", (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat())
    for step in (1, 2):
        m.worker_event("24gb", {"event": "progress", "step": step, "total": 2})
    m.attempt_ended("24gb", "done", 0.5)
    m.job_finished(_record("succeeded", "24gb", result={"frames": 16, "fps": 8}, peak_vram_bytes=14 * GiB))
    m.job_finished(_record("failed", "24gb"))
    m.job_rejected("backlogged")
    text = m.render(CLUSTER, {}, alive_nodes=[])

    assert value(text, "i2v_jobs_submitted_total", vram_class="12gb", resolution="768p") == 1
    assert value(text, "i2v_jobs_submitted_total") == 1
    assert value(text, "i2v_jobs_finished_total", vram_class="24gb", resolution="768p", status="succeeded") == 1
    assert value(text, "i2v_jobs_finished_total", status="failed") == 1
    assert value(text, "i2v_jobs_rejected_total", reason="backlogged") == 1
    assert value(text, "i2v_oom_total", vram_class="12gb") == 1 and value(text, "i2v_oom_total") == 1
    assert value(text, "i2v_job_retries_total", vram_class="12gb", reason="oom") == 1
    assert value(text, "i2v_denoising_steps_total", vram_class="24gb") == 2
    assert value(text, "i2v_frames_generated_total", vram_class="24gb") == 16
    assert value(text, "i2v_video_generated_seconds_total", vram_class="24gb") == 2.0
    assert value(text, "i2v_job_peak_gpu_memory_bytes_sum", vram_class="24gb") == 14 * GiB
    buckets = {float(dict(ls)["le"]): v for (n, ls), v in samples(text).items()
               if n == "i2v_job_peak_gpu_memory_bytes_bucket" and dict(ls)["vram_class"] == "24gb"}
    assert buckets[12 * GiB] == 0 and buckets[16 * GiB] == 1
    assert value(text, "i2v_job_run_seconds_count", vram_class="12gb", outcome="oom") == 1
    assert value(text, "i2v_job_run_seconds_sum", vram_class="24gb", outcome="succeeded") == 0.5
    assert value(text, "i2v_job_latency_seconds_sum", vram_class="24gb", resolution="768p") == pytest.approx(42, abs=1)
    # the first wait since submission (3 s), the retry's since the OOM (not the hour-old submission)
    assert value(text, "i2v_job_queue_wait_seconds_sum", vram_class="12gb") == pytest.approx(3, abs=1)
    assert value(text, "i2v_job_queue_wait_seconds_sum", vram_class="24gb") < 5


def test_worker_stats_ride_on_events_and_count_storage_failures_once():
    m = FarmMetrics(CLASSES)
    w = WorkerStats(12 * GiB, node="n1", node_ip="10.0.0.7", gpu="0", replica="Worker_12gb#a")
    ev = w.annotate({"event": "started"})
    assert ev["stats"]["gpu_memory_used_bytes"] == 0  # no CUDA device here: nothing held on a GPU
    assert ev["stats"]["gpu_memory_total_bytes"] == 12 * GiB
    m.worker_event("12gb", ev)
    w.storage_upload_failed()
    w.storage_upload_failed("job", RuntimeError("down"))  # usable as an uploader's on_failure
    done = w.annotate({"event": "done"})
    m.worker_event("12gb", done)
    m.worker_event("12gb", done)  # the same cumulative count again adds nothing
    text = m.render(CLUSTER, {}, alive_nodes=["n1"])
    assert value(text, "i2v_storage_upload_failures_total", vram_class="12gb") == 2
    labels = {"vram_class": "12gb", "node": "n1", "node_ip": "10.0.0.7", "gpu": "0"}
    assert value(text, "i2v_gpu_memory_used_bytes", **labels) == 0
    assert value(text, "i2v_gpu_memory_total_bytes", **labels) == 12 * GiB
    # a new replica (restart) starts its own count; a node that left drops its GPU series
    w2 = WorkerStats(12 * GiB, node="n2", gpu="0", replica="Worker_12gb#b")
    w2.storage_upload_failed()
    m.worker_event("12gb", w2.annotate({"event": "progress"}))
    text = m.render(CLUSTER, {}, alive_nodes=["n2"])
    assert value(text, "i2v_storage_upload_failures_total", vram_class="12gb") == 3
    assert {dict(ls)["node"] for (n, ls) in samples(text) if n == "i2v_gpu_memory_used_bytes"} == {"n2"}
