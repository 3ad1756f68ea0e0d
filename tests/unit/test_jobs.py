"""The job lifecycle types (`serving.jobs`): the strings they stand for are the ones the job store
keeps and the HTTP API returns, and the worker protocol reads and writes the same dicts as before."""

from __future__ import annotations

import json
import sqlite3
import typing

import pytest

from serving import api, client, info, job_store, protocol
from serving.jobs import (
    ACTIVE,
    FINISHED,
    CanceledEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FailureKind,
    JobDetail,
    JobStatus,
    ProgressEvent,
    RenderRequest,
    RenderRequestError,
    StartedEvent,
    WorkerEventError,
    is_finished,
    parse_worker_event,
)
from serving.scheduler import FAILURE_KINDS
from tests.unit.test_web_assets_and_estimate import settings


def test_statuses_are_the_stored_strings():
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "canceled"]
    assert JobStatus.QUEUED == "queued" and isinstance(JobStatus.QUEUED, str)
    assert str(JobStatus.RUNNING) == f"{JobStatus.RUNNING}" == "running"
    assert json.dumps({"status": JobStatus.FAILED}) == '{"status": "failed"}'
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (s TEXT)")
    db.execute("INSERT INTO t VALUES (?)", (JobStatus.CANCELED,))
    assert db.execute("SELECT s FROM t WHERE s = 'canceled'").fetchone() == ("canceled",)
    assert JobDetail.UPLOADING == "uploading"
    # the other lists of them are these
    assert job_store.STATUSES == tuple(s.value for s in JobStatus)
    assert typing.get_args(protocol.Status) == job_store.STATUSES


def test_one_definition_of_finished():
    assert FINISHED == {"succeeded", "failed", "canceled"} and ACTIVE == {"queued", "running"}
    assert [s for s in JobStatus if s.finished] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED]
    assert [s for s in JobStatus if s.active] == [JobStatus.QUEUED, JobStatus.RUNNING]
    assert JobStatus("failed").finished and not JobStatus("running").finished
    assert is_finished("canceled") and not is_finished("queued") and not is_finished(None)
    assert "succeeded" in FINISHED  # plain strings, as read back from the store, hash alike
    assert job_store.TERMINAL is FINISHED and api.TERMINAL is FINISHED and client.TERMINAL is FINISHED


def test_the_web_page_gets_the_statuses_from_info():
    statuses = info.farm_info(settings())["statuses"]
    assert statuses == {"all": ["queued", "running", "succeeded", "failed", "canceled"],
                        "active": ["queued", "running"], "finished": ["succeeded", "failed", "canceled"]}
    js = (info.WEB_DIR / "app.js").read_text()
    assert '"succeeded", "failed", "canceled"' not in js and "state.info.statuses" in js


def test_failure_kinds_and_their_codes():
    assert FAILURE_KINDS == ("oom", "worker_died", "error") == tuple(FailureKind)
    # what a failed attempt's `failures` entry carries, and the job's `error` when it is given up
    assert {k.value: k.code for k in FailureKind} == {"oom": "out_of_memory", "worker_died": "worker_died",
                                                      "error": "error"}
    assert {k.value: k.fail_code for k in FailureKind} == {"oom": "out_of_memory", "worker_died": "worker_died",
                                                           "error": "generation_failed"}
    assert FailureKind.of_error("out_of_memory") is FailureKind.OOM
    assert FailureKind.of_error("generation_failed") is FailureKind.ERROR is FailureKind.of_error(None)
    assert ErrorEvent(code=ErrorCode.OUT_OF_MEMORY, message="m").kind is FailureKind.OOM


EVENTS = [
    {"event": "started", "node": "n1", "replica": "Worker_12gb#1", "vram_class": "12gb", "pid": 7, "threads": 4,
     "stats": {"node": "n1", "gpu": "0"}},
    {"event": "started", "node": "n1"},
    {"event": "progress", "step": 3, "total": 30},
    {"event": "done", "result": {"key": "jobs/x/video.mp4", "bytes": 10, "frames": 8, "width": 64, "height": 64,
                                 "fps": 8},
     "timings": {"denoise": 1.25, "total": 2.0}, "peak_vram_bytes": None, "device": "sim", "model": "sim",
     "uploaded": False, "upload_error": "storage unreachable"},
    {"event": "error", "code": "out_of_memory", "message": "out of GPU memory"},
    {"event": "error"},
    {"event": "canceled"},
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e["event"])
def test_worker_events_round_trip(event):
    parsed = parse_worker_event(event)
    assert parsed.event == event["event"]
    assert parsed.to_dict() == event  # extra fields (stats) travel on; nothing is added
    assert json.dumps(parsed.to_dict()) == json.dumps(event)


