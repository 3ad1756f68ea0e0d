"""The job manager's state machine, without Ray: fake worker deployments, a real job store.

In the style of Ray Serve's `test_deployment_state.py`: each test builds a `JobManager` over fake
worker handles that speak the worker's protocol (`handle.options(stream=True).run.remote(job)`
returns an async stream of events with `cancel()`, like a `DeploymentResponseGenerator`), stops
its background loop, and drives it step by step: set the replicas Serve would report, call one
dispatch (`tick`), feed a worker's events, then assert the exact job records, queues and calls.

Nothing sleeps against a clock: a step waits for a condition (the manager read the job's input
and called the worker, or consumed every event fed so far, or its job task ended).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from typing import Any

import pytest
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RequestCancelledError

from pipeline.cost_model import GiB
from serving.manager import JobManager

IMAGE = b"\x89PNG\r\n\x1a\n fake image"  # the manager stores the bytes, it never decodes them
WIDTH = HEIGHT = 512
# 512p x 8 frames: ~6.6 GiB, home 12gb; 1024p x 16 frames: ~16.6 GiB, home 24gb (asserted below).
SMALL = {"prompt": "a cat turning its head to the left", "resolution": "512p", "num_frames": 8,
         "num_inference_steps": 4}
BIG = {**SMALL, "resolution": "1024p", "num_frames": 16}
CLASSES = ("12gb", "24gb")
WAIT_S = 5.0  # a bound for conditions that hold within milliseconds; only a broken manager hits it


@pytest.fixture(autouse=True)
def _keep_umask():
    """JobManager sets the process umask from `file_mode`; give other tests theirs back."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def run_async(test):
    """Run an `async def` test on a fresh event loop (tasks left over are canceled at its end)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return wrapper


async def wait_until(condition, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.001)


# --- fakes ------------------------------------------------------------------------------------

_END = object()
_CANCEL = object()


class FakeStream:
    """One `run` call on a worker: the events the test feeds, as the manager iterates them.

    Like Serve's `DeploymentResponseGenerator`: `cancel()` makes the next (or the pending) read
    raise `RequestCancelledError`. `parked` is True while the manager waits for the next event.
    """

    def __init__(self, worker: FakeWorker, payload: dict[str, Any]):
        self.worker = worker
        self.payload = payload
        self.cancelled = False
        self.parked = False
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._events.put_nowait(_CANCEL)

    def put(self, item: Any) -> None:
        self._events.put_nowait(item)

    @property
    def drained(self) -> bool:
        """The manager took every event fed so far and waits for the next one."""
        return self.parked and self._events.empty()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict[str, Any]:
        self.parked = True
        try:
            item = await self._events.get()
        finally:
            self.parked = False
        if self.cancelled:
            raise RequestCancelledError("fake-request")
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class _RunMethod:
    def __init__(self, worker: FakeWorker):
        self.worker = worker

    def remote(self, payload: dict[str, Any]) -> FakeStream:
        stream = FakeStream(self.worker, payload)
        self.worker.calls.append(stream)
        return stream


class FakeWorker:
    """One class's worker deployment handle: `options(stream=True).run.remote(job)`."""

    def __init__(self, vram_class: str):
        self.vram_class = vram_class
        self.calls: list[FakeStream] = []
        self.options_seen: list[dict[str, Any]] = []

    def options(self, **options: Any) -> FakeWorker:
        self.options_seen.append(options)
        return self

    @property
    def run(self) -> _RunMethod:
        return _RunMethod(self)

    def job_ids(self) -> list[str]:
        return [s.payload["id"] for s in self.calls]


def started(node: str = "node-1", replica: str = "Worker_12gb#1") -> dict[str, Any]:
    return {"event": "started", "node": node, "replica": replica, "vram_class": "12gb", "pid": 1}


def progress(step: int, total: int = 4) -> dict[str, Any]:
    return {"event": "progress", "step": step, "total": total}


def done(key: str = "jobs/x/video.mp4", uploaded: bool = True) -> dict[str, Any]:
    event = {"event": "done", "result": {"key": key, "bytes": 1234, "frames": 8, "width": 512, "height": 512,
                                         "fps": 8},
             "timings": {"render": 1.5}, "peak_vram_bytes": 5 * GiB, "device": "sim", "model": "sim",
             "uploaded": uploaded}
    if not uploaded:
        event["upload_error"] = "storage unreachable"
    return event


