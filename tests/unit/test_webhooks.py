"""Webhooks and result reuse without Ray (issue 18): the request fields, signing, the secrets file,
the reuse key, the job store's tables, and the dispatcher delivering to a real loopback receiver
(retries with backoff, give-ups, a restart that loses nothing, an event loop that never waits)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from datetime import datetime, timezone

import pytest

from pipeline.errors import InvalidRequest
from serving import egress
from serving.config import load_settings
from serving.egress import EgressPolicy
from serving.job_store import JobStore
from serving.reuse import gpu_seconds, pop_reuse, reuse_key
from serving.webhooks import (
    EVENTS,
    MAX_BACKOFF_S,
    SecretStore,
    WebhookDispatcher,
    backoff_s,
    check_url,
    parse_events,
    pop_webhook,
    secrets_path,
    sign,
    verify,
)
from tests.helpers import webhook_receiver

PUBLIC = "93.184.216.34"


@pytest.fixture
def dns():
    """Simulated DNS: host -> addresses."""
    table = {"hooks.example.com": [PUBLIC], "rebind.example.com": [PUBLIC], "inside.example.com": ["10.1.2.3"]}
    old = egress.set_resolver(lambda host, port: table.get(host, []))
    yield table
    egress.set_resolver(old)


# --- the request fields --------------------------------------------------------------------------


def test_webhook_events_default_to_all_and_bad_ones_name_the_field():
    assert parse_events(None) == list(EVENTS) and parse_events("all") == list(EVENTS)
    assert parse_events("failed, succeeded") == ["succeeded", "failed"]
    assert parse_events(["canceled"]) == ["canceled"]
    for bad in ("done", ["succeeded", "nope"], 3, [1]):
        with pytest.raises(InvalidRequest) as err:
            parse_events(bad)
        assert err.value.field == "webhook_events" and err.value.http_status == 422


def test_webhook_url_must_be_https_public_or_allowed(dns):
    policy = EgressPolicy()
    assert check_url("https://hooks.example.com/i2v?x=1", policy) == "https://hooks.example.com/i2v?x=1"
    refused = {
        "http://hooks.example.com/": "https",             # http to a host egress_allow does not list
        "ftp://hooks.example.com/": "https",
        "https://127.0.0.1:9/": "loopback",
        "https://inside.example.com/": "private",
        "https://169.254.169.254/latest": "metadata",
        "https://user:pw@hooks.example.com/": "credentials",
        "https://nowhere.example.com/": "resolve",
        "https://hooks.example.com:99999/": "valid URL",
        "https://" + "a" * 2100 + ".com/": "at most",
    }
    for url, why in refused.items():
        with pytest.raises(InvalidRequest) as err:
            check_url(url, policy)
        assert err.value.field == "webhook" and why in err.value.message, (url, err.value.message)
    with pytest.raises(InvalidRequest) as err:
        check_url(123, policy)
    assert err.value.field == "webhook"
    allowed = EgressPolicy(["127.0.0.1", "inside.example.com"])
    assert check_url("http://127.0.0.1:8123/hook", allowed)  # http where egress_allow permits
    assert check_url("http://inside.example.com/hook", allowed)
    fields = {"webhook": "https://hooks.example.com/h", "webhook_events": "failed", "prompt": "x"}
    assert pop_webhook(fields, policy) == {"url": "https://hooks.example.com/h", "events": ["failed"]}
    assert fields == {"prompt": "x"}
    assert pop_webhook({"webhook": ""}, policy) is None
    with pytest.raises(InvalidRequest) as err:
        pop_webhook({"webhook_events": "failed"}, policy)
    assert err.value.field == "webhook_events"


def test_reuse_field():
    for value, want in ((None, True), (True, True), (False, False), ("false", False), ("0", False), ("true", True),
                        ("", True)):
        fields = {"reuse": value} if value is not None else {}
        assert pop_reuse(fields) is want and "reuse" not in fields
    with pytest.raises(InvalidRequest) as err:
        pop_reuse({"reuse": "maybe"})
    assert err.value.field == "reuse"


# --- signing and secrets -------------------------------------------------------------------------


def test_signature_verifies_only_the_same_body_secret_and_a_fresh_timestamp():
    body = b'{"id": "abc"}'
    now = int(time.time())
    headers = {"X-I2V-Timestamp": str(now), "X-I2V-Signature": sign("s3cret", now, body)}
    assert headers["X-I2V-Signature"].startswith("sha256=") and len(headers["X-I2V-Signature"]) == 7 + 64
    assert verify("s3cret", headers, body)
    assert verify("s3cret", {k.lower(): v for k, v in headers.items()}, body)
    assert not verify("other", headers, body)
    assert not verify("s3cret", headers, body + b" ")
    assert not verify("s3cret", headers, body, now=now + 3600)  # a replay an hour later
    assert not verify("s3cret", {**headers, "X-I2V-Timestamp": str(now + 1)}, body)  # the timestamp is signed


def test_secret_store_file_is_0600_and_token_secrets_fall_back_to_the_farm_secret(tmp_path):
    settings = load_settings({"job_db": str(tmp_path / "db" / "jobs.sqlite3")}, env={})
    path = secrets_path(settings)
    assert path == tmp_path / "db" / "webhook_secrets.json"
    store = SecretStore(path)
    farm = store.farm_secret()
    assert farm.startswith("whsec_") and store.farm_secret() == farm
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    alice = store.create("alice")
    assert alice != farm and store.secret_for("alice") == alice
    assert store.secret_for("bob") == farm  # no secret of its own (a token made before webhooks)
    assert store.create("alice") != alice  # rotated
    assert store.remove("alice") and store.secret_for("alice") == farm
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_backoff_doubles_up_to_a_cap():
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_s(30) == 300
    assert [backoff_s(n, 0.25) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1, 2]  # `webhook_backoff_s` first
    assert backoff_s(40, 0.25) == MAX_BACKOFF_S


def test_the_first_retry_delay_setting_defaults_to_one_second_and_must_be_positive():
    assert load_settings({}, env={}).webhook_backoff_s == 1.0
    assert load_settings({}, env={"I2V_WEBHOOK_BACKOFF_S": "0.5"}).webhook_backoff_s == 0.5
    for bad in (0, -1, 301, "soon"):
        with pytest.raises(ValueError, match="webhook_backoff_s"):
            load_settings({"webhook_backoff_s": bad}, env={})


# --- reuse key ----------------------------------------------------------------------------------


def test_reuse_key_covers_what_changes_the_video_and_nothing_else():
    params = {"prompt": "waves", "negative_prompt": "", "resolution": "512p", "num_frames": 8, "fps": 8,
              "target_fps": 16, "num_inference_steps": 2, "guidance_scale": 9.0, "seed": 7, "scheduler": "ddim",
              "priority": "normal", "preset": None}
    key = reuse_key(params, b"image", "sim")
    assert key and len(key) == 64
    assert reuse_key({**params, "priority": "high", "preset": "fast"}, b"image", "sim") == key
    assert reuse_key({**params, "seed": None}, b"image", "sim") is None  # no explicit seed: never reused
    for changed in ({"seed": 8}, {"prompt": "wave"}, {"fps": 9}, {"num_inference_steps": 3}, {"guidance_scale": 9.5},
                    {"lora": [{"name": "pan-left", "scale": 0.8}]}):
        assert reuse_key({**params, **changed}, b"image", "sim") != key, changed
    assert reuse_key(params, b"imagf", "sim") != key
    assert reuse_key(params, b"image", "tiny-random") != key
    assert reuse_key(params, b"image", "sim", dtype="bfloat16") != key
    assert gpu_seconds({"timings": {"total": 2.5, "run": 3}}) == 2.5
    assert gpu_seconds({"timings": {"run": 3}}) == 3 and gpu_seconds({}) == 0


def _record(job_id: str, owner: str = "anonymous", status: str = "succeeded", **extra) -> dict:
    return {"id": job_id, "owner": owner, "status": status, "vram_class": "12gb", "params": {"num_inference_steps": 1},
            "estimate": {"vram_bytes": 1, "seconds": 1.0}, "created_at": datetime.now(timezone.utc).isoformat(),
            **extra}


def test_job_store_finds_succeeded_jobs_by_reuse_key_per_owner(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create(_record("a1", "alice", reuse_key="k"))
    store.create(_record("a2", "alice", status="failed", reuse_key="k"))
    store.create(_record("b1", "bob", reuse_key="k"))
    store.create(_record("a3", "alice", reuse_key="other"))
    store.create(_record("a4", "alice", status="running", reuse_key="k"))
    assert [r["id"] for r in store.find_reusable("k", "alice")] == ["a1"]
    assert [r["id"] for r in store.find_reusable("k")] == ["b1", "a1"]  # admin: anyone's, newest first
    store.update("a4", status="succeeded")
    assert [r["id"] for r in store.find_reusable("k", "alice")] == ["a4", "a1"]
    plan = store._db.execute("EXPLAIN QUERY PLAN SELECT data FROM jobs WHERE json_extract(data, '$.reuse_key') = ? "
                             "AND status = ?", ("k", "succeeded")).fetchall()
    assert "jobs_reuse" in str(plan)  # an index lookup, not a scan of every job


# --- the dispatcher ------------------------------------------------------------------------------


def _settings(tmp_path, **over):
    return load_settings({"job_db": str(tmp_path / "jobs.sqlite3"), "egress_allow": ["127.0.0.1"],
                          "webhook_timeout_s": 2, **over}, env={}).resolved()


async def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_with_hook(store: JobStore, url: str, events=EVENTS, status="succeeded", owner="anonymous") -> dict:
    rec, _ = store.create(_record("j" + str(time.monotonic_ns()), owner, status=status,
                                  webhook={"url": url, "events": list(events)}))
    return rec


@pytest.mark.parametrize("first, gap1, gap2", [
    (None, (0.9, 3), (1.9, 5)),  # the default: 1 s, then 2 s (never sooner; later on a busy host)
    (0.2, (0.19, 0.9), (0.39, 1.9)),  # `webhook_backoff_s`: 0.2 s, then 0.4 s, well before 1 s and 2 s
])
def test_delivery_retries_5xx_with_backoff_then_delivers_a_signed_job(tmp_path, first, gap1, gap2):
    settings = _settings(tmp_path, **({} if first is None else {"webhook_backoff_s": first}))
    server, seen, url = webhook_receiver(lambda seen: 503 if len(seen) <= 2 else 200)
    store = JobStore(settings.job_db)
    outcomes: list[str] = []

    async def main():
        d = WebhookDispatcher(store, settings, store.get, outcomes.append)
        d.start()
        rec = _job_with_hook(store, url + "/hook")
        d.job_ended(rec)
        d.job_ended(store.get(rec["id"]))  # a second call for the same ending sends nothing more
        await _until(lambda: store.get(rec["id"])["deliveries"][0]["state"] == "delivered")
        d.stop()
        return rec

    try:
        rec = asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 3 and outcomes == ["retried", "retried", "delivered"]
    gaps = [b["at"] - a["at"] for a, b in zip(seen, seen[1:])]
    assert gap1[0] <= gaps[0] < gap1[1] and gap2[0] <= gaps[1] < gap2[1], gaps
    secret = SecretStore(secrets_path(settings)).farm_secret()
    for hit in seen:
        assert verify(secret, hit["headers"], hit["body"]), hit["headers"]
        assert hit["path"] == "/hook" and hit["headers"]["x-i2v-event"] == "succeeded"
        assert hit["headers"]["content-type"] == "application/json"
        assert json.loads(hit["body"])["id"] == rec["id"]
    assert len({h["headers"]["x-i2v-delivery"] for h in seen}) == 1  # the same delivery each try
    assert json.loads(seen[-1]["body"])["deliveries"][0]["attempts"] == 2  # the job as it was then
    (entry,) = store.get(rec["id"])["deliveries"]
    assert entry["state"] == "delivered" and entry["attempts"] == 3 and entry["last_status"] == 200
    assert entry["delivered_at"] and entry["last_error"] is None
    (row,) = store.deliveries(rec["id"])
    assert row["state"] == "delivered" and row["attempts"] == 3


def test_a_slow_receiver_never_holds_up_the_event_loop(tmp_path):
    settings = _settings(tmp_path)
    server, seen, url = webhook_receiver(lambda seen: time.sleep(1.5) or 200)  # answers after 1.5 s
    store = JobStore(settings.job_db)
    lags: list[float] = []

    async def main():
        d = WebhookDispatcher(store, settings, store.get)
        d.start()
        rec = _job_with_hook(store, url + "/slow")
        d.job_ended(rec)
        while store.get(rec["id"])["deliveries"][0]["state"] == "pending":
            before = time.monotonic()
            await asyncio.sleep(0.02)
            lags.append(time.monotonic() - before - 0.02)
        d.stop()

    try:
        t0 = time.monotonic()
        asyncio.run(main())
        took = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1 and took >= 1.5
    assert max(lags) < 0.75, max(lags)  # the loop kept turning while the POST waited 1.5 s


def test_a_pending_delivery_survives_a_restart(tmp_path):
    settings = _settings(tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/hook"
    job_id = None

    async def first():  # the receiver is down: connection refused, the delivery stays pending
        nonlocal job_id
        store = JobStore(settings.job_db)
        d = WebhookDispatcher(store, settings, store.get)
        d.start()
        rec = _job_with_hook(store, url)
        job_id = rec["id"]
        d.job_ended(rec)
        await _until(lambda: store.get(job_id)["deliveries"][0]["attempts"] == 1)
        d.stop()
        store.close()

    asyncio.run(first())
    server, seen, _ = webhook_receiver(lambda seen: 200, port=port)
    try:
        async def second():  # a new process: a new store and dispatcher on the same file
            store = JobStore(settings.job_db)
            entry = store.get(job_id)["deliveries"][0]
            assert entry["state"] == "pending" and entry["last_error"] and entry["next_attempt_at"]
            d = WebhookDispatcher(store, settings, store.get)
            d.start()
            await _until(lambda: store.get(job_id)["deliveries"][0]["state"] == "delivered")
            d.stop()
            return store.get(job_id)["deliveries"][0]

        entry = asyncio.run(second())
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1 and entry["attempts"] == 2


@pytest.mark.parametrize("case", ["client_error", "retry_window_over", "egress_refused_at_delivery"])
def test_deliveries_that_give_up(tmp_path, case):
    over = {"webhook_retry_s": 0} if case == "retry_window_over" else {}
    if case == "egress_refused_at_delivery":
        over["egress_allow"] = []  # the rules changed since submission (or DNS now points inside)
    settings = _settings(tmp_path, **over)
    server, seen, url = webhook_receiver(lambda seen: 400 if case == "client_error" else 503)
    store = JobStore(settings.job_db)

    async def main():
        d = WebhookDispatcher(store, settings, store.get)
        d.start()
        rec = _job_with_hook(store, url + "/hook", status="failed")
        d.job_ended(rec)
        await _until(lambda: store.get(rec["id"])["deliveries"][0]["state"] != "pending")
        await asyncio.sleep(1.2)  # nothing more is sent (a retry would come after 1 s)
        d.stop()
        return store.get(rec["id"])["deliveries"][0]

    try:
        entry = asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()
    assert entry["state"] == "failed" and entry["attempts"] == 1 and entry["event"] == "failed"
    if case == "client_error":
        assert len(seen) == 1 and entry["last_status"] == 400
    elif case == "retry_window_over":
        assert len(seen) == 1 and entry["last_status"] == 503 and "gave up" in entry["last_error"]
    else:
        assert not seen and "egress refused" in entry["last_error"]


def test_only_the_events_asked_for_are_delivered(tmp_path):
    settings = _settings(tmp_path)
    store = JobStore(settings.job_db)

    async def main():
        d = WebhookDispatcher(store, settings, store.get)
        d.start()
        rec = _job_with_hook(store, "http://127.0.0.1:9/hook", events=["failed"], status="succeeded")
        d.job_ended(rec)
        d.job_ended(_record("nohook"))
        d.stop()
        return rec

    rec = asyncio.run(main())
    assert store.deliveries(rec["id"]) == [] and "deliveries" not in store.get(rec["id"])
    assert store.next_delivery_at() is None


def test_reuse_and_webhook_metrics():
    from prometheus_client import generate_latest

    from cluster.vram_classes import DEFAULT_CLASSES
    from monitoring.metrics import FarmMetrics

    m = FarmMetrics(DEFAULT_CLASSES[:1])
    text = generate_latest(m.registry).decode()
    assert 'i2v_webhook_deliveries_total{outcome="retried"} 0.0' in text  # at 0 before the first attempt
    m.job_reused("12gb", 2.5)
    m.job_reused("12gb", 1.0)
    m.webhook_attempt("retried")
    m.webhook_attempt("delivered")
    text = generate_latest(m.registry).decode()
    assert 'i2v_jobs_reused_total{vram_class="12gb"} 2.0' in text
    assert 'i2v_reuse_gpu_seconds_saved_total{vram_class="12gb"} 3.5' in text
    assert 'i2v_webhook_deliveries_total{outcome="retried"} 1.0' in text
    assert 'i2v_webhook_deliveries_total{outcome="delivered"} 1.0' in text


def test_a_job_that_ended_just_before_a_stop_gets_its_delivery_at_the_next_start(tmp_path):
    settings = _settings(tmp_path)
    server, seen, url = webhook_receiver(lambda seen: 200)
    store = JobStore(settings.job_db)
    rec = _job_with_hook(store, url + "/late", status="canceled")  # ended; its delivery never queued
    quiet = _job_with_hook(store, url + "/quiet", events=["failed"], status="canceled")

    async def main():
        d = WebhookDispatcher(store, settings, store.get)
        d.start()
        await _until(lambda: (store.get(rec["id"]).get("deliveries") or [{}])[0].get("state") == "delivered")
        d.stop()

    try:
        asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()
    assert [h["path"] for h in seen] == ["/late"] and seen[0]["headers"]["x-i2v-event"] == "canceled"
    assert store.deliveries(quiet["id"]) == []
