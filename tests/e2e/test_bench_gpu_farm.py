"""`python -m bench.gpu_farm --smoke`: the GPU farm bench, run end to end on the CPU with tiny-random.

It starts `i2v-farm up` in a child process as the GPU run does, sends jobs over HTTP, renders the
same job in-process and writes the JSON; the GPU run differs only in the model and the shape.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_farm_bench_runs_end_to_end_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_farm", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + \
        (tmp_path / "farm.log").read_text()[-3000:]
    result = json.loads((tmp_path / "gpu-farm-serving-cpu-smoke.json").read_text())
    sequential = result["farm"]["sequential"]
    assert len(sequential) == 2 and sequential[0]["warm_up"] and not sequential[1]["warm_up"]
    assert all(r["vram_class"] for r in sequential) and all(r["video_bytes"] > 0 for r in sequential)
    assert all("params_peak_vram_bytes" in r for r in sequential)  # None on the CPU (no VRAM)
    burst = result["farm"]["concurrent"]
    assert len(burst) == 2 and max(r["queue_s"] for r in burst) >= 0
    assert len(result["in_process"]["rows"]) == 2
    summary = result["summary"]
    assert summary["farm_s"] > 0 and summary["in_process_s"] > 0
    assert summary["added_s"] == pytest.approx(summary["farm_s"] - summary["in_process_s"])
