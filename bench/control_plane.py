"""Control-plane scale: 1,000 `sim` jobs through the farm's HTTP API, scheduler and job manager.

    .venv/bin/python -m bench.control_plane [--jobs 1000] [--clients 4] [--steps 30] [--time-scale 0.001]
                                            [--cluster 12gb:2,24gb:1] [--progress-interval S]
                                            [--no-profile] [--json FILE]

What it does, in one run:

1. **farm** (HTTP, real Ray Serve): starts a `SimulatedCluster` (default `12gb:2,24gb:1`), Serve on a
   free loopback port and the farm with the `sim` model, a backlog limit above the job count
   (`max(2000, 2 x jobs)`) and a tiny `sim_time_scale`, so a job's simulated GPU time is
   milliseconds and what is measured is the control plane: ingress, job manager, scheduler,
   SQLite job store, Serve's streaming calls to the workers, the placeholder MP4 and storage;
2. submits `--jobs` identical jobs (512p, 8 frames, `--steps` steps; all fit the 12gb class) from
   `--clients` threads, each with its own `requests.Session`, as fast as they are answered, and
   records every `POST /v1/jobs` latency and the `queue_position` it answers (the backlog the job
   joined). The workers drain the queue meanwhile, but slower than it fills, so the backlog grows;
3. prints submission latency p50/p99 of the first and the last hundred submissions (and per
   tenth), the last/first ratio (it must not grow with the backlog), the cost of reading a job
   (`GET /v1/jobs/{id}`) and a page of 500 (`GET /v1/jobs?limit=500`) with the backlog full and
   after it drained, and the throughput the manager sustains: jobs started per second (first
   start -> last start) and finished per second, with the steady state (middle 80 %) apart, and
   where the CPU went: seconds and milliseconds per job of each part of the farm (the manager, the
   ingress, the workers and their ffmpeg encodes, Serve's proxy and controller, Ray's GCS and
   raylets), read from /proc for the processes under this one (Linux);
4. **manager alone** (no Ray, no HTTP; skip with `--no-profile`): the same submissions straight
   into a `serving.manager.JobManager` whose dispatch loop is stopped (so the backlog only
   grows), timed per hundred and profiled with cProfile: where a submission's time goes and
   whether any of it grows with the backlog.

Latency percentiles: linear interpolation (numpy's default), over each group of submissions in
submission order.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import inspect
import io
import json
import logging
import os
import pstats
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.generation import describe_machine, machine, table
from serving.jobs import FINISHED

TERMINAL = FINISHED  # serving.jobs: the one definition of a finished job
DEFAULT_CLUSTER = "12gb:2,24gb:1"
GROUP = 100


# ------------------------------------------------------------------------------- pure pieces


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; nan for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


@dataclass(frozen=True)
class LatencyGroup:
    label: str
    count: int
    p50: float
    p99: float


def latency_groups(latencies: Sequence[float], size: int = GROUP) -> tuple[LatencyGroup, LatencyGroup]:
    """p50/p99 of the first and the last `size` latencies (in submission order)."""
    if len(latencies) < 2 * size:
        size = max(1, len(latencies) // 2)
    first, last = latencies[:size], latencies[-size:]
    return (LatencyGroup(f"first {len(first)}", len(first), percentile(first, 50), percentile(first, 99)),
            LatencyGroup(f"last {len(last)}", len(last), percentile(last, 50), percentile(last, 99)))


def growth_verdict(first: LatencyGroup, last: LatencyGroup, tolerance: float = 1.5,
                   floor_s: float = 0.005) -> tuple[bool, str]:
    """Does submission latency grow with the backlog? Flat when the last hundred's p50 is within
    `tolerance` x the first's (or within `floor_s` of it: timer and scheduling noise)."""
    ratio = last.p50 / first.p50 if first.p50 > 0 else float("inf")
    flat = ratio <= tolerance or last.p50 - first.p50 <= floor_s
    return flat, f"p50 last/first = {ratio:.2f} ({'flat' if flat else 'GROWS with the backlog'})"


