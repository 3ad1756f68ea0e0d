"""`bench.scheduler`: its makespan lower bound, and one tiny run of the whole bench (slow)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.scheduler import POLICIES, Bound, TraceJob, _two_class_lp, lower_bound, make_trace, replay

ROOT = Path(__file__).resolve().parents[2]
MACHINES = ("12gb", "12gb", "24gb")  # the bench's cluster: 2 small GPUs, 1 large


def _job(i: int, home: str, a: float, b: float, arrival: float = 0.0) -> TraceJob:
    return TraceJob(i, "512p", 8, 10, arrival, 0, home, {"12gb": a, "24gb": b})


def _optimum(jobs: list[TraceJob]) -> float:
    """Best makespan over every placement (jobs on their class or larger; batch, no splitting)."""
    best = float("inf")
    for placement in itertools.product(range(len(MACHINES)), repeat=len(jobs)):
        load = [0.0] * len(MACHINES)
        for job, m in zip(jobs, placement):
            cls = MACHINES[m]
            if job.home == "24gb" and cls == "12gb":
                break  # never down
            load[m] += job.seconds[cls]
        else:
            best = min(best, max(load))
    return best


def test_lp_is_exact_on_a_hand_example():
    # Two small-homed jobs of 6 s on a 12gb GPU, 1 s on the 24gb one. Fractionally the 24gb GPU
    # takes the first and half the second (1.5 s); the 12gb GPUs share the other half (3 s / 2).
    assert _two_class_lp([(6.0, 1.0), (6.0, 1.0)], 0.0, 2, 1) == pytest.approx(1.5)
    bound = lower_bound([_job(0, "12gb", 6, 1), _job(1, "12gb", 6, 1)], time_scale=1.0)
    assert bound.value == pytest.approx(1.5) and bound.pinned == pytest.approx(6.0)
    assert _optimum([_job(0, "12gb", 6, 1), _job(1, "12gb", 6, 1)]) == pytest.approx(2.0)
    # Only large-only work: the 24gb GPU alone, the small GPUs cannot help.
    assert _two_class_lp([], 7.0, 2, 1) == pytest.approx(7.0)


def test_lower_bound_never_exceeds_the_optimum():
    rng = np.random.default_rng(1)
    for _ in range(300):
        jobs = []
        for i in range(int(rng.integers(1, 7))):
            b = float(rng.uniform(0.5, 5.0))
            a = b * float(rng.uniform(1.0, 8.0))
            jobs.append(_job(i, "24gb" if rng.random() < 0.3 else "12gb", a, b))
        bound = lower_bound(jobs, time_scale=1.0)
        opt = _optimum(jobs)
        assert bound.value <= opt + 1e-9, (bound, opt, jobs)
        assert bound.value >= max(bound.lp, bound.longest) - 1e-12


def test_release_times_only_raise_the_bound():
    trace = make_trace(12, seed=3, arrivals="poisson", rate=0.5, time_scale=0.05)
    batch = [TraceJob(j.index, j.resolution, j.num_frames, j.num_inference_steps, 0.0, j.vram_bytes, j.home,
                      j.seconds) for j in trace]
    with_release, at_once = lower_bound(trace, 0.05), lower_bound(batch, 0.05)
    assert isinstance(with_release, Bound)
    assert with_release.value >= at_once.value
    assert with_release.value >= trace[-1].arrival


def test_trace_is_deterministic_and_mixed():
    a, b = make_trace(40, seed=7), make_trace(40, seed=7)
    assert a == b and a != make_trace(40, seed=8)
    assert sum(j.resolution == "512p" for j in a) == 28
    homes = {j.home for j in a if j.resolution != "512p"}
    assert homes == {"12gb", "24gb"}  # some large jobs fit 12gb, some need 24gb
    assert all(j.home == "12gb" for j in a if j.resolution == "512p")


def test_replay_through_the_scheduler_earliest_finish_is_near_the_bound():
    trace = make_trace(40, seed=0)  # the bench's default trace
    bound = lower_bound(trace, 0.05)
    runs = {name: replay(trace, 0.05, name) for name in POLICIES}
    for name, run in runs.items():
        assert run.makespan >= bound.value - 1e-9, name  # every job takes its predicted time: never below
        assert sum(run.ran.values()) == len(trace)
    assert runs["pinned"].spilled == 0 and runs["pinned"].makespan >= bound.pinned - 1e-9
    assert runs["spill"].makespan <= 1.05 * bound.value  # issue 16: at or under 1.05x (the rule before: 1.04)
    assert runs["spill"].makespan < runs["spill-idle"].makespan < runs["pinned"].makespan
    # over other seeds too the earliest-finish rule is never worse than the rule before
    for seed in range(1, 6):
        trace = make_trace(40, seed=seed)
        assert replay(trace, 0.05, "spill").makespan <= replay(trace, 0.05, "spill-idle").makespan + 1e-9


@pytest.mark.slow
def test_the_bench_runs_end_to_end():
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(  # seed 2: 4 small jobs, 2 that need the 24gb class
        [sys.executable, "-m", "bench.scheduler", "--jobs", "6", "--seed", "2", "--time-scale", "0.01",
         "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("policy") and "vs pinned" in line)
    table = lines[header + 2:header + 5]  # the policy table: header, rule, one row per policy
    rows = {line.split()[0]: line.split() for line in table}
    assert set(rows) == {"spill", "spill-idle", "pinned"}, out
    for row in rows.values():
        assert float(row[2]) >= 1.0, out  # makespan / LB: the sim sleeps at least the predicted time
        assert row[-1] == "0", out  # no failed job
    assert rows["pinned"][6] == "0", out  # strict pinning never spills
    assert "summary: spill makespan/LB = " in out
