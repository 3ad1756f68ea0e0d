"""A batch manifest as an attacker would write one, against a farm with tokens on (shared
simulated cluster, `sim` model), driven in-process through `serving.batch.run_batch`, the farm's
real HTTP API and its real storage:

* `s3://KEY` only within the caller's own prefix: caller B cannot render caller A's stored input
  (nor A's uploads or video); an admin can;
* `http(s)://` image URLs cannot reach loopback services (an image server, the farm's own
  `/metrics`, the Ray dashboard), also not through a name that resolves there, unless
  `I2V_EGRESS_ALLOW` lists them;
* every file and directory the farm made is private (0600/0700), and every farm replica process
  runs with the umask 077.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import requests

from serving import egress
from serving.batch import EgressPolicy, batch_settings, run_batch
from serving.client import FarmClient
from serving.files import wider_than
from serving.storage import LocalStorage
from tests.helpers import http_server
from tests.integration.conftest import deploy_secured, png_bytes, undeploy

QUICK = {"num_frames": 8, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def secured(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-security")
    limits = {"rate_per_min": 1000, "max_active": 20}
    farm, tokens, _ = deploy_secured(ray_cluster, root, {"alice": limits, "bob": limits, "ops": {"admin": True}},
                                     spool_dir=str(root / "spool"),
                                     workers={"12gb": {"min_replicas": 1, "max_replicas": 1}})
    yield farm, tokens, root
    undeploy()


@pytest.fixture(scope="module")
def image_server():
    """http://127.0.0.1:PORT/e.png: a loopback service (here one that serves an image)."""
    body = png_bytes(112, 96, seed=5)
    server, seen, url = http_server(lambda path: (200, {"Content-Type": "image/png"}, body))
    yield url, server.server_address[1], seen
    server.shutdown()
    server.server_close()


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def _storage(farm) -> LocalStorage:
    return LocalStorage(farm.settings.storage_url[len("file://"):])


