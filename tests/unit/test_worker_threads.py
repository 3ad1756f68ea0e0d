"""Worker CPU threads and CUDA allocator config (issue 17): the resolution rule, what a replica
sets in its process, and how `i2v-farm status` prints it. The worker on a cluster:
tests/integration/test_worker_threads.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving import client
from serving.config import FarmSettings
from serving.worker import attach_worker_reports, node_cores, resolve_threads, setup_compute

ROOT = Path(__file__).resolve().parents[2]
CONF = "expandable_segments:True"


@pytest.fixture
def torch_threads():
    """setup_compute sets this process's torch threads: put them back."""
    import torch

    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


# --- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker_threads", "worker_cpus", "gpu", "cores", "expected"),
    [
        (0, 1.0, False, 12, (12, "auto_cpu")),  # no GPU: all of the node's cores, not Ray's 1
        (0, 1.0, False, 1, (1, "auto_cpu")),
        (0, 4.0, False, 2, (2, "auto_cpu")),  # worker_cpus does not cap a CPU worker
        (0, 1.0, True, 12, (1, "auto_gpu")),  # GPU: worker_cpus ...
        (0, 4.0, True, 12, (4, "auto_gpu")),
        (0, 2.5, True, 12, (2, "auto_gpu")),  # ... whole CPUs ...
        (0, 0.25, True, 12, (1, "auto_gpu")),  # ... at least 1
        (3, 1.0, False, 12, (3, "worker_threads")),  # set: wins either way, even above the cores
        (3, 8.0, True, 2, (3, "worker_threads")),
    ],
)
def test_resolve_threads(worker_threads, worker_cpus, gpu, cores, expected):
    assert resolve_threads(worker_threads, worker_cpus, gpu, cores) == expected


def test_node_cores_is_this_process_affinity():
    assert node_cores() == len(os.sched_getaffinity(0)) >= 1


# --- what a worker sets ------------------------------------------------------------------------


def test_cpu_worker_gets_the_cores_and_no_alloc_conf(torch_threads):
    import torch

    env = {"OMP_NUM_THREADS": "1"}  # what Ray gives an actor of num_cpus=1
    out = setup_compute(FarmSettings(), env=env, cuda_available=lambda: False, cores=3)
    assert out["device"] == "cpu" and out["threads"] == 3 and out["threads_rule"] == "auto_cpu"
    assert torch.get_num_threads() == 3
    assert env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}  # set to the default, then taken back
    assert out["cuda_alloc_conf"] is None and out["node_cores"] == 3


def test_gpu_worker_gets_worker_cpus_and_the_alloc_conf(torch_threads):
    import torch

    env: dict[str, str] = {}
    out = setup_compute(FarmSettings(worker_cpus=2), env=env, cuda_available=lambda: True, cores=16)
    assert out["device"] == "cuda" and out["threads"] == 2 and out["threads_rule"] == "auto_gpu"
    assert torch.get_num_threads() == 2
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == CONF == out["cuda_alloc_conf"]
    assert out["cuda_alloc_conf_from"] == "worker_cuda_alloc_conf"


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_alloc_conf_in_the_environment_wins(torch_threads, var):
    env = {var: "garbage_collection_threshold:0.6"}
    out = setup_compute(FarmSettings(), env=env, cuda_available=lambda: True, cores=4)
    assert env[var] == "garbage_collection_threshold:0.6" == out["cuda_alloc_conf"]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env or var == "PYTORCH_CUDA_ALLOC_CONF"
    assert out["cuda_alloc_conf_from"] == ("environment" if var == "PYTORCH_CUDA_ALLOC_CONF" else var)


def test_empty_alloc_conf_setting_sets_nothing(torch_threads):
    env: dict[str, str] = {}
    out = setup_compute(FarmSettings(worker_cuda_alloc_conf=""), env=env, cuda_available=lambda: True, cores=4)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and out["cuda_alloc_conf"] is None


def test_worker_threads_setting_wins(torch_threads):
    import torch

    env: dict[str, str] = {}
    out = setup_compute(FarmSettings(worker_threads=3), env=env, cuda_available=lambda: False, cores=16)
    assert out["threads"] == torch.get_num_threads() == 3 and out["threads_rule"] == "worker_threads"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


