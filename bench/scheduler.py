"""Scheduler benchmark: spill-up vs strict class pinning on a simulated 12gb:2, 24gb:1 farm.

    .venv/bin/python -m bench.scheduler [--jobs 40] [--seed 0] [--time-scale 0.05] [--arrivals batch|poisson]
                                        [--rate R] [--policies spill,spill-idle,pinned] [--virtual-only]
                                        [--json FILE] [--no-progress]

What it does, in one run:

1. starts a `SimulatedCluster("12gb:2,24gb:1")` (three fake-GPU Ray nodes and a head node, all
   on 127.0.0.1) and Ray Serve's HTTP proxy on a free loopback port;
2. generates a deterministic mixed trace (`make_trace`): 70 % small jobs (512p, 8-16 frames,
   25-50 steps) and 30 % large ones (768p x 12/16/32 frames, 1024p x 16/20/24 frames, 20-40
   steps). By the cost model, 768p x 32 and 1024p x 16+ need more than 12 GiB, so they can only
   run on the 24gb GPU; 768p x 12/16 fit the 12gb class. With `--arrivals batch` (default) every
   job is submitted at t=0; `--arrivals poisson` spaces submissions by exponential gaps instead;
3. replays the trace in virtual time through the farm's own `Scheduler` (no Ray: every job takes
   exactly its predicted time, dispatched as the job manager does; `replay`), one row per policy:
   the rules alone, without the noise of a shared machine (`--virtual-only` stops here);
4. runs the trace through the real farm (the `sim` model, HTTP API, job manager, scheduler,
   workers, file storage) once per policy, each time on a fresh deployment with a fresh job store
   and storage directory: `spill` (the farm's default, `spill_rule=earliest_finish`: a job runs on
   the class among its own and the larger ones that would finish it first, counting the work
   queued and running there), `spill-idle` (`spill_rule=idle`, the rule before issue 16: a job
   runs on a larger class only when that one is idle and its own has no idle GPU) and `pinned`
   (`spill=False`: a job only ever runs on its home class);
5. compares each makespan with a lower bound computed from the cost model (below);
6. prints one row per policy and a one-line summary.

The `sim` model sleeps for the cost model's predicted seconds *on the GPU of the class it runs
on* times `sim_time_scale`: the 24gb class (an RTX 4090 in the cost model) runs every job about
6.3x faster than the 12gb class (an RTX 3060). So spilling a small job up is not just "using an
idle GPU": the big GPU does it in a sixth of the time.

How to read the table
---------------------
* `makespan s`: first submission -> last job finished (server timestamps), wall seconds.
* `/LB`: makespan over the lower bound (1.00 would be a provably optimal schedule; jobs' fixed
  overheads, which the bound leaves out, push it above 1 even for a perfect scheduler).
* `vs pinned`: makespan over the strict-pinning run's makespan (< 1: faster than pinning).
* `mean lat s` / `p95 lat s`: per job, its submission -> its finish (p95: linear interpolation).
* `spilled`: jobs that ran on a larger class than their home.
* `util <class>`: the class's busy time (sum over its jobs of finished_at - started_at, i.e.
  including per-job overheads) over (its GPUs x makespan).

The second table: jobs and busy seconds per class; `idle at end` (per class, summed over its
GPUs: makespan minus that GPU's last finish, i.e. how long it sat idle waiting for the others:
the schedule's tail imbalance); per-job overhead min/median/max, i.e. (finished_at - started_at)
minus the predicted sleep on the class the job ran on (Serve calls, the placeholder MP4 encode,
storing the files, the job store) - real costs the bound does not contain; `/(LB+oh)`, the
makespan over the bound recomputed with the smallest measured overhead added to every job (still
a valid bound, since every job paid at least that); the submission window (first -> last POST:
the dispatcher starts work while the batch is still being posted); and the run's wall time.
`--json FILE` writes every job's submit/start/finish times, class and node, for a timeline.

The lower bound
---------------
Two classes: `m_A` GPUs of the small class A (12gb, here 2) and `m_B` GPUs of the large class B
(24gb, here 1). Every job j has a home (the smallest class its estimated peak VRAM fits, exactly
as the farm places it) and predicted run times a_j on A and b_j on B (cost-model seconds x the
time scale; b_j < a_j here). B-homed jobs can run only on B. A-homed jobs can run on either
(spill-up; never down). Take any schedule with makespan T and write y_j = 1 if A-homed job j ran
on B, else 0. Every GPU works at most T, so

    (B)  W_B + sum_{j in A-homed} y_j b_j        <= m_B T       W_B = sum_{j in B-homed} b_j
    (A)  sum_{j in A-homed} (1 - y_j) a_j        <= m_A T

Relaxing y_j to [0, 1] gives a linear program whose optimum T_LP is <= the optimal makespan. It is
solved exactly (`_two_class_lp`): for a fixed amount c of B-time given to A-homed jobs, the A-load
left is smallest when the jobs with the largest a_j / b_j (A-seconds saved per B-second spent)
move first, fractionally (a fractional knapsack), so A-load(c) is convex, piecewise linear and
decreasing in c. T_LP is the smallest T >= W_B / m_B with A-load(m_B T - W_B) <= m_A T; walking the
jobs in that order, the segment where the two sides cross gives T in closed form:

    T = (L + r_k (W_B + C_k)) / (m_A + r_k m_B)

with L the A-load still on A, C_k the B-time already given away, r_k = a_k / b_k of the job being
moved. No job can be split, so also T >= max_j (fastest time of j on a class it may run on).

    LB = max(T_LP, max_j min_{eligible c} p_jc)

For the `pinned` policy (y_j = 0 forced) the same argument gives the weaker, policy-specific
`LB_pinned = max(W_B / m_B, sum a_j / m_A, max_j p_j,home)`; the table's `/LB` uses LB, the best any
policy could do on this hardware. With Poisson arrivals, jobs released at r_k or later cannot
start before r_k, so LB = max_k (r_k + LB(jobs released at or after r_k)), times from the first
submission (`lower_bound`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from serving.jobs import FINISHED

CLUSTER = {"12gb": 2, "24gb": 1}
#: Square input image: every resolution renders N x N (512x512, 768x768, 1024x1024).
IMAGE_SIDE = 64
SMALL_SHARE = 0.7
SMALL_FRAMES = (8, 12, 16)
SMALL_STEPS = (25, 50)
#: Large shapes, drawn uniformly. By the cost model 768p x 12/16 fit 12 GiB; the rest need 24gb.
LARGE_SHAPES = (("768p", 12), ("768p", 16), ("768p", 32), ("1024p", 16), ("1024p", 20), ("1024p", 24))
LARGE_STEPS = (20, 40)
#: Default: the pinned bound of the default trace is ~90 s, the shortest job (512p x 8 x 25 on the
#: 24gb GPU) sleeps ~0.5 s, the shortest on a 12gb GPU ~2.8 s; the whole bench takes ~3.5 min.
DEFAULT_TIME_SCALE = 0.05
POLL_S = 0.5
TERMINAL = FINISHED  # serving.jobs: the one definition of a finished job


# ------------------------------------------------------------------------------- the trace


@dataclass(frozen=True)
class TraceJob:
    """One job of the trace, with the cost model's view of it."""

    index: int
    resolution: str
    num_frames: int
    num_inference_steps: int
    arrival: float
    """Submission time, seconds after the first submission (0 for a batch)."""
    vram_bytes: int
    home: str
    """The class the farm places it in (smallest class its peak VRAM fits)."""
    seconds: dict[str, float]
    """Predicted cost-model seconds per class (before the sim time scale)."""

    def fields(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "num_frames": self.num_frames,
                "num_inference_steps": self.num_inference_steps}


