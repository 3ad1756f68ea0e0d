"""A `sim` worker never imports torch: not to set its threads, not to build its backend, not to
render a job. Importing torch takes seconds, and every replica of a `sim` farm (the tests, the
benches, `--simulate` farms) would pay it at each deploy. Checked in a fresh process (this one has
torch loaded by other tests), running the real `Worker` constructor and a whole job; only Ray's
runtime context (node id, actor name, GPU ids) is answered locally, since no Ray is started here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, types
import ray

ctx = types.SimpleNamespace(get_node_id=lambda: "n" * 56, get_actor_name=lambda: "SERVE_REPLICA::t#Worker_12gb#a")
ray.get_runtime_context = lambda: ctx  # no Ray here: what a replica's runtime context answers
ray.get_gpu_ids = lambda: []

from cluster.vram_classes import default_classes
from serving.config import load_settings
from serving.jobs import RenderRequest
from serving.worker import Worker
from tests.helpers import make_image
import io

tmp = sys.argv[1]
settings = load_settings({"model": MODEL, "job_db": tmp + "/jobs.sqlite3", "storage_url": "file://" + tmp + "/out",
                          "spool_dir": tmp + "/spool", "sim_time_scale": 0.001}, env={})
worker = Worker(default_classes()["12gb"].model_dump(), settings.resolved().model_dump())
after_init = "torch" in sys.modules
buf = io.BytesIO()
make_image(96, 80, 0).save(buf, "PNG")
job = RenderRequest(id="job1", params={"prompt": "waves", "resolution": "512p", "num_frames": 8,
                                       "num_inference_steps": 2},
                    image=buf.getvalue(), prefix="jobs/job1/", input_name="input.png")
done = worker._render(job, lambda step, total: None, lambda: False)
print(json.dumps({"after_init": after_init, "after_job": "torch" in sys.modules, "uploaded": done["uploaded"],
                  "device": worker.report()["device"], "threads": worker.report()["threads"]}))
"""


def _run(model: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("I2V_", "OMP_", "MKL_"))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.replace("MODEL", repr(model)), str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_sim_worker_starts_and_renders_without_importing_torch(tmp_path):
    out = _run("sim", tmp_path)
    assert out["after_init"] is False, "the sim worker's constructor imported torch"
    assert out["after_job"] is False, "rendering a sim job imported torch"
    assert out["uploaded"] is True and out["device"] == "sim"  # it really rendered and stored a job
    assert out["threads"] == len(os.sched_getaffinity(0))  # its threads are still set (for child processes)
