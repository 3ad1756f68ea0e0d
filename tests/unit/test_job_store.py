"""The durable job store: records survive the process, pages are stable, keys are idempotent."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from serving.job_store import JobStore


def rec(i: int, status: str = "queued") -> dict:
    return {"id": f"job{i:03d}", "status": status, "created_at": f"2026-01-01T00:00:{i % 60:02d}",
            "params": {"prompt": f"p{i}"}, "progress": {"step": 0, "total": 10}}


def test_records_survive_another_process(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    store = JobStore(db)
    store.create(rec(1))
    store.update("job001", status="running", progress={"step": 3, "total": 10}, node="n1")
    store.close()
    # a different process (a restarted farm) reads it back
    code = ("import json,sys; from serving.job_store import JobStore; s=JobStore(sys.argv[1]); "
            "print(json.dumps([r['id'] + ':' + r['status'] for r in s.with_status(['queued','running'])]))")
    out = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '["job001:running"]'
    again = JobStore(db).get("job001")
    assert again["progress"] == {"step": 3, "total": 10} and again["node"] == "n1"
    assert again["params"] == {"prompt": "p1"}


def test_idempotency_key_returns_the_first_job(tmp_path):
    store = JobStore(tmp_path / "j.sqlite3")
    first, created = store.create(rec(1), idempotency_key="abc")
    second, created2 = store.create(rec(2), idempotency_key="abc")
    assert created and not created2 and second["id"] == first["id"] == "job001"
    assert store.get("job002") is None
    assert store.find_by_key("abc")["id"] == "job001" and store.find_by_key("zzz") is None


def test_list_pages_newest_first_with_a_status_filter(tmp_path):
    store = JobStore(tmp_path / "j.sqlite3")
    for i in range(25):
        store.create(rec(i, "succeeded" if i % 2 else "queued"))
    seen, cursor = [], None
    while True:
        page, cursor = store.list(status="succeeded", limit=5, cursor=cursor)
        seen += [r["id"] for r in page]
        if cursor is None:
            break
    assert seen == [f"job{i:03d}" for i in range(23, 0, -2)]
    assert store.counts() == {"queued": 13, "running": 0, "succeeded": 12, "failed": 0, "canceled": 0}


def test_bad_status_and_unknown_job_are_refused(tmp_path):
    store = JobStore(tmp_path / "j.sqlite3")
    with pytest.raises(ValueError):
        store.create(rec(1, "done"))
    store.create(rec(1))
    with pytest.raises(ValueError):
        store.update("job001", status="paused")
    with pytest.raises(KeyError):
        store.update("nope", status="running")
    assert store.get("job001")["status"] == "queued"


def test_concurrent_updates_lose_nothing(tmp_path):
    store = JobStore(tmp_path / "j.sqlite3")
    for i in range(8):
        store.create(rec(i))

    def work(i):
        for step in range(1, 51):
            store.update(f"job{i:03d}", progress={"step": step, "total": 50})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(store.get(f"job{i:03d}")["progress"]["step"] == 50 for i in range(8))