def farm_classes():
    """The benchmark's classes (`12gb`, `24gb`), as the farm resolves them."""
    from cluster.vram_classes import default_classes

    return default_classes().subset(CLUSTER)


def describe_job(classes, resolution: str, num_frames: int, steps: int) -> tuple[int, str, dict[str, float]]:
    """(peak VRAM bytes, home class, cost-model seconds per class) of one job, as the farm sees it."""
    from pipeline.request import output_size
    from serving.scheduler import Scheduler, estimate_job

    width, height = output_size(resolution, IMAGE_SIDE, IMAGE_SIDE)
    vram, seconds = estimate_job(classes, width, height, num_frames, steps, guidance=True)  # default cfg 9.0
    return vram, Scheduler(classes).place(vram), seconds


def make_trace(n: int = 40, seed: int = 0, arrivals: str = "batch", rate: float | None = None,
               time_scale: float = DEFAULT_TIME_SCALE) -> list[TraceJob]:
    """A deterministic mixed trace of `n` jobs in submission order.

    `round(0.7 n)` small jobs and the rest large (see the module docstring), shuffled. `arrivals`:
    `batch` (all at t=0) or `poisson` with `rate` jobs per wall second (default: a rate that
    offers about 90 % of the farm's capacity, by the cost model at `time_scale`).
    """
    if n < 1:
        raise ValueError("the trace needs at least one job")
    rng = np.random.default_rng(seed)
    classes = farm_classes()
    n_small = round(SMALL_SHARE * n)
    shapes = [("512p", int(rng.choice(SMALL_FRAMES)), int(rng.integers(SMALL_STEPS[0], SMALL_STEPS[1] + 1)))
              for _ in range(n_small)]
    for _ in range(n - n_small):
        res, frames = LARGE_SHAPES[int(rng.integers(len(LARGE_SHAPES)))]
        shapes.append((res, frames, int(rng.integers(LARGE_STEPS[0], LARGE_STEPS[1] + 1))))
    order = rng.permutation(n)
    shapes = [shapes[i] for i in order]

    described = [describe_job(classes, *s) for s in shapes]
    if arrivals == "batch":
        times = [0.0] * n
    elif arrivals == "poisson":
        if rate is None:  # offered load ~0.9 of the fractional optimum of the same jobs in a batch
            probe = [TraceJob(i, *s, 0.0, *d) for i, (s, d) in enumerate(zip(shapes, described))]
            rate = 0.9 * n / (lower_bound(probe, time_scale).lp)
        gaps = rng.exponential(1.0 / rate, size=n)
        gaps[0] = 0.0
        times = list(np.cumsum(gaps))
    else:
        raise ValueError(f"arrivals must be batch or poisson, got {arrivals!r}")
    return [TraceJob(i, res, frames, steps, float(t), vram, home, seconds)
            for i, ((res, frames, steps), (vram, home, seconds), t) in enumerate(zip(shapes, described, times))]


