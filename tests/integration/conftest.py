"""One shared simulated Ray cluster per test run (12gb:2, 24gb:1 fake-GPU nodes) with Serve on
a free loopback port; each test module deploys the farm application it needs on it. The cluster
runs with Ray's token authentication, as `i2v-farm up` starts it, so every test also proves the
farm works with it (tests/integration/test_ray_auth.py probes it the way an attacker would)."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field

import pytest
import requests

from serving.client import FarmClient, Reply
from tests.helpers import make_image

CLUSTER = "12gb:2,24gb:1"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The shared cluster: (SimulatedCluster, HTTP port of Serve's proxy). Token auth on: the token
    file is `sim.auth_token_file`, the environment a separate process needs `sim.auth_env`."""
    from ray import serve

    from cluster.simulated import SimulatedCluster
    from serving.harness import start_serve

    token_file = tmp_path_factory.mktemp("ray-auth") / "ray_token"
    sim = SimulatedCluster(CLUSTER, head_cpus=4, node_cpus=2, dashboard=True,  # Jobs API
                           auth_token_file=token_file).start()
    try:
        sim.connect(namespace="i2v-tests", log_to_driver=False)
        yield sim, start_serve()
    finally:
        try:
            serve.shutdown()
        finally:
            sim.shutdown()


def png_bytes(width: int = 96, height: int = 80, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Farm:
    """A deployed farm application and its client (`serving.client.FarmClient`, no token; its
    `Reply` reads as a `requests` response does). `session` is for the tests that send HTTP the
    client never would (malformed bodies, forms, odd headers)."""

    url: str
    settings: object
    sim: object
    session: requests.Session = field(default_factory=requests.Session)
    client: FarmClient = field(init=False)

    def __post_init__(self):
        self.client = FarmClient(self.url, timeout=30, token="")

    def submit(self, image: bytes | None = None, headers=None, **fields) -> Reply:
        body = {"prompt": "waves rolling in", **fields,
                "image": base64.b64encode(image if image is not None else png_bytes()).decode()}
        return self.client.request("POST", "/v1/jobs", body, headers)

    def submit_ok(self, **fields) -> dict:
        r = self.submit(**fields)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.client.request("GET", f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, statuses=("succeeded", "failed", "canceled"), timeout: float = 90,
             until=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in statuses and (until is None or until(job)):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
            time.sleep(0.1)

    def cancel(self, job_id: str) -> Reply:
        return self.client.request("POST", f"/v1/jobs/{job_id}/cancel")

    def cluster(self) -> dict:
        return self.client.call("GET", "/v1/cluster")

    def node_class(self, node_id: str) -> str:
        for name, ids in self.sim.nodes_by_class().items():
            if node_id in ids:
                return name
        raise AssertionError(f"node {node_id} is not a GPU node of the cluster")


def deploy(ray_cluster, tmp_path, **overrides) -> Farm:
    """Deploy the farm application with these settings on the shared cluster; wait until ready."""
    from serving import harness
    from serving.config import load_settings

    sim, port = ray_cluster
    base = {"model": "sim", "job_db": str(tmp_path / "jobs.sqlite3"),
            "storage_url": f"file://{tmp_path / 'outputs'}", "sim_time_scale": 0.01}
    settings = load_settings({**base, **overrides}, env={})
    farm = Farm(url=f"http://127.0.0.1:{port}", settings=settings.resolved(), sim=sim)
    wanted = {c: w["max_replicas"] for c, w in overrides.get("workers", {}).items()}
    harness.deploy(settings, farm.url, wanted, timeout=120)
    return farm


def deploy_secured(ray_cluster, tmp_path, tokens: dict[str, dict], **overrides):
    """The farm with API tokens required (`auth: on`): one token per name, made with these
    `TokenStore.create` arguments. Returns (farm, {name: token}, the token store)."""
    from serving.auth import TokenStore

    store = TokenStore(tmp_path / "tokens.json")
    made = {name: store.create(name, **kwargs) for name, kwargs in tokens.items()}
    farm = deploy(ray_cluster, tmp_path, auth="on", tokens_file=str(tmp_path / "tokens.json"), **overrides)
    return farm, made, store


def undeploy() -> None:
    from serving import harness

    harness.undeploy()