def rate(times: Sequence[float], trim: float = 0.0) -> float:
    """Events per second between the first and the last of `times` (after trimming a fraction
    `trim` off each end: the steady state); nan with fewer than two events."""
    ts = sorted(times)
    k = int(len(ts) * trim)
    ts = ts[k: len(ts) - k] if k else ts
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return float("nan")
    return (len(ts) - 1) / (ts[-1] - ts[0])


def tenths(latencies: Sequence[float], backlog: Sequence[float | None]) -> list[list[str]]:
    """Rows per tenth of the submissions: index range, median backlog joined, p50, p99 (ms)."""
    n = len(latencies)
    rows = []
    for i in range(10):
        lo, hi = n * i // 10, n * (i + 1) // 10
        if hi <= lo:
            continue
        q = [b for b in backlog[lo:hi] if b is not None]
        rows.append([f"{lo + 1}-{hi}", f"{np.median(q):.0f}" if q else "-",
                     f"{1000 * percentile(latencies[lo:hi], 50):.1f}",
                     f"{1000 * percentile(latencies[lo:hi], 99):.1f}"])
    return rows


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def parse_cluster(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, n = part.strip().partition(":")
        if not name or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"cluster must look like 12gb:2,24gb:1, got {text!r}")
        out[name] = int(n)
    return out


def job_body(index: int, image_b64: str, steps: int) -> dict[str, Any]:
    return {"prompt": f"control plane job {index}", "image": image_b64, "resolution": "512p",
            "num_frames": 8, "num_inference_steps": steps, "seed": index}


# ------------------------------------------------------------------------------- CPU per process


ENCODES = "ffmpeg (the workers' encodes)"
_REPLICA = re.compile(r"ServeReplica:[^:\s]+:([A-Za-z0-9_]+)")


def process_group(cmdline: str) -> str:
    """The part of the farm a process is, from its command line (Ray names a worker process
    `ray::ServeReplica:APP:DEPLOYMENT...`): a deployment (`JobManager`, `FarmApi`, `Worker_12gb`),
    `Serve proxy`, `Serve controller`, `Ray core` (GCS, raylets), `ffmpeg` or `Ray other` (dashboard,
    agents, idle workers)."""
    m = _REPLICA.search(cmdline)
    if m:
        name = m.group(1)
        return "Worker (all)" if name.startswith("Worker_") else name
    if "ProxyActor" in cmdline:
        return "Serve proxy"
    if "ServeController" in cmdline:
        return "Serve controller"
    if "gcs_server" in cmdline or "/raylet" in cmdline:
        return "Ray core (GCS, raylets)"
    if "ffmpeg" in cmdline.split(" ", 1)[0]:
        return ENCODES
    return "Ray other"


