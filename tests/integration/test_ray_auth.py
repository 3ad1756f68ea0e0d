"""Ray's token authentication on the shared cluster, probed the way an attacker would.

The shared cluster (tests/integration/conftest.py) runs with `RAY_AUTH_MODE=token`, as
`i2v-farm up` starts Ray. With the farm deployed (ingress, job manager, a worker), every TCP
socket of the cluster's processes that is not bound to loopback gets Ray Serve's own
inter-deployment request (`ray.serve.ASGIService/HandleRequest`) carrying a pickle that would
create a marker directory: without the token each must be refused and no marker may appear.
The positive control sends the same request WITH the token and sees the marker appear, so this
test fails if authentication were off. Ray's other servers (GCS, raylets, object managers, core
workers, dashboard agents; loopback-bound here, on every interface on a real cluster) and the
Jobs HTTP API are checked too, and the token appears in no Ray log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cluster import ray_auth
from cluster.simulated import LOOPBACK_ENV
from tests.integration.conftest import deploy, undeploy
from tests.ray_probe import (
    RAY_SERVICES,
    assert_no_exposed_port_runs_code,
    cmdlines_holding,
    files_holding,
    grpc_status,
    listening_sockets,
    session_dirs,
)

WORKERS = {"12gb": {"min_replicas": 1, "max_replicas": 1}}


@pytest.fixture(scope="module")
def farm(ray_cluster, tmp_path_factory):
    farm = deploy(ray_cluster, tmp_path_factory.mktemp("ray-auth-farm"), workers=WORKERS)
    yield farm
    undeploy()


@pytest.fixture(scope="module")
def token(ray_cluster) -> str:
    sim, _ = ray_cluster
    return ray_auth.read_token(sim.auth_token_file)


def _wait_gone(paths, seconds: float = 2.0) -> list[str]:
    """The marker paths that exist after `seconds` (a late unpickle would show up here)."""
    time.sleep(seconds)
    return [p for p in paths if os.path.exists(p)]


def test_the_shared_cluster_runs_with_token_auth_from_a_0600_file(ray_cluster, token):
    sim, _ = ray_cluster
    assert ray_auth.is_enabled()
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == sim.auth_token_file
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert Path(sim.auth_token_file).stat().st_mode & 0o777 == 0o600
    assert len(token) == 64 and int(token, 16)  # 256 random bits, hex


def test_no_port_beyond_loopback_runs_a_pickle_without_the_token(farm, ray_cluster, token, tmp_path):
    assert_no_exposed_port_runs_code([os.getpid()], str(tmp_path), token)


def test_every_ray_grpc_server_refuses_calls_without_the_token(farm, ray_cluster, token):
    """GCS, raylets, object managers, core workers, dashboard agents and Serve replicas (loopback
    ones included: on a real cluster they listen on the node's address)."""
    refused_by: dict[str, list[str]] = {name: [] for name in RAY_SERVICES}
    for listener in listening_sockets([os.getpid()]):
        for service, method in RAY_SERVICES.items():
            status = grpc_status(listener.port, method)
            assert status != "OK", f"{listener} served {method} without the token"
            if status == "UNAUTHENTICATED":
                # the same call with the token is not refused as unauthenticated (a real check, not
                # a server that refuses everything)
                if service != "serve_replica":  # its empty request would fail to unpickle: UNKNOWN
                    assert grpc_status(listener.port, method, token) == "OK", (str(listener), method)
                refused_by[service].append(str(listener))
    missing = [service for service, where in refused_by.items() if not where]
    assert not missing, f"no server of {missing} found checking the token: {refused_by}"


def test_the_jobs_api_refuses_callers_without_the_token(ray_cluster, token, tmp_path):
    """Ray's Jobs API runs any shell command it is sent: 401 without the token, 403 with a wrong one."""
    sim, _ = ray_cluster
    marker = tmp_path / "job-ran"
    job = {"entrypoint": f"mkdir {marker}"}
    url = sim.dashboard_url + "/api/jobs/"
    assert requests.post(url, json=job, timeout=30).status_code == 401
    assert requests.post(url, json=job, headers={"Authorization": "Bearer " + "0" * 64}, timeout=30).status_code == 403
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    assert _wait_gone([str(marker)]) == []


def _cli_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(LOOPBACK_ENV, HOME=str(tmp_path), **extra)  # no ~/.ray/auth_token to fall back on
    return env


def test_the_operators_shell_needs_the_token_file_for_ray_cli(ray_cluster, tmp_path):
    """`ray job list` (like `ray job submit` and `serve deploy`, the dashboard's HTTP API) works with
    the two variables `up --dashboard` prints, and is refused without them."""
    sim, _ = ray_cluster
    ray_cli = [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", sim.dashboard_url]
    shell = dict(kv.split("=", 1) for kv in ray_auth.shell_env(sim.auth_token_file).split())
    ok = subprocess.run(ray_cli, env=_cli_env(tmp_path, **shell), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = subprocess.run(ray_cli, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stdout + refused.stderr
    token = ray_auth.read_token(sim.auth_token_file)
    assert token not in ok.stdout + ok.stderr + refused.stdout + refused.stderr


def test_the_token_is_in_no_ray_log_and_no_command_line(farm, ray_cluster, token):
    """After everything above (refusals are logged), no file of the cluster's session holds the
    token, and no process shows it in its command line (`ps` shows those to every user)."""
    sim, _ = ray_cluster
    assert sim.session_dir in session_dirs([os.getpid()])
    assert any(p.suffix == ".log" for p in (Path(sim.session_dir) / "logs").iterdir())
    assert files_holding(token, [sim.session_dir]) == []
    assert cmdlines_holding(token, [os.getpid()]) == []