# ------------------------------------------------------------------------------- lower bound


@dataclass(frozen=True)
class Bound:
    """Lower bounds on the makespan of a trace (wall seconds at the time scale)."""

    value: float
    """max(lp, longest): valid for any schedule that places jobs on their class or larger."""
    lp: float
    """The fractional (LP relaxation) bound."""
    longest: float
    """The longest job on the fastest class it may use."""
    pinned: float
    """The bound when every job must run on its home class (the `pinned` policy)."""
    w_large_only: float
    """Work that only the large class may do, over its GPUs."""
    release: float = 0.0
    """Arrival time of the suffix of jobs that gives `value` (0 for a batch)."""


def _two_class_lp(small: Sequence[tuple[float, float]], w_large: float, m_small: int, m_large: int) -> float:
    """Exact optimum T of the LP relaxation (see the module docstring).

    `small`: (a_j, b_j) of the small-homed jobs (time on the small class, on the large class);
    `w_large`: total time of the large-homed jobs (large class only).
    """
    a_total = sum(a for a, _ in small)
    if m_large == 0:
        return a_total / m_small if m_small else (float("inf") if a_total else 0.0)
    t = w_large / m_large
    if a_total <= m_small * t:
        return t
    left, given = a_total, 0.0  # A-load still on A; B-time already given to small jobs
    for a, b in sorted(small, key=lambda ab: ab[0] / ab[1], reverse=True):
        r = a / b
        t = (left + r * (w_large + given)) / (m_small + r * m_large)  # A-load(T) = m_A T on this segment
        if t <= (w_large + given + b) / m_large:
            return t
        left -= a
        given += b
    return (w_large + given) / m_large  # everything moved to B (left == 0)


def _eligible(home: str) -> tuple[str, ...]:
    """Classes a job homed in `home` may run on: its own and every larger one (spill-up)."""
    names = farm_classes().names
    return names[names.index(home):]


def _batch_bound(jobs: Sequence[TraceJob], scale: float, counts: dict[str, int], extra: float) -> Bound:
    small_name, large_name = farm_classes().names
    m_a, m_b = counts[small_name], counts[large_name]

    def p(job: TraceJob, c: str) -> float:
        return job.seconds[c] * scale + extra

    small = [(p(j, small_name), p(j, large_name)) for j in jobs if j.home == small_name]
    w_large = sum(p(j, large_name) for j in jobs if j.home == large_name)
    a_total = sum(a for a, _ in small)
    lp = _two_class_lp(small, w_large, m_a, m_b)
    longest = max((min(p(j, c) for c in _eligible(j.home)) for j in jobs), default=0.0)
    pinned = max(w_large / m_b if m_b else 0.0, a_total / m_a if m_a else 0.0,
                 max((p(j, j.home) for j in jobs), default=0.0))
    return Bound(value=max(lp, longest), lp=lp, longest=longest, pinned=pinned,
                 w_large_only=w_large / m_b if m_b else 0.0)


