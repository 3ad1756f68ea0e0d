"""Webhooks (issue 18) on the shared simulated cluster, as callers meet them: a receiver on
loopback (allowed by `egress_allow`) that verifies the signature, fails the first attempts and is
down across a farm restart; per-token secrets made by `i2v-farm token create`; the events a job
asks for; bad webhook fields refused with 422 naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from serving.webhooks import SecretStore, secrets_path, verify
from tests.helpers import webhook_receiver
from tests.integration.conftest import deploy, undeploy

WORKERS = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
# retries after 0.1 s, 0.2 s, 0.4 s, ... instead of 1 s, 2 s, 4 s (the default)
QUICK_RETRIES = {"webhook_backoff_s": 0.1}
QUICK = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 2}
# ~4 s on a 12gb worker (sim_time_scale 0.01): long enough to cancel while it runs
LONG = {"resolution": "512p", "num_frames": 16, "num_inference_steps": 100}


def _wait_for(check, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _stop(server) -> None:
    server.shutdown()
    server.server_close()


def test_a_delivery_is_retried_signed_and_survives_a_farm_restart(ray_cluster, tmp_path):
    first: dict = {}

    def answer(seen):  # the first two attempts fail; then the receiver goes down
        if len(seen) == 2:  # it answers no later request (the retry comes 0.2 s after this one)
            threading.Thread(target=first["server"].shutdown, daemon=True).start()
        return 503

    server, seen, base = webhook_receiver(answer)
    first["server"], port = server, server.server_address[1]
    farm = deploy(ray_cluster, tmp_path, workers=WORKERS, egress_allow=["127.0.0.1"], **QUICK_RETRIES)
    try:
        bad = {"webhook": "https://10.0.0.7/hook"}, {"webhook": "http://93.184.216.34/hook"}, \
            {"webhook": base + "/hook", "webhook_events": ["finished"]}, {"webhook": "not a url"}
        for fields in bad:
            r = farm.submit(**QUICK, **fields)
            assert r.status_code == 422, (fields, r.text)
            assert r.json()["error"]["field"] == ("webhook_events" if "webhook_events" in fields else "webhook")

        job = farm.submit_ok(**QUICK, webhook=base + "/hook")
        assert job["webhook"] == {"url": base + "/hook", "events": ["succeeded", "failed", "canceled"]}
        done = farm.wait(job["id"])
        assert done["status"] == "succeeded"
        _wait_for(lambda: len(seen) >= 2, 30, "two failed attempts")
        _stop(server)  # the receiver is down (closed): the next attempt cannot connect
        _wait_for(lambda: (farm.job(job["id"]).get("deliveries") or [{}])[0].get("attempts", 0) >= 3, 30,
                  "an attempt while the receiver is down")
        undeploy()  # the farm restarts with the delivery pending (the receiver still down)
        farm = deploy(ray_cluster, tmp_path, workers=WORKERS, egress_allow=["127.0.0.1"], **QUICK_RETRIES)
        restarted_at = time.time()
        entry = farm.job(job["id"])["deliveries"][0]
        assert entry["state"] == "pending" and entry["attempts"] >= 3, entry
        server, seen_after, _ = webhook_receiver(lambda seen: 200, port=port)  # the receiver is back
        entry = _wait_for(lambda: (lambda e: e if e["state"] != "pending" else None)(
            farm.job(job["id"])["deliveries"][0]), 60, "the delivery after the restart")
    finally:
        _stop(server)
        undeploy()
    assert entry["state"] == "delivered" and entry["last_status"] == 200 and entry["attempts"] >= 4, entry
    assert len(seen) == 2 and len(seen_after) == 1
    hit = seen_after[0]
    assert hit["at"] > restarted_at
    secret = SecretStore(secrets_path(farm.settings)).farm_secret()  # auth off: the farm's secret
    for h in (*seen, hit):
        assert verify(secret, h["headers"], h["body"]), h["headers"]
        assert h["headers"]["x-i2v-event"] == "succeeded" and h["headers"]["x-i2v-delivery"] == str(entry["id"])
    body = json.loads(hit["body"])
    assert body["id"] == job["id"] and body["status"] == "succeeded"
    assert body["result"]["url"] == f"/v1/jobs/{job['id']}/video" and body["links"]["video"] == body["result"]["url"]
    assert body["result"]["key"] == done["result"]["key"]


def test_per_token_secrets_events_and_a_reused_job_call_back(ray_cluster, tmp_path):
    env = {**os.environ, "I2V_JOB_DB": str(tmp_path / "jobs.sqlite3"), "I2V_TOKENS_FILE": "", "I2V_CONFIG": ""}
    made = subprocess.run([sys.executable, "-m", "serving.cli", "token", "create", "alice"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    token = made.stdout.strip()
    secret = made.stderr.rsplit(": ", 1)[1].strip()
    assert token.startswith("i2v_") and secret.startswith("whsec_")
    farm_secret = subprocess.run([sys.executable, "-m", "serving.cli", "token", "webhook-secret"], env=env,
                                 capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert farm_secret.startswith("whsec_") and farm_secret != secret

    server, seen, base = webhook_receiver(lambda seen: 200)
    farm = deploy(ray_cluster, tmp_path, workers=WORKERS, egress_allow=["127.0.0.1"], auth="on")
    farm.client.token = token  # every call of this test as alice
    try:
        quiet = farm.submit_ok(**QUICK, seed=3, webhook=base + "/quiet", webhook_events=["canceled"])
        assert farm.wait(quiet["id"])["status"] == "succeeded"

        long = farm.submit_ok(**LONG, webhook=base + "/cancel", webhook_events="canceled,failed")
        farm.wait(long["id"], statuses=("running",))
        assert farm.cancel(long["id"]).status_code == 200
        _wait_for(lambda: [h for h in seen if h["path"] == "/cancel"], 30, "the canceled job's webhook")

        reused = farm.submit_ok(**QUICK, seed=3, webhook=base + "/reused", webhook_events=["succeeded"])
        assert reused["status"] == "succeeded" and reused["reused_from"] == quiet["id"]
        _wait_for(lambda: [h for h in seen if h["path"] == "/reused"], 30, "the reused job's webhook")
        time.sleep(1)  # anything else would have been sent by now
    finally:
        _stop(server)
        undeploy()
    assert sorted(h["path"] for h in seen) == ["/cancel", "/reused"]  # no `succeeded` call for /quiet
    for h in seen:
        assert verify(secret, h["headers"], h["body"])  # alice's secret, not the farm's
        assert not verify(farm_secret, h["headers"], h["body"])
    cancel = next(h for h in seen if h["path"] == "/cancel")
    assert cancel["headers"]["x-i2v-event"] == "canceled" and json.loads(cancel["body"])["status"] == "canceled"
    body = json.loads(next(h for h in seen if h["path"] == "/reused")["body"])
    assert body["id"] == reused["id"] and body["reused_from"] == quiet["id"]
    # a token that is revoked loses its secret
    subprocess.run([sys.executable, "-m", "serving.cli", "token", "revoke", "alice"], env=env, capture_output=True,
                   timeout=60, check=True)
    assert "alice" not in json.loads(secrets_path(farm.settings).read_text()).get("tokens", {})