def test_sim_worker_never_touches_torch():
    env: dict[str, str] = {}
    out = setup_compute(FarmSettings(model="sim"), use_torch=False, env=env, cores=5,
                        cuda_available=lambda: pytest.fail("the sim worker must not ask torch about CUDA"))
    assert out["device"] == "sim" and out["threads"] == 5 and out["cuda_alloc_conf"] is None
    assert env == {"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}


def test_fresh_process_as_ray_starts_a_replica():
    """What a replica's process looks like: OMP_NUM_THREADS=1 from Ray, torch not yet imported.
    setup_compute runs first: the allocator variable is in place before torch loads, and the
    render thread (a pool thread started later) computes on the node's cores."""
    script = (
        "import json, os, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from serving.config import FarmSettings\n"
        "from serving.worker import setup_compute, _torch_threads\n"
        "seen = {}\n"
        "def no_gpu():\n"  # torch is imported by now: record what it found, answer "no GPU"
        "    seen['conf'] = os.environ.get('PYTORCH_CUDA_ALLOC_CONF')\n"
        "    return False\n"
        "out = setup_compute(FarmSettings(), cuda_available=no_gpu)\n"
        "out['render_threads'] = ThreadPoolExecutor(1).submit(_torch_threads).result()\n"
        "out['conf_when_torch_loaded'] = seen['conf']\n"
        "out['env'] = {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'PYTORCH_CUDA_ALLOC_CONF')}\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTORCH_", "OMP_", "MKL_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cores = len(os.sched_getaffinity(0))
    assert out["torch_imported_before"] is False
    assert out["conf_when_torch_loaded"] == CONF  # set before torch was imported and asked
    assert out["device"] == "cpu" and out["threads"] == out["render_threads"] == cores
    assert out["env"] == {"OMP_NUM_THREADS": str(cores), "PYTORCH_CUDA_ALLOC_CONF": None}


# --- i2v-farm status ---------------------------------------------------------------------------


def _report(replica: str, **kw):
    return {"replica": f"SERVE_REPLICA::i2v-farm#Worker_12gb#{replica}", "app": "i2v-farm",
            "deployment": "Worker_12gb", "node": "0123456789abcdef", "device": "cpu", "threads": 2,
            "threads_rule": "auto_cpu", "node_cores": 2, "cuda_alloc_conf": None, "cuda_alloc_conf_from": None, **kw}


CLUSTER = {
    "model": "tiny-random", "queue_depth": 0, "running": 0,
    "classes": [
        {"name": "12gb", "deployment": "Worker_12gb", "replicas": {"running": 2, "min": 2, "max": 2},
         "busy": 0, "queued": 0},
        {"name": "24gb", "deployment": "Worker_24gb", "replicas": {"running": 1, "min": 1, "max": 1},
         "busy": 1, "queued": 0},
    ],
}


def test_status_prints_threads_per_class_and_replica(monkeypatch, capsys):
    info = json.loads(json.dumps(CLUSTER))
    info["classes"][0]["workers"] = [_report("aaa"), _report("bbb")]
    info["classes"][1]["workers"] = [_report("ccc", device="cuda", threads=1, threads_rule="auto_gpu",
                                             cuda_alloc_conf=CONF, cuda_alloc_conf_from="worker_cuda_alloc_conf")]
    monkeypatch.setattr(client.FarmClient, "call", lambda self, method, path, *a, **k: info)
    from serving.cli import main

    assert main(["status", "--url", "http://farm.invalid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "    12gb: 2 replicas running (2-2), 0 busy, 0 queued; cpu threads 2"
    assert lines[2].strip() == ("Worker_12gb#aaa: cpu, 2 cpu threads (auto: no GPU, the node's 2 cores), "
                                "node 01234567")
    assert lines[4] == "    24gb: 1 replicas running (1-1), 1 busy, 0 queued; cpu threads 1"
    assert lines[5].strip() == ("Worker_12gb#ccc: cuda, 1 cpu threads (auto: GPU worker, worker_cpus), node 01234567, "
                                f"PYTORCH_CUDA_ALLOC_CONF={CONF} (from worker_cuda_alloc_conf)")


def test_status_of_a_farm_without_reports(monkeypatch, capsys):
    monkeypatch.setattr(client.FarmClient, "call", lambda self, method, path, *a, **k: CLUSTER)
    from serving.cli import main

    assert main(["status", "--url", "http://farm.invalid"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "    12gb: 2 replicas running (2-2), 0 busy, 0 queued"


def test_attach_worker_reports_per_class(monkeypatch):
    from serving import worker

    monkeypatch.setattr(worker, "worker_reports", lambda app=None: {"Worker_12gb": [_report("aaa")]})
    info = attach_worker_reports(json.loads(json.dumps(CLUSTER)))
    assert [len(c["workers"]) for c in info["classes"]] == [1, 0]

    def broken(app=None):
        raise RuntimeError("GCS down")

    monkeypatch.setattr(worker, "worker_reports", broken)
    info = attach_worker_reports(json.loads(json.dumps(CLUSTER)))
    assert [c["workers"] for c in info["classes"]] == [[], []]  # the status page still answers
