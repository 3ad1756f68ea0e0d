"""Issue 17 the way a user meets it: a farm's worker on a node without a GPU computes on the
node's cores (not the one thread Ray's OMP_NUM_THREADS=num_cpus would give it), says so in
`GET /v1/cluster`, and `i2v-farm status` prints it. On the shared simulated cluster the fake-GPU
nodes are processes of this machine with no CUDA device, so "the node's cores" are this
machine's (this process's affinity). The rule itself: tests/unit/test_worker_threads.py."""

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
ONE_12GB = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
TWO_12GB = {"12gb": {"min_replicas": 2, "max_replicas": 2}}
TINY_JOB = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 2, "seed": 7}


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


def test_cpu_worker_computes_on_the_nodes_cores(ray_cluster, tmp_path, tiny_model):
    cores = len(os.sched_getaffinity(0))
    farm = deploy(ray_cluster, tmp_path, model="tiny-random", workers=ONE_12GB)  # worker_cpus 1, the default
    try:
        [worker] = _workers(farm)
        assert worker["device"] == "cpu" and worker["threads_rule"] == "auto_cpu", worker
        assert worker["threads"] == worker["node_cores"] == cores, worker  # torch threads of its render thread
        assert worker["worker_cpus"] == 1.0
        assert worker["torch_imported_before"] is False, worker  # its settings came before torch loaded
        assert worker["cuda_alloc_conf"] is None, worker  # no GPU: no allocator config

        job = farm.submit_ok(**TINY_JOB)
        done = farm.wait(job["id"], timeout=240)
        assert done["status"] == "succeeded", done
        assert done["replica"] == worker["replica"]

        out = _status(farm)
        assert f"12gb: 1 replicas running (1-1), 0 busy, 0 queued; cpu threads {cores}\n" in out, out
        assert f": cpu, {cores} cpu threads (auto: no GPU, the node's {cores} cores), node {worker['node'][:8]}" in out
    finally:
        undeploy()


@pytest.mark.slow  # the default (auto) rule runs in the default suite: test_cpu_worker_computes_on_the_nodes_cores
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
