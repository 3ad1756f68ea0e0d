"""Control-plane throughput (issue 16): the worker coalesces progress (`ProgressThrottle`), the job
store batches what a restart may lose (`JobStore.defer` / `flush`: one commit for many changes),
and the job manager counts every denoising step from coalesced events. No Ray: a real job store
(SQLite in tmp_path), the manager over the fake workers of `test_manager`."""

from __future__ import annotations

import sqlite3

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.job_store import JobStore
from serving.worker import ProgressThrottle

from .test_manager import HEIGHT, IMAGE, SMALL, WIDTH, Farm, done, progress, run_async, started


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --- the worker's progress --------------------------------------------------------------------


def sent_steps(interval: float, total: int, step_s: float) -> list[int]:
    clock = Clock()
    throttle = ProgressThrottle(interval, clock)
    out = []
    for step in range(1, total + 1):
        clock.t += step_s
        if throttle.due(step, total):
            out.append(step)
    return out


def test_fast_steps_send_the_first_and_the_last_only():
    assert sent_steps(0.25, 30, 0.001) == [1, 30]


def test_slow_steps_send_one_event_per_interval_and_always_the_last():
    steps = sent_steps(0.25, 30, 0.1)  # a step every 0.1 s: at most one event per 0.25 s
    assert steps[0] == 1 and steps[-1] == 30
    assert steps == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 30]
    gaps = [b - a for a, b in zip(steps[:-2], steps[1:-1])]
    assert all(g * 0.1 >= 0.25 for g in gaps)


def test_interval_zero_sends_every_step_and_a_one_step_job_sends_its_step():
    assert sent_steps(0, 5, 0.001) == [1, 2, 3, 4, 5]
    assert sent_steps(10, 1, 0.001) == [1]


# --- the job store: deferred writes ---------------------------------------------------------------


def record(job_id: str) -> dict:
    return {"id": job_id, "status": "queued", "owner": "a", "created_at": "2026-01-01T00:00:00+00:00",
            "node": None, "progress": {"step": 0, "total": 4}}


def on_disk(path, job_id: str) -> str:
    """The job's status as another connection (another process) reads the file."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


class CountingDb:
    """The store's connection, counting the COMMITs it runs."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.commits = db, 0

    def execute(self, sql: str, *args):
        self.commits += sql.strip().upper() == "COMMIT"
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def test_deferred_fields_are_seen_at_once_and_written_in_one_commit(store):
    for i in range(20):
        store.create(record(f"j{i}"))
    counting = store._db = CountingDb(store._db)
    for i in range(20):
        store.defer(f"j{i}", status="running", node=f"n{i}")
        store.defer(f"j{i}", progress={"step": 2, "total": 4})
    assert counting.commits == 0
    assert store.get("j3")["status"] == "running" and store.get("j3")["node"] == "n3"
    assert store.get("j3")["progress"] == {"step": 2, "total": 4}
    assert on_disk(store.path, "j3") == "queued"  # not written yet

    assert store.flush() == 20 and counting.commits == 1
    assert on_disk(store.path, "j3") == "running"
    assert store.flush() == 0 and counting.commits == 1  # nothing left: no empty commit
    reopened = JobStore(store.path)
    assert reopened.get("j19")["node"] == "n19" and reopened.get("j19")["progress"]["step"] == 2
    reopened.close()


def test_an_update_or_a_create_commits_the_deferred_fields_with_it(store):
    store.create(record("a"))
    store.create(record("b"))
    counting = store._db = CountingDb(store._db)
    store.defer("a", status="running")
    rec = store.update("b", status="succeeded")
    assert rec["status"] == "succeeded" and counting.commits == 1
    assert on_disk(store.path, "a") == "running"
    store.defer("a", node="n1")
    store.create(record("c"))
    assert counting.commits == 2 and store.flush() == 0
    assert JobStore(store.path).get("a")["node"] == "n1"


def test_reads_by_status_see_deferred_changes(store):
    for i in range(3):
        store.create(record(f"j{i}"))
    store.defer("j0", status="running")
    assert store.counts()["running"] == 1 and store.counts()["queued"] == 2
    store.defer("j1", status="running")
    assert [j["id"] for j in store.list(status="running")[0]] == ["j1", "j0"]
    store.defer("j2", status="running")
    assert store.count_active("a") == 3 and [r["id"] for r in store.with_status(["running"])] == ["j0", "j1", "j2"]


def test_a_failed_transaction_keeps_the_deferred_fields(store):
    store.create(record("a"))
    store.defer("a", status="running")
    with pytest.raises(KeyError):
        store.update("nope", status="failed")  # rolled back: "a" is not written ...
    assert on_disk(store.path, "a") == "queued"
    assert store.get("a")["status"] == "running"  # ... but still pending
    assert store.flush() == 1 and on_disk(store.path, "a") == "running"
    with pytest.raises(ValueError):
        store.defer("a", status="bogus")