def lower_bound(jobs: Sequence[TraceJob], time_scale: float, counts: dict[str, int] | None = None,
                extra: float = 0.0) -> Bound:
    """Makespan lower bound (wall seconds from the first arrival) of `jobs` at `time_scale`.

    `extra`: seconds added to every job's run time on any class (a per-job overhead known to be
    paid by every job; 0 for the pure cost-model bound).

    With release times: the maximum over each arrival r of r + the batch bound of the jobs
    arriving at r or later (those cannot start earlier). For a batch this is the batch bound.
    The fields are those of the suffix giving the largest `value`; `pinned` is maximized on its own.
    """
    counts = counts or CLUSTER
    if not jobs:
        return Bound(value=0.0, lp=0.0, longest=0.0, pinned=0.0, w_large_only=0.0)
    suffixes = []
    for r in sorted({j.arrival for j in jobs}):
        b = _batch_bound([j for j in jobs if j.arrival >= r], time_scale, counts, extra)
        suffixes.append(Bound(value=r + b.value, lp=r + b.lp, longest=r + b.longest, pinned=r + b.pinned,
                              w_large_only=r + b.w_large_only, release=r))
    best = max(suffixes, key=lambda b: b.value)
    return dataclasses.replace(best, pinned=max(b.pinned for b in suffixes))


# ------------------------------------------------------------------------------- running a policy