def _proc_table() -> dict[int, tuple[int, str, float, float]]:
    """pid -> (parent pid, command line, CPU seconds so far, CPU seconds of its children that
    ended and were waited for) of every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(entry.name)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick,
                                (int(fields[13]) + int(fields[14])) / tick)
    return out


def cpu_by_group(root: int | None = None) -> dict[str, float] | None:
    """CPU seconds used so far by each part of the farm (`process_group`): the processes under
    `root` (default: this process, which started the simulated cluster, so another Ray cluster on
    the machine is not counted); this process itself is `bench (clients)`. None off Linux."""
    if not Path("/proc/self/stat").exists():
        return None
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        _, cmd, cpu, ended = table[pid]
        group = process_group(cmd)
        out[group] = out.get(group, 0.0) + cpu
        if group == "Worker (all)":  # a worker's ended children: its ffmpeg encodes
            out[ENCODES] = out.get(ENCODES, 0.0) + ended
    if root in table:
        out["bench (clients)"] = table[root][2]
    return out


def cpu_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """CPU seconds per group between two `cpu_by_group` readings (processes that ended between
    them are missed; a farm's processes live through the run)."""
    if not before or not after:
        return {}
    return {g: max(0.0, after[g] - before.get(g, 0.0)) for g in after}


def cpu_rows(cpu: dict[str, float], jobs: int, wall_s: float) -> list[list[str]]:
    """Table rows: group, CPU seconds, ms of CPU per job, cores used on average; largest first."""
    rows = [[g, f"{s:.1f}", f"{1000 * s / jobs:.1f}", f"{s / wall_s:.2f}"]
            for g, s in sorted(cpu.items(), key=lambda kv: -kv[1])]
    total = sum(cpu.values())
    rows.append(["all", f"{total:.1f}", f"{1000 * total / jobs:.1f}", f"{total / wall_s:.2f}"])
    return rows


# ------------------------------------------------------------------------------- the farm run


@contextlib.contextmanager
def farm(counts: dict[str, int], workdir: Path, jobs: int, time_scale: float,
         progress_interval: float | None = None) -> Iterator[str]:
    """Cluster + Serve + the sim farm (serving.harness); yields its URL."""
    from serving.harness import simulated_farm

    logging.getLogger("ray").setLevel(logging.WARNING)
    overrides = {"model": "sim", "sim_time_scale": time_scale, "backlog_limit": max(2000, 2 * jobs)}
    if progress_interval is not None:
        overrides["progress_interval_s"] = progress_interval
    with simulated_farm(counts, workdir, overrides, namespace="i2v-bench-control") as (_, url):
        yield url


@dataclass
class Submission:
    index: int
    started: float
    latency: float
    status: int
    job_id: str | None
    queue_position: int | None


def submit_all(url: str, jobs: int, clients: int, steps: int, image_b64: str) -> list[Submission]:
    """`jobs` POSTs from `clients` threads; returns them in order of their start."""
    import requests

    lock = threading.Lock()
    counter = iter(range(jobs))
    out: list[Submission] = []
    errors: list[str] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None or errors:
                return
            body = job_body(i, image_b64, steps)
            t0 = time.time()
            t = time.perf_counter()
            r = session.post(url + "/v1/jobs", json=body, timeout=120)
            latency = time.perf_counter() - t
            reply = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != 202:
                errors.append(f"job {i}: HTTP {r.status_code} {r.text[:200]}")
            with lock:
                out.append(Submission(i, t0, latency, r.status_code, reply.get("id"), reply.get("queue_position")))

    threads = [threading.Thread(target=client, name=f"client{k}", daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} submissions failed; first: {errors[0]}")
    return sorted(out, key=lambda s: s.started)


def time_reads(session, url: str, job_id: str, reads: int = 20, pages: int = 3) -> dict[str, float]:
    """Median seconds of GET /v1/jobs/{id} and of GET /v1/jobs?limit=500, and the job's status."""
    one, page = [], []
    status = None
    for _ in range(reads):
        t = time.perf_counter()
        r = session.get(f"{url}/v1/jobs/{job_id}", timeout=60)
        one.append(time.perf_counter() - t)
        status = r.json().get("status")
    for _ in range(pages):
        t = time.perf_counter()
        session.get(f"{url}/v1/jobs", params={"limit": 500}, timeout=120)
        page.append(time.perf_counter() - t)
    return {"get_s": float(np.median(one)), "list500_s": float(np.median(page)), "status": status}


def queue_depth(session, url: str) -> tuple[int, dict[str, int]]:
    info = session.get(url + "/v1/cluster", timeout=60).json()
    return info["queue_depth"], info["jobs"]


def list_all(session, url: str) -> list[dict[str, Any]]:
    jobs, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor is not None:
            params["cursor"] = cursor
        body = session.get(url + "/v1/jobs", params=params, timeout=120).json()
        jobs.extend(body["jobs"])
        cursor = body.get("next_cursor")
        if cursor is None:
            return jobs


def run_farm(args: argparse.Namespace, image_b64: str) -> dict[str, Any]:
    import requests

    with tempfile.TemporaryDirectory(prefix="i2v-bench-control-") as tmp, \
            farm(args.cluster, Path(tmp), args.jobs, args.time_scale, args.progress_interval) as url:
        session = requests.Session()
        print(f"  farm ready at {url}; submitting {args.jobs} jobs from {args.clients} clients",
              file=sys.stderr, flush=True)
        cpu0 = cpu_by_group()
        t0 = time.time()
        subs = submit_all(url, args.jobs, args.clients, args.steps, image_b64)
        submit_window = time.time() - t0
        depth_full, _ = queue_depth(session, url)
        queued = next((s.job_id for s in reversed(subs) if s.job_id), None)
        reads_full = time_reads(session, url, queued)
        reads_full["queue_depth"] = depth_full
        print(f"  submitted in {submit_window:.1f} s; queue depth {depth_full}; draining", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.timeout
        while True:
            depth, counts = queue_depth(session, url)
            done = sum(counts.get(s, 0) for s in TERMINAL)
            if done >= args.jobs:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args.jobs - done} jobs unfinished after {args.timeout:.0f} s: {counts}")
            time.sleep(0.5)
        drained = time.time() - t0
        cpu = cpu_delta(cpu0, cpu_by_group())
        reads_empty = time_reads(session, url, queued)
        reads_empty["queue_depth"] = 0
        jobs = list_all(session, url)
    return {"submissions": [s.__dict__ for s in subs], "submit_window_s": submit_window, "drained_s": drained,
            "reads_full": reads_full, "reads_empty": reads_empty, "cpu_s": cpu,
            "jobs": [{k: j.get(k) for k in ("id", "status", "vram_class", "created_at", "started_at", "finished_at")}
                     for j in jobs]}


def report_farm(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    subs = res["submissions"]
    lat = [s["latency"] for s in subs]
    backlog = [s["queue_position"] for s in subs]
    first, last = latency_groups(lat)
    flat, verdict = growth_verdict(first, last)
    print(table(["submissions", "p50 ms", "p99 ms", "backlog joined (median)"], [
        [first.label, f"{1000 * first.p50:.1f}", f"{1000 * first.p99:.1f}",
         f"{np.median([b for b in backlog[:first.count] if b is not None] or [0]):.0f}"],
        [last.label, f"{1000 * last.p50:.1f}", f"{1000 * last.p99:.1f}",
         f"{np.median([b for b in backlog[-last.count:] if b is not None] or [0]):.0f}"],
    ]))
    print(f"{verdict}; p99 last/first = {last.p99 / first.p99:.2f}; all {len(lat)}: p50 "
          f"{1000 * percentile(lat, 50):.1f} ms, p99 {1000 * percentile(lat, 99):.1f} ms, "
          f"max {1000 * max(lat):.1f} ms; "
          f"submission rate {len(lat) / res['submit_window_s']:.1f}/s over {res['submit_window_s']:.1f} s")
    print()
    print(table(["submissions (tenths)", "backlog joined", "p50 ms", "p99 ms"], tenths(lat, backlog)))
    print()
    rf, re_ = res["reads_full"], res["reads_empty"]
    print(table(["reads", "GET /v1/jobs/{id} ms", "GET /v1/jobs?limit=500 ms"], [
        [f"backlog {rf['queue_depth']} (job {rf['status']})", f"{1000 * rf['get_s']:.1f}",
         f"{1000 * rf['list500_s']:.0f}"],
        [f"drained (job {re_['status']})", f"{1000 * re_['get_s']:.1f}", f"{1000 * re_['list500_s']:.0f}"],
    ]))
    print()
    jobs = res["jobs"]
    ok = [j for j in jobs if j["status"] == "succeeded"]
    starts = [epoch(j["started_at"]) for j in jobs if j.get("started_at")]
    finishes = [epoch(j["finished_at"]) for j in jobs if j.get("finished_at")]
    gpus = sum(args.cluster.values())
    dispatch, steady = rate(starts), rate(starts, 0.1)
    finish, finish_steady = rate(finishes), rate(finishes, 0.1)
    # after the last submission was answered the ingress is idle: what the manager and workers do alone
    submitted = max((s["started"] + s["latency"] for s in subs), default=0.0)
    drain_starts = [t for t in starts if t > submitted]
    drain_finishes = [t for t in finishes if t > submitted]
    drain, drain_finish = rate(drain_starts), rate(drain_finishes)
    print(table(["throughput", "all", "middle 80 %", "per worker (middle 80 %)", "after the submissions"], [
        ["jobs started/s", f"{dispatch:.2f}", f"{steady:.2f}", f"{steady / gpus:.2f}",
         f"{drain:.2f} ({len(drain_starts)} jobs)"],
        ["jobs finished/s", f"{finish:.2f}", f"{finish_steady:.2f}", f"{finish_steady / gpus:.2f}",
         f"{drain_finish:.2f} ({len(drain_finishes)} jobs)"],
    ]))
    print(f"{len(ok)}/{len(jobs)} succeeded; {gpus} workers; last job finished {res['drained_s']:.1f} s after the "
          f"first submission; per job the sim model sleeps {args.time_scale:g} x the cost model's seconds "
          f"and makes {args.steps} denoising steps")
    if res.get("cpu_s"):
        print()
        print(f"where the CPU went, first submission -> last job finished ({res['drained_s']:.0f} s, "
              f"{os.cpu_count()} cores):")
        print(table(["process", "CPU s", "CPU ms per job", "cores"], cpu_rows(res["cpu_s"], len(jobs),
                                                                            res["drained_s"])))
    return {"first": first.__dict__, "last": last.__dict__, "flat": flat, "p50_ratio": last.p50 / first.p50,
            "p99_ratio": last.p99 / first.p99, "started_per_s": dispatch, "started_per_s_steady": steady,
            "finished_per_s": finish, "finished_per_s_steady": finish_steady, "succeeded": len(ok),
            "drain_started_per_s": drain, "drain_finished_per_s": drain_finish,
            "cpu_ms_per_job": {g: 1000 * v / max(1, len(jobs)) for g, v in (res.get("cpu_s") or {}).items()}}


# ------------------------------------------------------------------------------- the manager alone


async def _manager_submissions(workdir: Path, jobs: int, steps: int, image: bytes, counts: dict[str, int],
                               profile: cProfile.Profile) -> tuple[list[float], dict[str, Any]]:
    from serving.config import load_settings
    from serving.manager import JobManager

    settings = load_settings({"model": "sim", "backlog_limit": max(2000, 2 * jobs),
                              "job_db": str(workdir / "jobs.sqlite3"),
                              "storage_url": f"file://{workdir / 'outputs'}",
                              "workers": {c: {"min_replicas": n, "max_replicas": n} for c, n in counts.items()}},
                             env={}).resolved()
    manager = JobManager(settings.model_dump(), {})
    loop_task = getattr(manager, "_loop_task", None)
    if loop_task is not None:  # no dispatching: the backlog only grows
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
    from PIL import Image

    width, height = Image.open(io.BytesIO(image)).size
    latencies = []
    for i in range(jobs):
        fields = {k: v for k, v in job_body(i, "", steps).items() if k != "image"}
        t = time.perf_counter()
        profile.enable()
        reply = manager.submit(fields, image, "png", width, height)
        if inspect.isawaitable(reply):
            reply = await reply
        profile.disable()
        latencies.append(time.perf_counter() - t)
        if "error" in reply:
            raise RuntimeError(f"manager refused job {i}: {reply['error']}")
    last_id = reply["job"]["id"]
    reads = {"backlog": len(manager.scheduler)}
    for name, call in (("get_s", lambda: manager.get(last_id)), ("list500_s", lambda: manager.list(limit=500))):
        t = time.perf_counter()
        out = call()
        if inspect.isawaitable(out):
            await out
        reads[name] = time.perf_counter() - t
    positions = getattr(manager, "_queue_position", None)
    if positions is not None:
        t = time.perf_counter()
        positions(last_id)
        reads["queue_position_s"] = time.perf_counter() - t
    manager.store.close()
    return latencies, reads


def run_manager_alone(args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="i2v-bench-manager-") as tmp:
        latencies, reads = asyncio.run(_manager_submissions(Path(tmp), args.jobs, args.steps, image, args.cluster,
                                                            profile))
    first, last = latency_groups(latencies)
    flat, verdict = growth_verdict(first, last)
    print(table(["submissions", "p50 ms", "p99 ms", "backlog joined"], [
        [first.label, f"{1000 * first.p50:.2f}", f"{1000 * first.p99:.2f}", f"0-{first.count - 1}"],
        [last.label, f"{1000 * last.p50:.2f}", f"{1000 * last.p99:.2f}",
         f"{len(latencies) - last.count}-{len(latencies) - 1}"],
    ]))
    print(f"{verdict}; total {sum(latencies):.2f} s for {len(latencies)} submissions "
          f"({len(latencies) / sum(latencies):.0f}/s on one core)")
    qp = reads.get("queue_position_s")
    print(f"reads at a backlog of {reads['backlog']}: get(queued job) {1000 * reads['get_s']:.2f} ms, "
          f"list(limit=500) {1000 * reads['list500_s']:.1f} ms"
          + (f"; one _queue_position {1000 * qp:.2f} ms (it sorts the class queue: a page of 500 queued "
             f"jobs sorts it 500 times)" if qp is not None else ""))
    buf = io.StringIO()
    stats = pstats.Stats(profile, stream=buf)
    stats.sort_stats("tottime").print_stats(12)
    print("where the manager's submit time goes (cProfile, top 12 by own time):")
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    for ln in lines[start:]:
        print("  " + ln.replace(str(Path.cwd()) + "/", "").replace(sys.prefix + "/", ""))
    buf = io.StringIO()  # the manager's own steps, whole (the input file is written in a thread: not here)
    steps = r"serving/manager/.*\((_?submit|_create|_view)\)"
    pstats.Stats(profile, stream=buf).sort_stats("cumulative").print_stats(steps)
    print("the manager's submission steps (cumulative, this thread):")
    for ln in buf.getvalue().splitlines():
        if "serving/manager/" in ln:
            print("  " + ln.replace(str(Path.cwd()) + "/", "").replace(sys.prefix + "/", ""))
    return {"first": first.__dict__, "last": last.__dict__, "flat": flat, "latencies": latencies, "reads": reads}


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000, help="jobs to submit (default 1000)")
    p.add_argument("--clients", type=int, default=4, help="concurrent submitting clients (default 4)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps per job = progress events (default 30)")
    p.add_argument("--time-scale", type=float, default=0.001,
                   help="sim seconds per cost-model second (default 0.001: a job sleeps ~milliseconds)")
    p.add_argument("--progress-interval", type=float, default=None, metavar="S",
                   help="the farm's progress_interval_s (default: the setting's default; 0: an event per step)")
    p.add_argument("--cluster", type=parse_cluster, default=parse_cluster(DEFAULT_CLUSTER),
                   help=f"simulated GPU nodes per class (default {DEFAULT_CLUSTER})")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the queue to drain")
    p.add_argument("--no-farm", action="store_true", help="skip the HTTP farm run (part 1)")
    p.add_argument("--no-profile", action="store_true", help="skip the manager-alone profile (part 2)")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = p.parse_args(argv)
    if args.jobs < 2 or args.clients < 1 or args.steps < 1:
        p.error("--jobs must be >= 2, --clients and --steps >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from bench.scheduler import png_bytes

    wall0 = time.monotonic()
    info = machine()
    image = png_bytes()
    image_b64 = base64.b64encode(image).decode()
    print("i2v-farm control-plane benchmark (sim model)")
    print(describe_machine(info))
    print(f"jobs: {args.jobs} x (512p, 8 frames, {args.steps} steps, 64x64 PNG) from {args.clients} clients; "
          f"cluster {','.join(f'{k}:{v}' for k, v in args.cluster.items())}; sim_time_scale {args.time_scale:g}")
    print(flush=True)
    out: dict[str, Any] = {"machine": info, "parameters": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()}}
    if not args.no_farm:
        print("1. through the farm (HTTP -> ingress -> job manager -> scheduler -> workers)")
        res = run_farm(args, image_b64)
        out["farm"] = {**res, "summary": report_farm(res, args)}
        print(flush=True)
    if not args.no_profile:
        print("2. the job manager alone (in this process, no Ray, no HTTP, dispatch stopped: the backlog only grows)")
        out["manager"] = run_manager_alone(args, image)
        print(flush=True)
    print(f"load average at the end {'/'.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"total {time.monotonic() - wall0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"measurements: {args.json}")
    return out


if __name__ == "__main__":
    main()