# --- the manager with coalesced progress ------------------------------------------------------------


def steps_counted(farm: Farm, vram_class: str) -> float:
    text = farm.mgr.metrics.render({"classes": [], "jobs": {}}, {}, alive_nodes=[]).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "i2v_denoising_steps_total" and s.labels.get("vram_class") == vram_class:
                return s.value
    raise AssertionError("no i2v_denoising_steps_total sample")


@run_async
async def test_coalesced_progress_counts_every_step_and_the_start_is_written_per_tick(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    job = await farm.submit()  # 4 steps
    assert await farm.tick() == [(job["id"], "12gb")]
    path = farm.mgr.store.path
    assert farm.record(job["id"])["status"] == "running" and on_disk(path, job["id"]) == "queued"
    farm.mgr.store.flush()  # what the dispatch loop does after each tick
    assert on_disk(path, job["id"]) == "running"

    await farm.feed(job["id"], started(node="node-3"), progress(1))  # steps 2 and 3 coalesced away
    assert (await farm.mgr.get(job["id"]))["progress"] == {"step": 1, "total": 4}
    assert farm.record(job["id"])["node"] == "node-3"
    await farm.end(job["id"], progress(4), done())
    rec = farm.record(job["id"])
    assert rec["status"] == "succeeded" and rec["progress"] == {"step": 4, "total": 4} and rec["node"] == "node-3"
    assert on_disk(path, job["id"]) == "succeeded"  # the end is committed at once, with what was deferred
    assert steps_counted(farm, "12gb") == 4
    await farm.close()


@run_async
async def test_the_input_is_in_the_inbox_exactly_for_the_jobs_made(tmp_path):
    """`submit` writes the input off the event loop before the job exists; a refused request (a
    full queue) or a retried one (the same Idempotency-Key) leaves no file behind."""
    farm = Farm(tmp_path, classes=("12gb",), replicas={"12gb": 0}, backlog_limit=2)
    a = await farm.submit(idempotency_key="k1")
    again = await farm.mgr.submit(dict(SMALL), IMAGE, "png", WIDTH, HEIGHT, idempotency_key="k1")
    assert again["created"] is False and again["job"]["id"] == a["id"]
    b = await farm.submit()
    full = await farm.mgr.submit(dict(SMALL), IMAGE, "png", WIDTH, HEIGHT)
    assert full["status"] == 429 and full["error"]["code"] == "backlogged"
    assert sorted(p.name for p in farm.mgr.inbox.iterdir()) == sorted([a["id"], b["id"]])
    assert (farm.mgr.inbox / a["id"]).read_bytes() == IMAGE
    await farm.close()


def test_the_replica_states_are_read_less_often_when_every_class_runs_what_it_may(tmp_path):
    from serving.manager import REPLICA_REFRESH_S, REPLICA_REFRESH_STABLE_S

    async def check():
        farm = Farm(tmp_path, classes=("12gb",), replicas={"12gb": 1},
                    workers={"12gb": {"min_replicas": 1, "max_replicas": 2}})
        mgr = farm.mgr
        assert mgr._refresh_interval() == REPLICA_REFRESH_STABLE_S  # nothing queued, min running
        await farm.submit()
        assert mgr._refresh_interval() == REPLICA_REFRESH_S  # work queued and room to grow
        farm.set_replicas(**{"12gb": 2})
        assert mgr._refresh_interval() == REPLICA_REFRESH_STABLE_S  # at max_replicas
        mgr.replicas = {"12gb": {"RUNNING": 1, "STARTING": 1}}
        assert mgr._refresh_interval() == REPLICA_REFRESH_S  # a replica is starting
        farm.set_replicas(**{"12gb": 0})
        assert mgr._refresh_interval() == REPLICA_REFRESH_S  # fewer than min_replicas
        await farm.close()

    run_async(check)()


def test_a_worker_streams_the_first_and_last_step_of_a_fast_job():
    """`Worker.run` with its render replaced by 30 instant steps (no Ray, no model): the stream is
    started, step 1, step 30, done; with `progress_interval_s` 0 every step goes."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cluster.vram_classes import VramClass
    from monitoring.metrics import WorkerStats
    from serving.config import load_settings
    from serving.worker import Worker

    def events_of(interval: float) -> list[tuple]:
        worker = object.__new__(Worker)  # no __init__: it needs a Ray replica
        worker.settings = load_settings({"model": "sim", "progress_interval_s": interval}, env={})
        worker.vram_class = VramClass(name="12gb", memory_gib=12, gpu="rtx3060-12gb")
        worker.node, worker.replica, worker._report = "node-1", "Worker_12gb#1", {"threads": 1}
        worker.worker_stats = WorkerStats(12 * 2**30, node="node-1")
        worker._pool = ThreadPoolExecutor(max_workers=1)

        def render(job, progress, cancel, preview=None):
            for step in range(1, 31):
                progress(step, 30)
            return {"result": {"key": "k"}, "timings": {"render": 0.0}, "peak_vram_bytes": None,
                    "uploaded": True}

        worker._render = render
        job = {"id": "j", "params": {}, "image": b"x", "attempt": 1, "prefix": "p/", "input_name": "input.png"}

        async def collect():
            return [e async for e in worker.run(job)]

        try:
            out = asyncio.run(collect())
        finally:
            worker._pool.shutdown()
        return [(e["event"], e.get("step")) for e in out]

    assert events_of(0.25) == [("started", None), ("progress", 1), ("progress", 30), ("done", None)]
    assert events_of(0) == [("started", None), *[("progress", s) for s in range(1, 31)], ("done", None)]


def test_a_count_of_active_jobs_commits_nothing_when_the_deferred_changes_keep_them_active(store):
    """A start (queued -> running) leaves a caller's active count as it was: counting at a
    submission writes no deferred change; one that ends a job is written first."""
    for i in range(3):
        store.create(record(f"j{i}"))
    counting = store._db = CountingDb(store._db)
    store.defer("j0", status="running", node="n0")
    store.defer("j1", progress={"step": 1, "total": 4})
    assert store.count_active("a") == 3 and counting.commits == 0
    assert on_disk(store.path, "j0") == "queued"  # still deferred
    store.defer("j2", status="succeeded")
    assert store.count_active("a") == 2 and counting.commits == 1
    assert on_disk(store.path, "j0") == "running" and on_disk(store.path, "j2") == "succeeded"


# --- Serve's replica states, read without `serve.status()` ------------------------------------------


class _State:
    """An enum member, as Serve's details may carry a replica's state."""

    def __init__(self, value: str) -> None:
        self.value = value


def test_replica_states_are_counted_from_serves_instance_details():
    from serving.manager.capacity import replica_states

    other = {"deployments": {"Model": {"replicas": [{"state": "RUNNING"}]}}}
    farm = {"deployments": {
        "Worker_12gb": {"replicas": [{"state": "RUNNING"}, {"state": _State("RUNNING")}, {"state": "STARTING"}]},
        "Worker_24gb": {"replicas": []},
        "JobManager": {"replicas": [{"state": "RUNNING"}]},
    }}
    details = {"applications": {"other": other, "i2v-farm": farm}}
    deployments = ["Worker_12gb", "Worker_24gb", "Worker_80gb"]
    assert replica_states(details, deployments) == {
        "Worker_12gb": {"RUNNING": 2, "STARTING": 1}, "Worker_24gb": {}, "Worker_80gb": {}}
    assert replica_states({"applications": {"other": other}}, deployments) is None  # the farm is not deployed
    assert replica_states({}, deployments) is None  # Serve is not running


def test_cluster_details_are_read_from_rays_gcs_at_most_every_two_seconds_unless_replicas_change(monkeypatch):
    """`GET /v1/cluster` (each open page polls it every 5 s) reads the worker reports and Ray's
    nodes, GCS reads that grow with the fleet, once per `CLUSTER_DETAILS_S` whatever the number of
    callers, and again at once when a class's replica counts change."""
    import asyncio
    import types

    from serving import api

    reads = []
    method = api.FarmApi._cluster_details  # Serve's ingress copies the class: patch the globals it reads
    monkeypatch.setitem(method.__globals__, "_read_cluster_details",
                        lambda: reads.append(1) or ({"Worker_12gb": [len(reads)]}, []))
    clock = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: clock[0])
    ingress = types.SimpleNamespace(_details=(0.0, (), None), _details_lock=asyncio.Lock())
    details = lambda replicas: asyncio.run(method(ingress, replicas))  # noqa: E731

    one = (("12gb", '{"running": 1}'),)
    assert details(one)[0] == {"Worker_12gb": [1]}
    ingress._details_lock = asyncio.Lock()  # a new event loop per asyncio.run
    for _ in range(20):  # many pages at once
        assert details(one)[0] == {"Worker_12gb": [1]}
    assert len(reads) == 1
    clock[0] += api.CLUSTER_DETAILS_S
    assert details(one)[0] == {"Worker_12gb": [2]} and len(reads) == 2  # stale: read again
    assert details((("12gb", '{"running": 2}'),))[0] == {"Worker_12gb": [3]}  # a replica came: at once
