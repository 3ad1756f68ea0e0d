"""The first webhook retry delay is a setting (`webhook_backoff_s`), and the dispatcher uses it:
a real loopback receiver that fails twice sees the retries come after it, then twice it."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pytest

from serving.config import load_settings
from serving.job_store import JobStore
from serving.webhooks import EVENTS, MAX_BACKOFF_S, WebhookDispatcher, backoff_s
from tests.helpers import webhook_receiver


def test_backoff_starts_at_the_first_delay_and_doubles_up_to_the_cap():
    assert [backoff_s(n, 0.25) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1, 2]
    assert backoff_s(40, 0.25) == MAX_BACKOFF_S
    assert [backoff_s(n) for n in (1, 2, 3)] == [1, 2, 4]  # the default


def test_the_setting_defaults_to_one_second_reads_the_environment_and_must_be_positive():
    assert load_settings({}, env={}).webhook_backoff_s == 1.0
    assert load_settings({}, env={"I2V_WEBHOOK_BACKOFF_S": "0.5"}).webhook_backoff_s == 0.5
    for bad in (0, -1, 301, "soon"):
        with pytest.raises(ValueError, match="webhook_backoff_s"):
            load_settings({"webhook_backoff_s": bad}, env={})


def test_the_dispatcher_retries_after_the_configured_delay(tmp_path):
    settings = load_settings({"job_db": str(tmp_path / "jobs.sqlite3"), "egress_allow": ["127.0.0.1"],
                              "webhook_timeout_s": 2, "webhook_backoff_s": 0.2}, env={}).resolved()
    server, seen, url = webhook_receiver(lambda seen: 503 if len(seen) <= 2 else 200)
    store = JobStore(settings.job_db)

    async def main():
        d = WebhookDispatcher(store, settings, store.get)
        d.start()
        rec, _ = store.create({"id": "j1", "owner": "anonymous", "status": "succeeded", "vram_class": "12gb",
                               "params": {"num_inference_steps": 1}, "estimate": {"vram_bytes": 1, "seconds": 1.0},
                               "created_at": datetime.now(timezone.utc).isoformat(),
                               "webhook": {"url": url + "/hook", "events": list(EVENTS)}})
        d.job_ended(rec)
        deadline = time.monotonic() + 20
        while store.get(rec["id"])["deliveries"][0]["state"] != "delivered":
            assert time.monotonic() < deadline, "not delivered in 20 s"
            await asyncio.sleep(0.05)
        d.stop()

    try:
        asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()
    gaps = [b["at"] - a["at"] for a, b in zip(seen, seen[1:])]
    # 0.2 s, then 0.4 s: never sooner, and well before the default's 1 s and 2 s (later on a busy host)
    assert len(seen) == 3 and 0.19 <= gaps[0] < 0.9 and 0.39 <= gaps[1] < 1.9, gaps