def test_events_built_by_the_worker_are_the_dicts_it_sent_before():
    assert StartedEvent(node="n", replica="r", vram_class="12gb", pid=1, threads=2).to_dict() == {
        "event": "started", "node": "n", "replica": "r", "vram_class": "12gb", "pid": 1, "threads": 2}
    assert ProgressEvent(step=1, total=2).to_dict() == {"event": "progress", "step": 1, "total": 2}
    assert CanceledEvent().to_dict() == {"event": "canceled"}
    assert ErrorEvent(code="out_of_memory", message="m").to_dict() == {
        "event": "error", "code": "out_of_memory", "message": "m"}
    done = {"result": {"key": "k"}, "timings": {"total": 1.5}, "peak_vram_bytes": 5, "device": "cpu", "model": "x",
            "uploaded": True}
    assert DoneEvent(**done).to_dict() == {"event": "done", **done}
    ev = parse_worker_event({"event": "done", "result": {}, "timings": {}, "peak_vram_bytes": 1})
    assert ev.uploaded is True and ev.upload_error is None  # the defaults the manager assumed


@pytest.mark.parametrize("event, message", [
    ({"event": "progress", "step": 1}, "malformed worker event 'progress': total: Field required"),
    ({"event": "progress", "step": "one", "total": 2}, "'progress': step: Input should be a valid integer"),
    ({"event": "started"}, "malformed worker event 'started': node: Field required"),
    ({"event": "done", "result": {}, "timings": {"total": "slow"}, "peak_vram_bytes": 1},
     "'done': timings.total: Input should be a valid number"),
    ({"event": "done", "timings": {}, "peak_vram_bytes": 1}, "'done': result: Field required"),
    ({"event": "finished"}, "unknown worker event 'finished' (expected one of started, progress, done, error"),
    ({"step": 1}, "unknown worker event None"),
    (["progress", 1], "a worker event must be a dict, got list"),
])
def test_a_malformed_worker_event_is_refused_saying_what_is_wrong(event, message):
    with pytest.raises(WorkerEventError) as err:
        parse_worker_event(event)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_render_request_from_the_managers_payload():
    payload = {"id": "a" * 32, "params": {"prompt": "a cat", "num_inference_steps": 4}, "image": b"\x89PNG...",
               "attempt": 2, "prefix": "jobs/2026/11/26/aaaa/", "input_name": "input.png"}
    req = RenderRequest.parse(payload)
    assert (req.id, req.attempt, req.image, req.input_key) == ("a" * 32, 2, b"\x89PNG...",
                                                               "jobs/2026/11/26/aaaa/input.png")
    assert req.to_dict() == payload and RenderRequest.parse(req) is req
    assert RenderRequest(**{k: v for k, v in payload.items() if k != "attempt"}).attempt == 1


@pytest.mark.parametrize("change, message", [
    ({"prefix": None}, "prefix: Input should be a valid string"),
    ({"attempt": 0}, "attempt: Input should be greater than or equal to 1"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
])
def test_a_bad_render_request_is_refused(change, message):
    payload = {"id": "j1", "params": {}, "image": b"x" * 1000, "attempt": 1, "prefix": "p/", "input_name": "input.png"}
    with pytest.raises(RenderRequestError) as err:
        RenderRequest.parse({**payload, **change})
    assert "malformed render request for job 'j1'" in str(err.value) and message in str(err.value)
    assert "xxxx" not in str(err.value)  # never the image


def test_the_manager_retries_an_attempt_whose_worker_sent_a_malformed_event(tmp_path):
    from tests.unit.test_manager import Farm, run_async, started

    @run_async
    async def scenario():
        farm = Farm(tmp_path)
        job = await farm.submit()
        assert type(job["status"]) is str and job["status"] == "queued"  # the store hands back plain strings
        await farm.tick()
        assert farm.stream(job["id"]).payload == RenderRequest.parse(farm.stream(job["id"]).payload).to_dict()
        await farm.end(job["id"], started(), {"event": "progress", "step": 1})
        rec = farm.record(job["id"])
        assert rec["status"] == "queued" and rec["attempts"] == 1
        assert rec["failures"][0]["code"] == "worker_died"
        assert rec["failures"][0]["message"] == ("WorkerEventError: malformed worker event 'progress': "
                                                 "total: Field required")
        await farm.close()

    scenario()


def test_job_records_read_the_rows_the_manager_stores(tmp_path):
    from serving.jobs import JobRecord, JobRecordError
    from tests.unit.test_manager import Farm, done, run_async, started

    @run_async
    async def scenario():
        farm = Farm(tmp_path)
        job = await farm.submit()
        queued = JobRecord.parse(farm.record(job["id"]))
        assert queued.status is JobStatus.QUEUED and not queued.finished and queued.attempts == 0
        assert queued.to_dict() == farm.record(job["id"])  # nothing lost, nothing added
        await farm.tick()
        await farm.end(job["id"], started(), done())
        rec = farm.record(job["id"])
        succeeded = JobRecord.parse(rec)
        assert succeeded.status is JobStatus.SUCCEEDED and succeeded.finished and succeeded.detail is None
        assert succeeded.to_dict() == rec and succeeded.result["key"] == "jobs/x/video.mp4"
        # an old row (before prefix, input and owner existed) still reads
        old = {k: v for k, v in rec.items() if k not in ("prefix", "input", "owner", "failures", "home_class")}
        assert JobRecord.parse(old).owner == "anonymous"
        with pytest.raises(JobRecordError, match=r"malformed job record '.*': status: Input should be 'queued'"):
            JobRecord.parse({**rec, "status": "done"})
        await farm.close()

    scenario()