@dataclass
class PolicyRun:
    """What one policy's run measured (wall-clock epoch seconds)."""

    policy: str
    spill: bool
    submitted: dict[str, float]
    """job id -> client time just before its POST."""
    trace_of: dict[str, TraceJob]
    jobs: dict[str, dict[str, Any]]
    """job id -> the final job record from GET /v1/jobs."""
    submit_window: float
    wall: float
    """Seconds the whole run took (deploy, jobs, teardown)."""
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for jid, rec in self.jobs.items():
            if rec.get("started_at"):
                self.started[jid] = _epoch(rec["started_at"])
            if rec.get("finished_at"):
                self.finished[jid] = _epoch(rec["finished_at"])


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def png_bytes(side: int = IMAGE_SIDE) -> bytes:
    """A small deterministic square PNG (the input image of every job)."""
    import PIL.Image

    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (x + y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(img, "RGB").save(buf, "PNG")
    return buf.getvalue()


@contextlib.contextmanager
def simulated_farm_cluster() -> Iterator[int]:
    """A `SimulatedCluster` with Serve's proxy on a free loopback port; yields the port."""
    from ray import serve

    from cluster.simulated import SimulatedCluster
    from serving.harness import start_serve

    spec = ",".join(f"{name}:{n}" for name, n in CLUSTER.items())
    logging.getLogger("ray").setLevel(logging.WARNING)  # start-up chatter on stderr
    sim = SimulatedCluster(spec, head_cpus=4, node_cpus=2).start()
    try:
        sim.connect(namespace="i2v-bench", log_to_driver=False, logging_level=logging.WARNING)
        port = start_serve()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "deployed", "deleting" chatter
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            sim.shutdown()


def _deploy(port: int, workdir: Path, spill: bool, time_scale: float, backlog: int, spill_rule: str):
    import requests

    from serving import harness
    from serving.config import load_settings

    overrides: dict[str, Any] = {
        "model": "sim", "spill": spill, "spill_rule": spill_rule, "sim_time_scale": time_scale,
        "backlog_limit": backlog,
        "job_db": str(workdir / "jobs.sqlite3"), "storage_url": f"file://{workdir / 'outputs'}",
        "spool_dir": str(workdir / "spool"), "workers": harness.workers_for(CLUSTER),
    }
    url = f"http://127.0.0.1:{port}"
    harness.deploy(load_settings(overrides, env={}), url, CLUSTER, timeout=180)
    return url, requests.Session()


def _list_jobs(session, url: str) -> list[dict[str, Any]]:
    jobs, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor is not None:
            params["cursor"] = cursor
        r = session.get(url + "/v1/jobs", params=params, timeout=30)
        r.raise_for_status()
        body = r.json()
        jobs.extend(body["jobs"])
        cursor = body.get("next_cursor")
        if cursor is None:
            return jobs


def run_policy(port: int, trace: Sequence[TraceJob], *, policy: str, spill: bool, time_scale: float,
               timeout: float, progress: bool = True, spill_rule: str = "earliest_finish") -> PolicyRun:
    """Deploy a fresh farm (fresh job store and storage), submit the trace over HTTP at its arrival
    times, wait for every job to end, tear the application down; return what was measured."""
    import requests
    from ray import serve
    from tqdm import tqdm

    from serving.app import APP_NAME

    wall0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"i2v-bench-{policy}-") as tmp:
        url, session = _deploy(port, Path(tmp), spill, time_scale, backlog=max(100, len(trace)),
                               spill_rule=spill_rule)
        image = base64.b64encode(png_bytes()).decode()
        submitted: dict[str, float] = {}
        trace_of: dict[str, TraceJob] = {}
        errors: list[str] = []

        def submit_all() -> None:
            post = requests.Session()
            t0 = time.time()
            for job in trace:
                delay = t0 + job.arrival - time.time()
                if delay > 0:
                    time.sleep(delay)
                body = {"prompt": f"bench job {job.index}", "image": image, **job.fields()}
                at = time.time()
                r = post.post(url + "/v1/jobs", json=body, timeout=60)
                if r.status_code != 202:
                    errors.append(f"job {job.index}: HTTP {r.status_code} {r.text[:200]}")
                    return
                reply = r.json()
                if reply["vram_class"] != job.home:
                    errors.append(f"job {job.index}: farm placed it in {reply['vram_class']}, expected {job.home}")
                submitted[reply["id"]] = at
                trace_of[reply["id"]] = job

        submitter = threading.Thread(target=submit_all, name="submit", daemon=True)
        submitter.start()
        deadline = time.monotonic() + timeout
        bar = tqdm(total=len(trace), desc=f"{policy:>7}", unit="job", disable=not progress, leave=True,
                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        try:
            while True:
                if errors:
                    raise RuntimeError("; ".join(errors))
                jobs = _list_jobs(session, url)
                done = sum(j["status"] in TERMINAL for j in jobs)
                running = sum(j["status"] == "running" for j in jobs)
                bar.update(done - bar.n)
                bar.set_postfix_str(f"running {running}, queued {len(jobs) - done - running}")
                if not submitter.is_alive() and done == len(trace) == len(jobs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{policy}: {len(trace) - done} jobs unfinished after {timeout:.0f} s")
                time.sleep(POLL_S)
        finally:
            bar.close()
            submitter.join(timeout=60)
            times = sorted(submitted.values())
            serve.delete(APP_NAME)
    by_id = {j["id"]: j for j in jobs}
    return PolicyRun(policy=policy, spill=spill, submitted=submitted, trace_of=trace_of, jobs=by_id,
                     submit_window=(times[-1] - times[0]) if times else 0.0, wall=time.monotonic() - wall0)


# ------------------------------------------------------------------------------- metrics and report


@dataclass(frozen=True)
class Metrics:
    policy: str
    makespan: float
    mean_latency: float
    p95_latency: float
    spilled: int
    failed: int
    busy: dict[str, float]
    """Class -> summed (finished - started) of the jobs that ran there."""
    ran: dict[str, int]
    """Class -> jobs that ran there."""
    utilization: dict[str, float]
    idle_at_end: dict[str, float]
    """Class -> summed over its GPUs: makespan minus the GPU's last finish (waiting for the others)."""
    overhead_median: float
    overhead_min: float
    overhead_max: float
    submit_window: float
    wall: float


def summarize(run: PolicyRun, time_scale: float) -> Metrics:
    """Makespan, latencies, spills, per-class busy time and per-job overheads of one run."""
    t0 = min(run.submitted.values())
    ok = [jid for jid, rec in run.jobs.items() if rec["status"] == "succeeded"]
    makespan = max(run.finished[jid] for jid in run.jobs) - t0
    latencies = [run.finished[jid] - run.submitted[jid] for jid in run.jobs]
    busy = {c: 0.0 for c in CLUSTER}
    ran = {c: 0 for c in CLUSTER}
    overheads = []
    last_finish: dict[tuple[str, str], float] = {}  # (class, node) -> its last job's finish
    for jid in ok:
        rec, job = run.jobs[jid], run.trace_of[jid]
        on = rec["vram_class"]
        span = run.finished[jid] - run.started[jid]
        busy[on] += span
        ran[on] += 1
        overheads.append(span - job.seconds[on] * time_scale)
        key = (on, rec.get("node") or "?")
        last_finish[key] = max(last_finish.get(key, t0), run.finished[jid])
    idle_at_end = {c: makespan * (CLUSTER[c] - sum(k[0] == c for k in last_finish)) for c in CLUSTER}
    for (c, _), at in last_finish.items():
        idle_at_end[c] += makespan - (at - t0)
    return Metrics(
        policy=run.policy,
        makespan=makespan,
        mean_latency=statistics.fmean(latencies),
        p95_latency=float(np.percentile(latencies, 95)),
        spilled=sum(bool(run.jobs[jid].get("spilled")) for jid in ok),
        failed=len(run.jobs) - len(ok),
        busy=busy,
        ran=ran,
        utilization={c: busy[c] / (CLUSTER[c] * makespan) for c in CLUSTER},
        idle_at_end=idle_at_end,
        overhead_median=statistics.median(overheads) if overheads else float("nan"),
        overhead_min=min(overheads, default=float("nan")),
        overhead_max=max(overheads, default=float("nan")),
        submit_window=run.submit_window,
        wall=run.wall,
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@dataclass(frozen=True)
class Replay:
    """One policy replayed in virtual time (`replay`)."""

    policy: str
    makespan: float
    spilled: int
    ran: dict[str, int]


def replay(trace: Sequence[TraceJob], time_scale: float, policy: str, overhead: float = 0.0) -> Replay:
    """The trace through the farm's own `Scheduler` in virtual time, dispatched as the job manager
    does: at every arrival and every finish, `assign` gets the idle slots per class (and, for the
    earliest-finish rule, each running job's predicted seconds left). A job runs its predicted
    seconds on the class it lands on, plus `overhead`."""
    from serving.scheduler import QueuedJob, Scheduler

    spill, rule = POLICIES[policy]
    sched = Scheduler(farm_classes(), backlog_limit=None, spill=spill)
    running: dict[str, list[tuple[float, float]]] = {c: [] for c in CLUSTER}  # (ends at, predicted end)
    pending = sorted(trace, key=lambda j: (j.arrival, j.index))
    now, at, ends, spilled = 0.0, 0, [], 0
    ran = {c: 0 for c in CLUSTER}
    while at < len(pending) or any(running.values()):
        while at < len(pending) and pending[at].arrival <= now:
            job = pending[at]
            sched.admit(QueuedJob(str(job.index), job.vram_bytes,
                                  {c: s * time_scale for c, s in job.seconds.items()},
                                  seq=job.index, home=job.home))
            at += 1
        free = {c: CLUSTER[c] - len(running[c]) for c in CLUSTER}
        busy = {c: [max(0.0, p - now) for _, p in running[c]] for c in CLUSTER}
        for job, on in sched.assign(free, busy=busy if rule == "earliest_finish" else None):
            secs = job.seconds[on]
            running[on].append((now + secs + overhead, now + secs))
            ran[on] += 1
            spilled += on != job.home
        upcoming = [e for r in running.values() for e, _ in r]
        if at < len(pending):
            upcoming.append(pending[at].arrival)
        now = min(upcoming)
        for c in CLUSTER:
            ends += [e for e, _ in running[c] if e <= now]
            running[c] = [r for r in running[c] if r[0] > now]
    return Replay(policy, max(ends, default=0.0), spilled, ran)


def print_replay(trace: Sequence[TraceJob], time_scale: float, policies: Sequence[str], bound: Bound) -> None:
    """The virtual-time table: each policy's makespan over the same lower bound."""
    rows = []
    for name in policies:
        r = replay(trace, time_scale, name)
        rows.append([name, f"{r.makespan:.2f}", f"{r.makespan / bound.value:.3f}", str(r.spilled),
                     *(str(r.ran[c]) for c in CLUSTER)])
    print("virtual time (the farm's Scheduler, every job exactly its predicted time, no overhead):")
    print(_table(["policy", "makespan s", "/LB", "spilled", *(f"jobs on {c}" for c in CLUSTER)], rows))
    print()


def print_header(args: argparse.Namespace, trace: Sequence[TraceJob], bound: Bound) -> None:
    import ray

    classes = farm_classes()
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    print("i2v-farm scheduler benchmark")
    print(f"machine: {platform.node()} {platform.machine()}, {cores} cores ({usable} usable), "
          f"{platform.system()} {platform.release()}; Python {platform.python_version()}, Ray {ray.__version__}")
    print("cluster: " + ", ".join(f"{c.name} x{CLUSTER[c.name]} ({c.gpu}, {c.gpu_spec.peak_tflops:g} TFLOPS)"
                                   for c in classes) + "; sim model, all on 127.0.0.1")
    print(f"parameters: jobs={args.jobs} seed={args.seed} time_scale={args.time_scale:g} "
          f"arrivals={args.arrivals}" + (f" rate={args.rate:g}/s" if args.rate else ""))
    small, large = classes.names
    homes = {c: [j for j in trace if j.home == c] for c in classes.names}
    shapes = Counter((j.resolution, j.num_frames, j.home) for j in trace)
    mix = ", ".join(f"{r} x{f}->{h}: {n}" for (r, f, h), n in sorted(shapes.items()))
    print(f"trace: {len(trace)} jobs; home {small}: {len(homes[small])}, home {large}: {len(homes[large])} ({mix})")
    sleep_small = sorted(j.seconds[small] * args.time_scale for j in homes[small])
    sleep_large_all = sorted(j.seconds[large] * args.time_scale for j in trace)
    print(f"predicted sleep per job: on {large} {sleep_large_all[0]:.2f}-{sleep_large_all[-1]:.2f} s; "
          f"{small}-homed jobs on {small} {sleep_small[0]:.2f}-{sleep_small[-1]:.2f} s "
          f"(sum {sum(sleep_small):.1f} s); speed ratio {small}/{large} "
          f"{min(j.seconds[small] / j.seconds[large] for j in trace):.2f}-"
          f"{max(j.seconds[small] / j.seconds[large] for j in trace):.2f}x")
    print(f"lower bound: LB = {bound.value:.2f} s = max(LP {bound.lp:.2f}, longest job {bound.longest:.2f})"
          + (f", from the jobs arriving at {bound.release:.2f} s" if bound.release else "")
          + f"; {large}-only work / {CLUSTER[large]} GPU = {bound.w_large_only:.2f} s; "
          f"LB with strict pinning = {bound.pinned:.2f} s")
    print()


def print_report(metrics: Sequence[Metrics], bound: Bound, with_overhead: Bound, overhead: float,
                 total_wall: float) -> None:
    """The policy table, the details table, and the one-line summary."""
    pinned = next((m for m in metrics if m.policy == "pinned"), None)
    spill = next((m for m in metrics if m.policy == "spill"), None)
    classes = list(CLUSTER)
    headers = ["policy", "makespan s", "/LB", "vs pinned", "mean lat s", "p95 lat s", "spilled",
               *(f"util {c}" for c in classes), "failed"]
    rows = [[m.policy, f"{m.makespan:.2f}", f"{m.makespan / bound.value:.3f}",
             f"{m.makespan / pinned.makespan:.3f}" if pinned else "-",
             f"{m.mean_latency:.2f}", f"{m.p95_latency:.2f}", str(m.spilled),
             *(f"{m.utilization[c]:.0%}" for c in classes), str(m.failed)] for m in metrics]
    print(_table(headers, rows))
    print()
    headers = ["policy", *(f"jobs on {c}" for c in classes), *(f"busy {c} s" for c in classes),
               *(f"idle at end {c} s" for c in classes), "overhead/job s min/med/max", "/(LB+oh)",
               "submit window s", "run wall s"]
    rows = [[m.policy, *(str(m.ran[c]) for c in classes), *(f"{m.busy[c]:.1f}" for c in classes),
             *(f"{m.idle_at_end[c]:.1f}" for c in classes),
             f"{m.overhead_min:.2f}/{m.overhead_median:.2f}/{m.overhead_max:.2f}",
             f"{m.makespan / with_overhead.value:.3f}", f"{m.submit_window:.2f}", f"{m.wall:.1f}"]
            for m in metrics]
    print(_table(headers, rows))
    print("overhead/job: (finished_at - started_at) - predicted sleep on the class it ran on; busy and util "
          "include it, LB does not.")
    print(f"LB+oh: LB with the smallest measured overhead ({overhead:.2f} s) added to every job = "
          f"{with_overhead.value:.2f} s. idle at end: per class, summed over its GPUs, makespan - that "
          f"GPU's last finish.")
    if pinned:
        print(f"pinned makespan / LB with strict pinning ({bound.pinned:.2f} s) = {pinned.makespan / bound.pinned:.3f}")
    print()
    idle = next((m for m in metrics if m.policy == "spill-idle"), None)
    if spill and pinned:
        print(f"summary: spill makespan/LB = {spill.makespan / bound.value:.3f}"
              + (f" (spill-idle, the rule before: {idle.makespan / bound.value:.3f})" if idle else "")
              + f", spill makespan vs strict pinning = {spill.makespan / pinned.makespan:.3f} "
              f"(pinned makespan/LB = {pinned.makespan / bound.value:.3f}); total {total_wall:.0f} s")
    else:
        print(f"summary: total {total_wall:.0f} s")


def write_json(path: Path, args: argparse.Namespace, bound: Bound, runs: Sequence[PolicyRun],
               metrics: Sequence[Metrics]) -> None:
    """Every job of every run (times relative to the run's first submission), for a closer look."""
    out: dict[str, Any] = {"parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "cluster": CLUSTER, "bound": dataclasses.asdict(bound),
                           "runs": []}
    for run, m in zip(runs, metrics):
        t0 = min(run.submitted.values())
        jobs = []
        for jid, rec in run.jobs.items():
            job = run.trace_of[jid]
            on = rec["vram_class"]
            jobs.append({
                **dataclasses.asdict(job), "id": jid, "status": rec["status"], "ran_on": on, "node": rec.get("node"),
                "spilled": bool(rec.get("spilled")), "submitted": run.submitted[jid] - t0,
                "started": run.started.get(jid, t0) - t0, "finished": run.finished.get(jid, t0) - t0,
                "predicted_sleep": job.seconds[on] * args.time_scale,
            })
        jobs.sort(key=lambda j: j["index"])
        out["runs"].append({"policy": run.policy, "spill": run.spill, "spill_rule": POLICIES[run.policy][1],
                            "metrics": dataclasses.asdict(m), "jobs": jobs})
    path.write_text(json.dumps(out, indent=1) + "\n")


# ------------------------------------------------------------------------------- main


#: name -> (spill, spill_rule)
POLICIES: dict[str, tuple[bool, str]] = {
    "spill": (True, "earliest_finish"), "spill-idle": (True, "idle"), "pinned": (False, "idle"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=40, help="jobs in the trace (default 40)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    p.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE,
                   help=f"sim seconds per cost-model second (default {DEFAULT_TIME_SCALE})")
    p.add_argument("--arrivals", choices=("batch", "poisson"), default="batch",
                   help="batch: every job at t=0 (default); poisson: exponential gaps")
    p.add_argument("--rate", type=float, default=None,
                   help="poisson arrivals per second (default: ~90%% of the farm's capacity)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated subset of: {', '.join(POLICIES)}")
    p.add_argument("--virtual-only", action="store_true",
                   help="only the virtual-time replay through the scheduler (no Ray, a second)")
    p.add_argument("--json", type=Path, default=None, help="also write every job's timings to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Metrics]:
    args = parse_args(argv)
    wall0 = time.monotonic()
    wanted = [s.strip() for s in args.policies.split(",") if s.strip()]
    policies = [name for name in POLICIES if name in wanted]
    if not policies or len(policies) != len(wanted):
        raise SystemExit(f"--policies: choose from {', '.join(POLICIES)}")
    trace = make_trace(args.jobs, args.seed, args.arrivals, args.rate, args.time_scale)
    bound = lower_bound(trace, args.time_scale)
    print_header(args, trace, bound)
    print_replay(trace, args.time_scale, policies, bound)
    sys.stdout.flush()
    if args.virtual_only:
        return []
    # Generous: the pinned bound plus the last arrival, x3, plus start-up.
    timeout = 3 * (bound.pinned + trace[-1].arrival) + 300
    runs, metrics = [], []
    with simulated_farm_cluster() as port:
        for name in policies:
            spill, rule = POLICIES[name]
            run = run_policy(port, trace, policy=name, spill=spill, time_scale=args.time_scale,
                             timeout=timeout, progress=not args.no_progress, spill_rule=rule)
            runs.append(run)
            metrics.append(summarize(run, args.time_scale))
    overhead = max(0.0, min(m.overhead_min for m in metrics))
    with_overhead = lower_bound(trace, args.time_scale, extra=overhead)
    print()
    print_report(metrics, bound, with_overhead, overhead, time.monotonic() - wall0)
    if args.json:
        write_json(args.json, args, bound, runs, metrics)
        print(f"per-job timings: {args.json}")
    return metrics


if __name__ == "__main__":
    main()