def _wait(farm, token, job_id, timeout=90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{farm.url}/v1/jobs/{job_id}", headers=_h(token), timeout=10).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def _batch(farm, token, work: Path, rows, prefix, egress_policy=None) -> tuple[int, list[dict], str]:
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / f"{prefix.strip('/').replace('/', '-')}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = io.StringIO()
    storage = _storage(farm)
    code = run_batch(manifest, client=FarmClient(farm.url, timeout=30, token=token), storage=storage, root=work,
                     out=out, prefix=prefix, poll_s=0.2, row_timeout=90, connect_timeout=30, egress=egress_policy)
    lines = [json.loads(line) for line in storage.get_bytes(prefix + "summary.jsonl").decode().splitlines()]
    return code, lines, out.getvalue()


def _outcome(lines) -> list[tuple[str, str | None]]:
    return [(line["status"], (line["error"] or {}).get("code")) for line in lines]


def _my_jobs(farm, token) -> list[dict]:
    return requests.get(farm.url + "/v1/jobs", headers=_h(token), timeout=10).json()["jobs"]


def test_caller_b_cannot_render_caller_as_stored_input_but_its_own_and_an_admin_can(secured, tmp_path):
    farm, tokens, _ = secured
    me = requests.get(farm.url + "/v1/me", headers=_h(tokens["bob"]), timeout=10)
    assert me.status_code == 200 and me.json()["name"] == "bob" and me.json()["admin"] is False
    a = farm.submit(headers=_h(tokens["alice"]), image=png_bytes(seed=21), **QUICK)
    assert a.status_code == 202, a.text
    alice_job = _wait(farm, tokens["alice"], a.json()["id"])
    assert alice_job["status"] == "succeeded", alice_job
    alice_input, alice_video = alice_job["input"]["key"], alice_job["result"]["key"]
    storage = _storage(farm)
    storage.put_bytes("uploads/alice/cat.png", png_bytes(seed=22))
    storage.put_bytes("uploads/bob/dog.png", png_bytes(seed=23))
    bob_before = len(_my_jobs(farm, tokens["bob"]))

    code, lines, log = _batch(farm, tokens["bob"], tmp_path / "bob", [
        {"image": f"s3://{alice_input}", "prompt": "alice's input", **QUICK},
        {"image": "s3://uploads/alice/cat.png", "prompt": "alice's upload", **QUICK},
        {"image": f"s3://{alice_video}", "prompt": "alice's video", **QUICK},
        {"image": "s3://uploads/bob/dog.png", "prompt": "bob's own upload", **QUICK},
        {"image": "s3://uploads/alice/../bob/dog.png", "prompt": "a dot-dot key", **QUICK},
    ], "batches/bob/")
    assert code == 0, log
    assert _outcome(lines) == [("invalid", "image_forbidden"), ("invalid", "image_forbidden"),
                               ("invalid", "image_forbidden"), ("succeeded", None), ("invalid", "bad_image_source")]
    assert f"s3://{alice_input} is not yours" in lines[0]["error"]["message"]
    assert "uploads/bob/" in lines[1]["error"]["message"]
    mine = _my_jobs(farm, tokens["bob"])
    assert len(mine) == bob_before + 1 and {j["params"]["prompt"] for j in mine} >= {"bob's own upload"}
    assert not any(j["params"]["prompt"].startswith("alice") for j in mine)

    # alice may use her own stored input and uploads; an admin may use anyone's
    code, lines, log = _batch(farm, tokens["alice"], tmp_path / "alice", [
        {"image": f"s3://{alice_input}", "prompt": "my input again", **QUICK},
        {"image": "s3://uploads/alice/cat.png", "prompt": "my upload", **QUICK},
        {"image": "s3://uploads/bob/dog.png", "prompt": "bob's upload", **QUICK},
    ], "batches/alice/")
    assert _outcome(lines) == [("succeeded", None), ("succeeded", None), ("invalid", "image_forbidden")], log
    code, lines, log = _batch(farm, tokens["ops"], tmp_path / "ops", [
        {"image": "s3://uploads/bob/dog.png", "prompt": "admin renders bob's upload", **QUICK},
    ], "batches/ops/")
    assert _outcome(lines) == [("succeeded", None)], log


def test_loopback_services_are_refused_unless_egress_allow_lists_them(secured, image_server, tmp_path,
                                                                       ray_cluster):
    farm, tokens, _ = secured
    url, port, seen = image_server
    sim, _ = ray_cluster
    before = len(_my_jobs(farm, tokens["alice"]))
    old = egress.set_resolver(lambda host, p: ["127.0.0.1"] if host == "images.example"
                              else egress.default_resolver(host, p))
    try:
        rows = [{"image": f"{url}/e.png", "prompt": "a loopback image server", **QUICK},
                {"image": f"{farm.url}/metrics", "prompt": "the farm's own metrics", **QUICK},
                {"image": f"http://images.example:{port}/e.png", "prompt": "a name resolving to loopback", **QUICK},
                {"image": f"http://localhost:{port}/e.png", "prompt": "localhost", **QUICK},
                {"image": "http://169.254.169.254/latest/meta-data/", "prompt": "cloud metadata", **QUICK}]
        if sim.dashboard_url:
            rows.append({"image": f"{sim.dashboard_url.rstrip('/')}/api/jobs/", "prompt": "the Ray dashboard", **QUICK})
        default = EgressPolicy.from_settings(batch_settings(env={}))
        code, lines, log = _batch(farm, tokens["alice"], tmp_path / "inside", rows, "batches/inside/", default)
        assert code == 0, log
        assert _outcome(lines) == [("invalid", "egress_refused")] * len(rows), log
        assert "loopback" in lines[0]["error"]["message"] and "egress_allow" in lines[0]["error"]["message"]
        assert "images.example resolves to 127.0.0.1" in lines[2]["error"]["message"]
        assert "metadata" in lines[4]["error"]["message"]
        assert [r["path"] for r in seen] == [] and len(_my_jobs(farm, tokens["alice"])) == before  # nothing fetched, nothing queued

        # the operator allows the loopback image server (I2V_EGRESS_ALLOW, as the Ray job's env gives it)
        allowed = EgressPolicy.from_settings(batch_settings(env={"I2V_EGRESS_ALLOW": "127.0.0.1"}))
        code, lines, log = _batch(farm, tokens["alice"], tmp_path / "allowed", rows[:1] + rows[2:3],
                                  "batches/allowed/", allowed)
        assert _outcome(lines) == [("succeeded", None), ("succeeded", None)], log
        assert [r["path"] for r in seen] == ["/e.png", "/e.png"]
    finally:
        egress.set_resolver(old)


def _replica_umasks() -> dict[str, str]:
    """Process title -> umask of every Ray Serve replica of the farm on this machine (/proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::ServeReplica:i2v-farm:"):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        umask = next((line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), "?")
        found[title.split()[0]] = umask
    return found


def test_every_file_the_farm_made_is_private_and_its_processes_run_with_umask_077(secured):
    farm, tokens, root = secured
    a = farm.submit(headers=_h(tokens["alice"]), image=png_bytes(seed=31), **QUICK)
    assert _wait(farm, tokens["alice"], a.json()["id"])["status"] == "succeeded"
    made = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    for expected in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "inbox", "outputs", "spool",
                     "tokens.json"):
        assert expected in made, made
    assert any(p.endswith("/params.json") for p in made) and any(p.endswith("/video.mp4") for p in made)
    assert wider_than(root, 0o600) == []  # files 0600, directories 0700, under every root of the farm
    umasks = _replica_umasks()
    # `ray::ServeReplica:APP:DEPLOYMENT`, with `.METHOD` appended while the replica handles a call
    kinds = {title.rsplit(":", 1)[-1].split(".", 1)[0] for title in umasks}
    assert {"FarmApi", "JobManager", "Worker_12gb"} <= kinds, umasks
    assert set(umasks.values()) == {"0077"}, umasks
