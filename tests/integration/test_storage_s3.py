"""Results in S3 (moto's standalone server over HTTP, through the `minio` client), checked with
a second client (boto3) and a plain HTTP client; the farm survives the store going away."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from serving.config import load_settings
from serving.storage import S3Storage, StorageUnavailable, open_storage
from tests.helpers import ffprobe
from tests.integration.conftest import deploy, png_bytes, undeploy
from tests.integration.s3_server import S3Server

WORKERS = {"12gb": {"min_replicas": 2, "max_replicas": 2}, "24gb": {"min_replicas": 1, "max_replicas": 1}}


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


def _store(s3, bucket="unit-bucket") -> S3Storage:
    return open_storage(load_settings(s3.settings(bucket), env={}))


def test_s3_storage_round_trip_with_a_second_client(s3, tmp_path):
    store = _store(s3)
    small = tmp_path / "a.json"
    small.write_text('{"x": 1}')
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(17 * 2**20))  # above the part size: a multipart upload
    store.put_file("jobs/2026/01/02/abc/params.json", small)  # creates the bucket
    put = store.put_file("jobs/2026/01/02/abc/video.mp4", big)
    assert "-" in put.etag  # multipart ETag
    assert store.stat("jobs/2026/01/02/abc/video.mp4").size == big.stat().st_size
    assert store.get_bytes("jobs/2026/01/02/abc/params.json") == b'{"x": 1}'
    assert store.stat("jobs/nope") is None
    with pytest.raises(KeyError):
        store.get_bytes("jobs/nope")

    other = s3.boto3()
    head = other.head_object(Bucket="unit-bucket", Key="jobs/2026/01/02/abc/video.mp4")
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == big.stat().st_size
    keys = [o["Key"] for o in other.list_objects_v2(Bucket="unit-bucket", Prefix="jobs/")["Contents"]]
    assert keys == ["jobs/2026/01/02/abc/params.json", "jobs/2026/01/02/abc/video.mp4"]

    url = store.presigned_url("jobs/2026/01/02/abc/params.json", 600)
    assert "X-Amz-Signature" in url and "X-Amz-Expires=600" in url
    assert requests.get(url, timeout=10).content == b'{"x": 1}'

    assert store.delete_prefix("jobs/2026/01/02/abc/") == 2
    assert list(store.list("jobs/")) == []


def test_unreachable_s3_is_a_storage_error_not_a_hang(tmp_path):
    dead = S3Server()  # never started: connection refused
    store = open_storage(load_settings(dead.settings(), env={}))
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.put_bytes("jobs/x", b"data")
    assert time.monotonic() - started < 15


def test_presigned_urls_are_signed_for_the_public_endpoint(s3):
    settings = load_settings({**s3.settings("pub-bucket"), "s3_public_endpoint": "https://files.example.org"},
                             env={})
    url = open_storage(settings).presigned_url("jobs/k/video.mp4", 300)
    assert url.startswith("https://files.example.org/pub-bucket/jobs/k/video.mp4?")


@pytest.fixture(scope="module")
def s3_farm(ray_cluster, tmp_path_factory):
    """The farm storing in bucket `farm-results` of its own S3 server (one deployment for the two
    farm tests; the outage test stops and restarts that server, so it runs last)."""
    server = S3Server().start()
    try:
        yield deploy(ray_cluster, tmp_path_factory.mktemp("s3-farm"), workers=WORKERS,
                     **server.settings("farm-results")), server
    finally:
        try:
            undeploy()
        finally:
            server.stop()


def test_farm_stores_results_in_s3_and_redirects_to_a_presigned_url(s3_farm, tmp_path):
    farm, s3 = s3_farm
    job = farm.submit_ok(image=png_bytes(160, 120), resolution="512p", num_frames=8, num_inference_steps=5)
    done = farm.wait(job["id"])
    assert done["status"] == "succeeded", done
    prefix = done["prefix"]
    assert prefix.startswith("jobs/") and prefix.endswith(f"/{job['id']}/")

    other = s3.boto3()
    listed = other.list_objects_v2(Bucket="farm-results", Prefix=prefix)["Contents"]
    assert sorted(o["Key"][len(prefix):] for o in listed) == ["input.png", "params.json", "poster.jpg",
                                                                "video.mp4"]
    head = other.head_object(Bucket="farm-results", Key=prefix + "video.mp4")
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == done["result"]["bytes"]
    assert other.get_object(Bucket="farm-results", Key=prefix + "input.png")["Body"].read() == png_bytes(160, 120)

    r = requests.get(farm.url + done["result"]["url"], allow_redirects=False, timeout=10)
    assert r.status_code == 307
    presigned = r.headers["location"]
    assert presigned.startswith(f"http://{s3.endpoint}/farm-results/{prefix}video.mp4?")
    video = requests.get(presigned, timeout=10)  # a plain HTTP client, no credentials
    assert video.status_code == 200
    path = tmp_path / "from-s3.mp4"
    path.write_bytes(video.content)
    stream = ffprobe(path)
    assert int(stream["nb_read_frames"]) == 8 and stream["codec_name"] == "h264"
    poster = requests.get(farm.url + done["result"]["poster_url"], timeout=10)  # follows the redirect
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"


def test_s3_down_mid_run_loses_no_result(s3_farm):
    """The store goes away while jobs render and comes back later: every job ends `succeeded`
    with all its files stored, none is rendered twice. (moto keeps objects in memory, so the
    restarted server starts empty: the files of these jobs can only come from the spools.)"""
    farm, server = s3_farm
    server.stop()  # the store is down before the jobs finish (jobs are still accepted)
    jobs = [farm.submit_ok(resolution="512p", num_frames=16, num_inference_steps=40) for _ in range(4)]
    spooled = [farm.wait(j["id"], statuses=("running",), until=lambda j: j.get("detail") == "uploading",
                         timeout=120) for j in jobs]
    assert all(j["status"] == "running" and j["result"] is None for j in spooled)
    spool = Path(os.environ["I2V_CACHE_DIR"]) / "spool"
    assert {j["id"] for j in jobs} <= {p.name for p in spool.iterdir() if (p / "manifest.json").exists()}
    time.sleep(2)
    assert all(farm.job(j["id"])["status"] == "running" for j in jobs)  # not succeeded while unstored

    server.start()  # same port, an empty server
    done = [farm.wait(j["id"], timeout=120) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 4, done
    assert all(d["attempts"] == 1 for d in done)  # rendered once, uploaded later
    other = server.boto3()
    for d in done:
        keys = {o["Key"] for o in other.list_objects_v2(Bucket="farm-results", Prefix=d["prefix"])["Contents"]}
        assert keys == {d["prefix"] + n for n in ("input.png", "params.json", "poster.jpg", "video.mp4")}
        size = other.head_object(Bucket="farm-results", Key=d["prefix"] + "video.mp4")["ContentLength"]
        assert size == d["result"]["bytes"]
    assert not [p for p in spool.iterdir() if p.name in {j["id"] for j in jobs}]  # spools emptied


def test_gc_on_s3_deletes_old_job_prefixes(s3):
    from datetime import datetime, timedelta, timezone

    from serving.retention import collect_garbage

    store = _store(s3, "gc-bucket")
    job = "cd" * 16
    store.put_bytes(f"jobs/2026/05/05/{job}/video.mp4", b"v" * 100)
    store.put_bytes(f"jobs/2026/05/05/{job}/params.json", b"{}")
    store.put_bytes("other/keep.txt", b"not a job")
    now = datetime.now(timezone.utc)
    assert collect_garbage(store, timedelta(hours=1), now=now).jobs == 0
    report = collect_garbage(store, timedelta(hours=1), now=now + timedelta(hours=2))
    assert report.prefixes == [f"jobs/2026/05/05/{job}/"] and report.files == 2 and report.bytes == 102
    assert [o["Key"] for o in s3.boto3().list_objects_v2(Bucket="gc-bucket")["Contents"]] == ["other/keep.txt"]