def error(code: str, message: str) -> dict[str, Any]:
    return {"event": "error", "code": code, "message": message}


class Farm:
    """A JobManager over fake workers, its loop stopped: the test is the loop."""

    def __init__(self, tmp_path, *, replicas: dict[str, int] | None = None, classes=CLASSES, **settings: Any):
        self.workers = {c: FakeWorker(c) for c in classes}
        self.settings = {
            "model": "sim",
            "job_db": str(tmp_path / "state" / "jobs.sqlite3"),
            "storage_url": "file://" + str(tmp_path / "outputs"),
            "workers": {c: {"min_replicas": 0, "max_replicas": 1} for c in classes},
            "spill_rule": "idle",  # jobs run at home when it has room; earliest finish: its own test
            **settings,
        }
        self.mgr = JobManager(self.settings, self.workers)
        self.mgr._loop_task.cancel()  # never runs: no Serve to ask, no timer
        self.set_replicas(**(replicas if replicas is not None else {c: 1 for c in classes}))

    def set_replicas(self, **running: int) -> None:
        """What `capacity.read_replicas` would read from Serve: RUNNING replicas per class."""
        self.mgr.replicas = {c: {"RUNNING": running.get(c, 0)} for c in self.mgr.classes.names}

    async def submit(self, fields: dict[str, Any] = SMALL, **kw: Any) -> dict[str, Any]:
        reply = await self.mgr.submit(dict(fields), IMAGE, "png", WIDTH, HEIGHT, **kw)
        assert "job" in reply, reply
        return reply["job"]

    async def tick(self) -> list[tuple[str, str]]:
        """One dispatch step; waits until every job it dispatched has called its worker.
        Returns [(job id, class)] in dispatch order."""
        before = set(self.mgr.running)
        self.mgr._dispatch()
        new = [run for job_id, run in self.mgr.running.items() if job_id not in before]
        await wait_until(lambda: all(r.task.done() or (r.stream is not None and r.stream.drained) for r in new),
                         "dispatched jobs called their workers")
        return [(r.job.id, r.vram_class) for r in new]

    def stream(self, job_id: str) -> FakeStream:
        """The latest worker call for this job."""
        calls = [s for w in self.workers.values() for s in w.calls if s.payload["id"] == job_id]
        assert calls, f"no worker was called for {job_id}"
        return calls[-1]

    async def feed(self, job_id: str, *events: dict[str, Any]) -> None:
        """Worker events the job's attempt streams; returns once the manager applied them all."""
        stream = self.stream(job_id)
        for event in events:
            stream.put(event)
        await wait_until(lambda: stream.drained, f"{job_id}'s events were applied")

    async def end(self, job_id: str, *events: dict[str, Any], raises: BaseException | None = None) -> None:
        """The attempt's last events, then its stream ends (or raises `raises`); returns once the
        manager finished with the attempt."""
        run = self.mgr.running[job_id]
        stream = self.stream(job_id)
        for event in events:
            stream.put(event)
        stream.put(raises if raises is not None else _END)
        await asyncio.wait_for(run.task, WAIT_S)
        assert job_id not in self.mgr.running

    def record(self, job_id: str) -> dict[str, Any]:
        return self.mgr.store.get(job_id)

    def status(self, job_id: str) -> str:
        return self.record(job_id)["status"]

    def queued(self, vram_class: str) -> list[str]:
        return [j.id for j in self.mgr.scheduler.queued(vram_class)]

    def inbox_has(self, job_id: str) -> bool:
        return self.mgr._inbox_path(job_id).exists()

    async def close(self) -> None:
        tasks = [r.task for r in self.mgr.running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.mgr.store.close()


# --- dispatch ---------------------------------------------------------------------------------


@run_async
async def test_a_queued_job_runs_on_a_free_worker_of_its_class_and_succeeds(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    job = await farm.submit()
    rec = farm.record(job["id"])
    assert rec["estimate"]["vram_bytes"] < 12 * GiB  # so its home is 12gb
    assert job["status"] == "queued" and job["vram_class"] == "12gb" and job["queue_position"] == 1
    assert job["attempts"] == 0 and "seconds_by_class" not in job["estimate"]
    assert farm.inbox_has(job["id"])

    # no worker running yet: nothing is dispatched, the job keeps its place
    assert await farm.tick() == []
    assert farm.status(job["id"]) == "queued" and farm.queued("12gb") == [job["id"]]

    farm.set_replicas(**{"12gb": 1})
    assert await farm.tick() == [(job["id"], "12gb")]
    assert farm.workers["24gb"].calls == [] and farm.workers["12gb"].options_seen == [{"stream": True}]
    payload = farm.stream(job["id"]).payload
    rec = farm.record(job["id"])
    assert payload == {"id": job["id"], "params": rec["params"], "image": IMAGE, "attempt": 1,
                       "prefix": rec["prefix"], "input_name": "input.png"}
    assert rec["params"]["seed"] is not None  # fixed at submission: a retry renders the same video
    assert rec["status"] == "running" and rec["vram_class"] == "12gb" and rec["spilled"] is False
    assert rec["progress"] == {"step": 0, "total": None} and rec["node"] is None
    assert farm.queued("12gb") == [] and (await farm.mgr.get(job["id"])).get("queue_position") is None
    # the one 12gb worker is busy: a second job waits
    second = await farm.submit()
    assert await farm.tick() == [] and second["queue_position"] == 1

    await farm.feed(job["id"], started(node="node-7", replica="Worker_12gb#a"), progress(1), progress(2))
    rec = farm.record(job["id"])
    assert rec["node"] == "node-7" and rec["replica"] == "Worker_12gb#a"
    assert (await farm.mgr.get(job["id"]))["progress"] == {"step": 2, "total": 4}  # live, from memory

    await farm.end(job["id"], progress(3), progress(4), done(key="jobs/a/video.mp4"))
    rec = farm.record(job["id"])
    assert rec["status"] == "succeeded" and rec["attempts"] == 1 and rec["error"] is None
    assert rec["result"]["key"] == "jobs/a/video.mp4" and rec["peak_vram_bytes"] == 5 * GiB
    assert rec["progress"] == {"step": 4, "total": 4} and rec["timings"]["render"] == 1.5
    assert "run" in rec["timings"] and rec["finished_at"]
    assert not farm.inbox_has(job["id"]) and farm.mgr.running == {}

    # the worker is free again: the waiting job goes to it
    assert await farm.tick() == [(second["id"], "12gb")]
    assert farm.workers["12gb"].job_ids() == [job["id"], second["id"]]
    await farm.close()


@run_async
async def test_queue_positions_follow_priority_and_a_backed_up_job_spills_up(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    a, b, c = [await farm.submit() for _ in range(3)]
    assert [j["queue_position"] for j in (a, b, c)] == [1, 2, 3]
    urgent = await farm.submit({**SMALL, "priority": "high"})
    assert urgent["queue_position"] == 1
    assert farm.queued("12gb") == [urgent["id"], a["id"], b["id"], c["id"]]
    listed = {j["id"]: j["queue_position"] for j in (await farm.mgr.list())["jobs"]}
    assert listed == {urgent["id"]: 1, a["id"]: 2, b["id"]: 3, c["id"]: 4}

    # one 12gb worker, one idle 24gb worker: the head of the queue runs at home, the next spills up
    farm.set_replicas(**{"12gb": 1, "24gb": 1})
    assert await farm.tick() == [(urgent["id"], "12gb"), (a["id"], "24gb")]
    assert farm.workers["12gb"].job_ids() == [urgent["id"]] and farm.workers["24gb"].job_ids() == [a["id"]]
    rec = farm.record(a["id"])
    assert rec["status"] == "running" and rec["vram_class"] == "24gb" and rec["spilled"] is True
    assert rec["home_class"] == "12gb"
    assert rec["estimate"]["seconds"] == rec["estimate"]["seconds_by_class"]["24gb"]  # time on the class it runs on
    assert farm.record(urgent["id"])["spilled"] is False
    assert [(await farm.mgr.get(j["id"]))["queue_position"] for j in (b, c)] == [1, 2]
    await farm.close()


@run_async
async def test_earliest_finish_jobs_wait_for_the_faster_class_while_it_finishes_them_sooner(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0}, spill_rule="earliest_finish")
    jobs = [await farm.submit() for _ in range(12)]
    by_class = farm.record(jobs[0]["id"])["estimate"]["seconds_by_class"]
    on12, on24 = by_class["12gb"], by_class["24gb"]
    assert on24 < on12 / 2  # the 24gb GPU (an RTX 4090 to the cost model) is much faster
    # The 24gb GPU starts the first job; the next ones finish sooner queued behind it there than on
    # the idle 12gb GPU, until the k-th, which the 12gb GPU would finish first: it starts there now.
    k = next(k for k in range(2, 13) if k * on24 >= on12)
    farm.set_replicas(**{"12gb": 1, "24gb": 1})
    assert await farm.tick() == [(jobs[0]["id"], "24gb"), (jobs[k - 1]["id"], "12gb")]
    # Those it passed over still wait, first in line for the 24gb GPU.
    assert farm.queued("12gb")[: k - 2] == [j["id"] for j in jobs[1 : k - 1]]
    assert await farm.tick() == []  # both GPUs busy
    await farm.end(jobs[0]["id"], done(jobs[0]["id"]))
    assert await farm.tick() == [(jobs[1]["id"], "24gb")]
    await farm.close()


@run_async
async def test_a_job_is_never_sent_down_to_a_smaller_class(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    big = await farm.submit(BIG)
    assert 12 * GiB < farm.record(big["id"])["estimate"]["vram_bytes"] <= 24 * GiB
    assert big["vram_class"] == "24gb"
    assert await farm.tick() == []  # the free 12gb worker does not take it
    assert farm.status(big["id"]) == "queued" and farm.workers["12gb"].calls == []
    farm.set_replicas(**{"12gb": 1, "24gb": 1})
    assert await farm.tick() == [(big["id"], "24gb")]
    await farm.close()


@run_async
async def test_one_job_more_than_replicas_is_dispatched_when_a_gpu_of_the_class_is_free(tmp_path):
    """Autoscaling: queued work, room to grow and a free GPU: Serve is handed one job more than
    it has replicas (its autoscaler then adds one); without the free GPU it is not."""
    farm = Farm(tmp_path, classes=("12gb",), replicas={"12gb": 1},
                workers={"12gb": {"min_replicas": 1, "max_replicas": 2}})
    first, second, third = [await farm.submit() for _ in range(3)]
    assert await farm.tick() == [(first["id"], "12gb")]
    assert await farm.tick() == []  # no free GPU of the class
    farm.mgr.free_gpus = {"vram_12gb": 1.0}
    assert await farm.tick() == [(second["id"], "12gb")]
    assert await farm.tick() == []  # two jobs on a one-replica class: no more
    assert farm.queued("12gb") == [third["id"]]
    await farm.close()


@run_async
async def test_admission_refuses_what_fits_no_class_and_a_full_queue(tmp_path):
    farm = Farm(tmp_path, classes=("12gb",), replicas={"12gb": 0}, backlog_limit=2)
    reply = await farm.mgr.submit(dict(BIG), IMAGE, "png", WIDTH, HEIGHT)
    assert reply["status"] == 422 and reply["error"]["code"] == "no_class_fits"
    assert "exceeds the largest VRAM class 12gb" in reply["error"]["message"]
    await farm.submit()
    await farm.submit()
    reply = await farm.mgr.submit(dict(SMALL), IMAGE, "png", WIDTH, HEIGHT)
    assert reply["status"] == 429 and reply["error"]["code"] == "backlogged" and reply["retry_after"] >= 1
    assert farm.mgr.store.counts()["queued"] == 2 and len(farm.queued("12gb")) == 2
    assert len(list(farm.mgr.inbox.iterdir())) == 2  # nothing kept of the refused ones
    await farm.close()


# --- worker failures ---------------------------------------------------------------------------


@run_async
async def test_a_worker_that_dies_mid_job_is_retried_on_the_same_class(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    job = await farm.submit()
    await farm.tick()
    await farm.feed(job["id"], started(node="node-1"), progress(1))
    await farm.end(job["id"], raises=RayActorError())

    rec = farm.record(job["id"])
    assert rec["status"] == "queued" and rec["vram_class"] == "12gb" and rec["attempts"] == 1
    assert rec["node"] is None and rec["progress"] == {"step": 0, "total": None}
    assert rec["failures"] == [{"code": "worker_died", "message": "worker died: RayActorError",
                                "vram_class": "12gb", "node": "node-1"}]
    assert farm.queued("12gb") == [job["id"]] and farm.inbox_has(job["id"])
    assert (await farm.mgr.get(job["id"]))["queue_position"] == 1

    assert await farm.tick() == [(job["id"], "12gb")]
    assert farm.stream(job["id"]).payload["attempt"] == 2
    await farm.end(job["id"], started(node="node-2"), progress(4), done())
    rec = farm.record(job["id"])
    assert rec["status"] == "succeeded" and rec["attempts"] == 2 and len(rec["failures"]) == 1
    assert rec["node"] == "node-2"
    await farm.close()


@run_async
async def test_a_canceled_event_nobody_asked_for_runs_the_job_again(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    job = await farm.submit()
    await farm.tick()
    await farm.end(job["id"], started(node="node-1"), progress(1), {"event": "canceled"})

    rec = farm.record(job["id"])  # not left `running` until a restart
    assert rec["status"] == "queued" and rec["attempts"] == 1
    assert rec["failures"] == [{"code": "worker_died", "vram_class": "12gb", "node": "node-1",
                                "message": "the worker stopped the job without a cancel request"}]
    assert await farm.tick() == [(job["id"], "12gb")]
    await farm.end(job["id"], started(node="node-2"), progress(4), done())
    assert farm.status(job["id"]) == "succeeded"
    await farm.close()


@run_async
async def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0}, max_attempts=3)
    job = await farm.submit()
    deaths = [RayActorError(), ActorUnavailableError("unreachable", None), None]  # None: stream just ends
    for attempt, death in enumerate(deaths, start=1):
        assert await farm.tick() == [(job["id"], "12gb")]
        assert farm.stream(job["id"]).payload["attempt"] == attempt
        await farm.feed(job["id"], started(node=f"node-{attempt}"), progress(1))
        await farm.end(job["id"], raises=death)
        rec = farm.record(job["id"])
        assert rec["attempts"] == attempt
        assert rec["status"] == ("queued" if attempt < 3 else "failed")

    assert [f["message"] for f in rec["failures"]] == [
        "worker died: RayActorError", "worker died: ActorUnavailableError",
        "the worker's stream ended before the job finished"]
    assert [(f["code"], f["node"]) for f in rec["failures"]] == [
        ("worker_died", "node-1"), ("worker_died", "node-2"), ("worker_died", "node-3")]
    assert rec["error"] == {"code": "worker_died", "message": "the worker died 3 times (max_attempts 3): "
                                                             "the worker's stream ended before the job finished"}
    assert rec["finished_at"] and not farm.inbox_has(job["id"]) and farm.queued("12gb") == []
    assert await farm.tick() == [] and len(farm.workers["12gb"].calls) == 3  # never tried again
    await farm.close()


@run_async
async def test_a_generation_error_fails_the_job_at_once(tmp_path):
    farm = Farm(tmp_path)
    job = await farm.submit()
    await farm.tick()
    await farm.end(job["id"], started(), error("generation_failed", "ValueError: bad latent"))
    rec = farm.record(job["id"])
    assert rec["status"] == "failed" and rec["attempts"] == 1
    assert rec["error"] == {"code": "generation_failed", "message": "ValueError: bad latent"}
    # the attempt's record names the manager's failure kind ("error"), the job's error the code
    assert rec["failures"] == [{"code": "error", "message": "ValueError: bad latent", "vram_class": "12gb",
                                "node": "node-1"}]
    assert await farm.tick() == [] and not farm.inbox_has(job["id"])
    await farm.close()


@run_async
async def test_out_of_memory_requeues_the_job_one_class_up(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 1})
    job = await farm.submit()
    assert await farm.tick() == [(job["id"], "12gb")]
    await farm.end(job["id"], started(node="small-node"), progress(1),
                   error("out_of_memory", "CUDA out of memory"))

    rec = farm.record(job["id"])
    assert rec["status"] == "queued" and rec["vram_class"] == "24gb" and rec["home_class"] == "24gb"
    assert rec["attempts"] == 1
    assert rec["failures"] == [{"code": "out_of_memory", "message": "CUDA out of memory",
                                "vram_class": "12gb", "node": "small-node"}]
    assert farm.queued("24gb") == [job["id"]] and farm.queued("12gb") == []

    # the 12gb worker is free too, but the job now needs the larger class
    assert await farm.tick() == [(job["id"], "24gb")]
    assert farm.workers["12gb"].job_ids() == [job["id"]]  # only the first attempt
    assert farm.stream(job["id"]).payload["attempt"] == 2
    assert farm.record(job["id"])["spilled"] is False  # 24gb is its home now
    await farm.end(job["id"], started(node="big-node"), done())
    rec = farm.record(job["id"])
    assert rec["status"] == "succeeded" and rec["vram_class"] == "24gb" and rec["attempts"] == 2
    await farm.close()


@run_async
async def test_out_of_memory_after_a_spill_goes_one_class_above_the_one_that_ran_out(tmp_path):
    farm = Farm(tmp_path, classes=("12gb", "24gb", "40gb"), replicas={"12gb": 1, "24gb": 1, "40gb": 0})
    busy, spilled = await farm.submit(), await farm.submit()
    assert await farm.tick() == [(busy["id"], "12gb"), (spilled["id"], "24gb")]
    await farm.end(spilled["id"], error("out_of_memory", "CUDA out of memory"))
    rec = farm.record(spilled["id"])
    assert rec["status"] == "queued" and rec["vram_class"] == "40gb" and rec["home_class"] == "40gb"
    assert rec["failures"][0]["vram_class"] == "24gb" and farm.queued("40gb") == [spilled["id"]]
    farm.set_replicas(**{"12gb": 1, "24gb": 1, "40gb": 1})
    assert await farm.tick() == [(spilled["id"], "40gb")]  # not back to the idle 24gb worker
    await farm.close()


@run_async
async def test_out_of_memory_on_the_largest_class_fails_with_the_reason(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 1}, max_attempts=5)
    job = await farm.submit()
    await farm.tick()
    await farm.end(job["id"], error("out_of_memory", "CUDA out of memory (12gb)"))
    assert await farm.tick() == [(job["id"], "24gb")]
    await farm.end(job["id"], error("out_of_memory", "CUDA out of memory (24gb)"))
    rec = farm.record(job["id"])
    assert rec["status"] == "failed" and rec["attempts"] == 2 and rec["vram_class"] == "24gb"
    assert rec["error"] == {"code": "out_of_memory",
                            "message": "out of memory on 24gb, the largest VRAM class: CUDA out of memory (24gb)"}
    assert [(f["code"], f["vram_class"]) for f in rec["failures"]] == [("out_of_memory", "12gb"),
                                                                      ("out_of_memory", "24gb")]
    await farm.close()


# --- cancel -----------------------------------------------------------------------------------


@run_async
async def test_cancel_a_queued_job(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    first, second = await farm.submit(), await farm.submit()
    reply = await farm.mgr.cancel(first["id"])
    assert reply["job"]["status"] == "canceled"
    assert reply["job"]["error"] == {"code": "canceled", "message": "canceled by request"}
    assert farm.queued("12gb") == [second["id"]] and (await farm.mgr.get(second["id"]))["queue_position"] == 1
    assert not farm.inbox_has(first["id"]) and farm.inbox_has(second["id"])

    again = await farm.mgr.cancel(first["id"])
    assert again["status"] == 409 and again["error"]["code"] == "not_cancelable"
    missing = await farm.mgr.cancel("no-such-job")
    assert missing["status"] == 404 and missing["error"]["code"] == "not_found"

    farm.set_replicas(**{"12gb": 1})
    assert await farm.tick() == [(second["id"], "12gb")]  # the canceled job never reaches a worker
    assert farm.workers["12gb"].job_ids() == [second["id"]]
    assert farm.status(first["id"]) == "canceled"
    await farm.close()


@run_async
async def test_cancel_a_running_job_stops_its_worker_and_frees_the_slot(tmp_path):
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    job, waiting = await farm.submit(), await farm.submit()
    await farm.tick()
    await farm.feed(job["id"], started(), progress(1), progress(2))
    run = farm.mgr.running[job["id"]]

    reply = await farm.mgr.cancel(job["id"])
    assert reply["job"]["status"] == "canceled" and farm.stream(job["id"]).cancelled
    await asyncio.wait_for(run.task, WAIT_S)  # the stream raises RequestCancelledError
    rec = farm.record(job["id"])
    assert rec["status"] == "canceled" and rec["attempts"] == 0 and rec["result"] is None
    assert "failures" not in rec and rec["error"]["code"] == "canceled"
    assert farm.mgr.running == {} and farm.queued("12gb") == [waiting["id"]]
    assert not farm.inbox_has(job["id"])

    assert await farm.tick() == [(waiting["id"], "12gb")]
    assert farm.status(job["id"]) == "canceled"  # not retried, not failed
    await farm.close()


@run_async
async def test_cancel_right_after_dispatch_never_calls_a_worker_and_frees_the_slot(tmp_path):
    """Canceled between dispatch and the worker call (its task has not run a step yet)."""
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    job, waiting = await farm.submit(), await farm.submit()
    farm.mgr._dispatch()
    run = farm.mgr.running[job["id"]]
    assert farm.status(job["id"]) == "running" and run.stream is None

    reply = await farm.mgr.cancel(job["id"])  # no await point inside: the job's task has not started
    assert reply["job"]["status"] == "canceled"
    await asyncio.wait({run.task}, timeout=WAIT_S)  # ended, or canceled before its first step
    assert run.task.done() and job["id"] not in farm.mgr.running
    assert farm.workers["12gb"].calls == [] and farm.status(job["id"]) == "canceled"

    assert await farm.tick() == [(waiting["id"], "12gb")]  # its slot is free
    await farm.close()


@run_async
async def test_cancel_while_the_input_is_read_never_calls_a_worker(tmp_path):
    """Canceled while the job's task reads its input from the inbox (in a thread)."""
    farm = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    job, waiting = await farm.submit(), await farm.submit()
    entered, gate = threading.Event(), threading.Event()
    real_path = farm.mgr._inbox_path

    class GatedPath:
        def __init__(self, job_id):
            self.path = real_path(job_id)

        def read_bytes(self):
            data = self.path.read_bytes()
            entered.set()
            assert gate.wait(WAIT_S), "the test never opened the gate"
            return data

        def unlink(self, missing_ok=False):
            self.path.unlink(missing_ok=missing_ok)

    farm.mgr._inbox_path = GatedPath
    farm.mgr._dispatch()
    run = farm.mgr.running[job["id"]]
    await wait_until(entered.is_set, "the job's task read its input")
    assert (await farm.mgr.cancel(job["id"]))["job"]["status"] == "canceled"
    gate.set()
    await asyncio.wait_for(run.task, WAIT_S)
    assert farm.workers["12gb"].calls == [] and job["id"] not in farm.mgr.running
    assert farm.status(job["id"]) == "canceled"
    farm.mgr._inbox_path = real_path
    assert await farm.tick() == [(waiting["id"], "12gb")]
    await farm.close()


# --- restart recovery --------------------------------------------------------------------------


@run_async
async def test_a_new_manager_over_the_same_store_resumes_queued_and_running_jobs(tmp_path):
    old = Farm(tmp_path, replicas={"12gb": 1, "24gb": 0})
    # rendered, but storage was down: its files wait in the worker's spool ("uploading")
    spooled = await old.submit()
    await old.tick()
    await old.end(spooled["id"], started(), done(key="jobs/s/video.mp4", uploaded=False))
    assert old.record(spooled["id"])["detail"] == "uploading" and old.status(spooled["id"]) == "running"
    # out of memory on 12gb: queued for 24gb, which has no worker yet
    raised = await old.submit()
    await old.tick()
    await old.end(raised["id"], error("out_of_memory", "CUDA out of memory"))
    assert old.record(raised["id"])["home_class"] == "24gb"
    # running on the 12gb worker when the farm goes away
    running = await old.submit()
    assert await old.tick() == [(running["id"], "12gb")]
    await old.feed(running["id"], started(node="node-1"), progress(2))
    queued = await old.submit()
    canceled = await old.submit()
    await old.mgr.cancel(canceled["id"])
    assert [old.status(j["id"]) for j in (spooled, raised, running, queued, canceled)] == [
        "running", "queued", "running", "queued", "canceled"]

    # the farm restarts: a new manager (new workers) over the same job store; the old one is gone
    new = Farm(tmp_path, replicas={"12gb": 1, "24gb": 1})
    assert new.queued("12gb") == [running["id"], queued["id"]]
    assert new.queued("24gb") == [raised["id"]]
    rec = new.record(running["id"])
    assert rec["status"] == "queued" and rec["note"] == "requeued after a farm restart"
    assert rec["node"] is None and rec["progress"] is None
    assert rec["attempts"] == 0  # a restart is not the job's fault
    assert new.record(raised["id"])["attempts"] == 1 and "note" not in new.record(raised["id"])
    assert new.status(spooled["id"]) == "running" and spooled["id"] not in new.mgr.scheduler
    assert new.status(canceled["id"]) == "canceled" and canceled["id"] not in new.mgr.scheduler
    assert [(await new.mgr.get(j["id"]))["queue_position"] for j in (running, queued, raised)] == [1, 2, 1]
    later = await new.submit()
    assert new.record(later["id"])["seq"] > new.record(canceled["id"])["seq"]  # submission order goes on
    assert new.queued("12gb") == [running["id"], queued["id"], later["id"]]

    # the new workers take them: the interrupted job at home, the raised one on 24gb
    assert await new.tick() == [(running["id"], "12gb"), (raised["id"], "24gb")]
    assert new.stream(running["id"]).payload["attempt"] == 1
    assert new.stream(raised["id"]).payload["attempt"] == 2
    await new.end(running["id"], started(node="node-2"), done())
    await new.end(raised["id"], started(node="node-3"), done())
    assert new.status(running["id"]) == "succeeded" and new.record(running["id"])["attempts"] == 1
    assert new.status(raised["id"]) == "succeeded" and new.record(raised["id"])["vram_class"] == "24gb"

    # the spooled job's worker reports its upload to the new manager
    spooled_done = done(key="jobs/s/video.mp4")
    assert await new.mgr.upload_finished(spooled["id"], spooled_done) is True
    rec = new.record(spooled["id"])
    assert rec["status"] == "succeeded" and rec["detail"] is None and rec["result"]["key"] == "jobs/s/video.mp4"
    assert await new.mgr.upload_finished(spooled["id"], spooled_done) is False  # once only
    await new.close()
    await old.close()


@run_async
async def test_callers_share_a_class_by_owner_and_keep_their_turns_across_a_restart(tmp_path):
    old = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    batch = [(await old.submit(owner="batch-team"))["id"] for _ in range(4)]
    alice = await old.submit(owner="alice")
    # fair sharing: alice's one job goes first (a newcomer wins the tie), not after all four
    assert alice["queue_position"] == 1
    order = [alice["id"], *batch]
    assert old.queued("12gb") == order
    await old.close()

    new = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})  # restart recovery passes each job's owner
    assert [(j.id, j.caller) for j in new.mgr.scheduler.queued("12gb")] == [
        (i, "alice" if i == alice["id"] else "batch-team") for i in order]
    assert [(await new.mgr.get(i))["queue_position"] for i in order] == [1, 2, 3, 4, 5]
    new.set_replicas(**{"12gb": 1, "24gb": 0})
    assert await new.tick() == [(alice["id"], "12gb")]
    await new.end(alice["id"], done())
    assert await new.tick() == [(batch[0], "12gb")]
    await new.close()


@run_async
async def test_recovery_fails_a_job_that_no_class_fits_any_more(tmp_path):
    old = Farm(tmp_path, replicas={"12gb": 0, "24gb": 0})
    big, small = await old.submit(BIG), await old.submit()
    assert big["vram_class"] == "24gb"
    await old.close()

    new = Farm(tmp_path, classes=("12gb",), replicas={"12gb": 0})  # the 24gb class was removed
    rec = new.record(big["id"])
    assert rec["status"] == "failed" and rec["error"]["code"] == "no_class_fits"
    assert "exceeds the largest VRAM class 12gb" in rec["error"]["message"]
    assert new.queued("12gb") == [small["id"]]
    await new.close()
