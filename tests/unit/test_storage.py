"""Local-file storage, job key layout, the spool, and `i2v-farm gc` (no servers)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from serving.retention import RetentionError, collect_garbage, parse_age
from serving.storage import LocalStorage, StorageUnavailable, job_prefix
from serving.uploader import BackgroundUploader, Spool

JOB = "0123456789abcdef0123456789abcdef"


def test_job_prefix_is_the_utc_day_and_the_id():
    assert job_prefix(JOB, "2026-03-04T23:30:00-02:00") == f"jobs/2026/03/05/{JOB}/"
    with pytest.raises(ValueError):
        job_prefix("../etc", "2026-03-04T00:00:00+00:00")


def test_local_storage_round_trip_and_no_escape(tmp_path):
    store = LocalStorage(tmp_path / "out")
    src = tmp_path / "v.mp4"
    src.write_bytes(b"video")
    put = store.put_file(f"jobs/2026/01/01/{JOB}/video.mp4", src)
    assert put.size == 5 and put.etag == hashlib.md5(b"video").hexdigest()
    assert store.get_bytes(f"jobs/2026/01/01/{JOB}/video.mp4") == b"video"
    assert [o.key for o in store.list("jobs/")] == [f"jobs/2026/01/01/{JOB}/video.mp4"]
    with pytest.raises(ValueError):
        store.put_bytes("../../evil", b"x")
    with pytest.raises(KeyError):
        store.get_bytes("jobs/none")
    assert store.delete_prefix(f"jobs/2026/01/01/{JOB}/") == 1
    assert not (tmp_path / "out" / "jobs").exists()  # empty day directories go too


class FlakyStore(LocalStorage):
    """Local files that refuse writes while `down` is set."""

    down = True

    def put_file(self, key, source, content_type_=None):
        if self.down:
            raise StorageUnavailable("connection refused")
        return super().put_file(key, source, content_type_)


def test_spool_keeps_results_until_storage_takes_them(tmp_path):
    store = FlakyStore(tmp_path / "store")
    spool = Spool(tmp_path / "spool", store)
    video = tmp_path / "render" / "video.mp4"
    video.parent.mkdir()
    video.write_bytes(b"\0" * 1000)
    spool.add(JOB, f"jobs/2026/01/01/{JOB}/", {"video.mp4": video, "params.json": b"{}"}, {"result": 1})
    with pytest.raises(StorageUnavailable):
        spool.upload(JOB)
    assert (tmp_path / "spool" / JOB / "video.mp4").stat().st_size == 1000

    done = []
    uploader = BackgroundUploader(spool, lambda job_id, result: done.append((job_id, result)))
    uploader.submit(JOB)
    time.sleep(1.5)
    assert done == [] and uploader.pending() == [JOB]
    store.down = False
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done == [(JOB, {"result": 1})]
    assert store.get_bytes(f"jobs/2026/01/01/{JOB}/video.mp4") == b"\0" * 1000
    time.sleep(0.2)
    assert not (tmp_path / "spool" / JOB).exists()


def test_an_orphaned_spool_is_taken_over_by_one_owner_only(tmp_path):
    store = LocalStorage(tmp_path / "store")
    first = Spool(tmp_path / "spool", store)
    first.add(JOB, f"jobs/2026/01/01/{JOB}/", {"params.json": b"{}"}, {})
    # while the first owner (this process's lock) lives, another process cannot claim it
    code = ("import sys; from serving.uploader import Spool; from serving.storage import LocalStorage; "
            "print(Spool(sys.argv[1], LocalStorage(sys.argv[2])).claim_orphans())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spool"), str(tmp_path / "store")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    os.close(first._locks.pop(JOB))  # the owner dies: its lock goes with it
    second, third = Spool(tmp_path / "spool", store), Spool(tmp_path / "spool", store)
    assert second.claim_orphans() == [JOB]
    assert third.claim_orphans() == []  # one owner only
    assert second.upload(JOB)["uploaded"] and store.exists(f"jobs/2026/01/01/{JOB}/params.json")


def test_parse_age():
    assert parse_age("30d") == timedelta(days=30) and parse_age("12h") == timedelta(hours=12)
    assert parse_age("1.5w") == timedelta(days=10.5)
    with pytest.raises(RetentionError):
        parse_age("30 days")


def test_gc_deletes_only_jobs_older_than_the_cutoff(tmp_path):
    store = LocalStorage(tmp_path / "out")
    old, new = "aa" * 16, "bb" * 16
    for job, day in ((old, "2026/01/01"), (new, "2026/11/20")):
        for name in ("video.mp4", "params.json"):
            store.put_bytes(f"jobs/{day}/{job}/{name}", b"x" * 10)
    stamp = (datetime.now(timezone.utc) - timedelta(days=40)).timestamp()
    for f in (tmp_path / "out" / "jobs" / "2026" / "01").rglob("*"):
        os.utime(f, (stamp, stamp))
    dry = collect_garbage(store, timedelta(days=30), dry_run=True)
    assert dry.prefixes == [f"jobs/2026/01/01/{old}/"] and dry.files == 2 and dry.bytes == 20
    assert store.exists(f"jobs/2026/01/01/{old}/video.mp4")

    proc = subprocess.run([sys.executable, "-m", "serving.cli", "gc", "--older-than", "30d",
                           "--storage", f"file://{tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"jobs/2026/01/01/{old}/"] and "deleted 1 jobs" in proc.stderr
    assert not store.exists(f"jobs/2026/01/01/{old}/video.mp4")
    assert store.exists(f"jobs/2026/11/20/{new}/video.mp4")

    bad = subprocess.run([sys.executable, "-m", "serving.cli", "gc", "--storage", f"file://{tmp_path}"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "I2V_RETENTION_DAYS": ""})
    assert bad.returncode == 2 and "--older-than" in bad.stderr
