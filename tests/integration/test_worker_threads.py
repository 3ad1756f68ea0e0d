"""Issue 17 the way a user meets it: a farm's worker on a node without a GPU computes on the
node's cores (not the one thread Ray's OMP_NUM_THREADS=num_cpus would give it), says so in
`GET /v1/cluster`, and `i2v-farm status` prints it. On the shared simulated cluster the fake-GPU
nodes are processes of this machine with no CUDA device, so "the node's cores" are this
machine's (this process's affinity). The rule itself: tests/unit/test_worker_threads.py.

The default-run check of the default (auto) rule, `test_cpu_worker_computes_on_the_nodes_cores`,
is in tests/integration/test_preview.py: it uses that module's tiny-random farm (one 12gb CPU
worker, as it would deploy here) instead of deploying its own. Here: the `worker_threads` setting
(slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tests.integration.conftest import deploy, undeploy

ROOT = Path(__file__).resolve().parents[2]
TWO_12GB = {"12gb": {"min_replicas": 2, "max_replicas": 2}}


def _status(farm) -> str:
    """`i2v-farm status` against the farm, as a user runs it (a separate process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("I2V_TOKEN", "I2V_URL")}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "status", "--url", farm.url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)  # shown with -s
    return proc.stdout


def _workers(farm, name: str = "12gb") -> list[dict]:
    return {c["name"]: c for c in farm.cluster()["classes"]}[name]["workers"]


@pytest.mark.slow  # the default (auto) rule runs in the default suite: test_preview.py::test_cpu_worker_computes_on_the_nodes_cores
def test_worker_threads_setting_and_replaced_replicas(ray_cluster, tmp_path):
    farm = deploy(ray_cluster, tmp_path, model="sim", workers=TWO_12GB, worker_threads=3)
    try:
        workers = _workers(farm)
        assert len(workers) == 2, workers  # the replicas of earlier deployments are not listed
        assert {(w["device"], w["threads"], w["threads_rule"]) for w in workers} == {("sim", 3, "worker_threads")}

        # A replica that dies without shutting down leaves its report behind: not listed.
        killed = workers[0]["replica"]
        ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 120
        while True:
            workers = _workers(farm)
            names = {w["replica"] for w in workers}
            ready = farm.session.get(farm.url + "/readyz", timeout=10).json().get("replicas")
            if len(workers) == 2 and killed not in names and ready == {"12gb": 2}:
                break
            assert time.monotonic() < deadline, f"replica not replaced: {workers}"
            time.sleep(0.5)

        out = _status(farm)
        assert "12gb: 2 replicas running (2-2), 0 busy, 0 queued; cpu threads 3\n" in out, out
        assert out.count(": sim, 3 cpu threads (set by worker_threads)") == 2, out
    finally:
        undeploy()
