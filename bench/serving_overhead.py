"""Serving overhead: one `tiny-random` job through the whole farm against the same call in-process.

    .venv/bin/python -m bench.serving_overhead [--repeat 3] [--steps 2] [--frames 8] [--resolution 512p]
                                               [--worker-cpus N] [--worker-niceness N] [--no-default-cpus]
                                               [--poll S] [--json FILE]

What it does, in one run:

1. loads `tiny-random` in this process and builds the worker's own backend
   (`serving.backends.ModelBackend`: `Generator` with the farm's options, then
   `pipeline.render.render` = generate + MP4 encode + `params.json`, plus the poster JPEG), i.e.
   exactly the call a farm worker makes for a job, minus the farm;
2. starts a `SimulatedCluster("12gb:1")` (a head node and one fake-GPU node on 127.0.0.1), Serve's
   HTTP proxy on a free loopback port, and the farm (`serving.app.build`: HTTP ingress, job
   manager with its SQLite job store, one `Worker_12gb` replica, file storage in a temporary
   directory) on the same model;
3. runs the same job (same image, parameters and seed) `--repeat` times each way, interleaved
   (in-process, farm, farm, in-process, ...) after one warm-up of each, so drift and noisy
   neighbours hit both sides alike. A farm job is timed from the client's `POST /v1/jobs` to
   the job's `finished_at` in the job store (the moment it is `succeeded` with its files in
   storage); the client polls `GET /v1/jobs/{id}` every `--poll` s to learn it, and that delay
   (`poll lag`) is reported apart, not charged to the farm;
4. prints the medians, the farm's added seconds and percent, and PASS/FAIL against the target:
   the farm may add at most max(5 %, 100 ms) per job. It splits the addition in two: the farm's
   plumbing (`submit` = the POST round trip: validation, inbox write, job store insert; `queue` =
   created_at -> started_at, the dispatch; `rest` = everything after the worker's render up to
   `finished_at` and Serve's streaming call: poster, spool, storage upload, job store writes),
   judged against the same target; and the render itself running slower inside the worker than
   in-process. `CPU s/job` (the worker process's and this process's user + system time, from
   /proc) tells whether that is more work (ratio > 1) or the same work granted less CPU time
   (ratio ~1: contention). `farm CPU s/job` is the CPU time the cluster's *other* processes
   (raylet, GCS, dashboard agents, Serve controller and proxy, ingress, job manager, idle
   replicas) used meanwhile: during a farm job, the plumbing's and Ray's own cost; during an
   in-process job, what the idle farm burns in the background. On a machine with few cores that
   CPU time is taken from the render.

**Threads.** Ray starts an actor with `OMP_NUM_THREADS` = its `num_cpus` (Ray's
`set_omp_num_threads_if_unset`), and torch sizes its thread pool from that; a farm worker
reserves `worker_cpus` (default 1). The worker now sets its threads itself (`worker_threads`; 0 =
all of the node's cores without a GPU); this bench pins them to `worker_cpus` in both phases.
Phase A compares like with like: the farm deployed
with `worker_cpus` = this process's torch thread count (`--worker-cpus`, default
`torch.get_num_threads()`), the simulated GPU node sized to match, and the in-process side at that
many threads. Phase B (skip with `--no-default-cpus`) deploys the farm with one worker thread (Ray's
default before `worker_threads`) and runs the in-process side on 1 thread too, and prints how
much slower that is than an all-threads in-process job: the cost of Ray's thread default, not of
the farm's plumbing. A probe actor reports what Ray actually gives an actor of each CPU count.

**Niceness.** Ray starts every worker process (all Serve replicas: the GPU workers, the job
manager, the ingress) at niceness `RAY_worker_niceness`, 15 by default, so on a busy CPU they
get less CPU time than anything at 0. `--worker-niceness 0` starts the cluster with
`RAY_worker_niceness=0` to measure what that costs; the niceness of the worker process is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.generation import describe_machine, machine, median, spread, table
from serving.jobs import FINISHED

TARGET_PERCENT = 5.0
TARGET_SECONDS = 0.100
CLASS = "12gb"
TERMINAL = FINISHED  # serving.jobs: the one definition of a finished job
#: Ray starts worker processes (every Serve replica: workers, job manager, ingress) at this
#: niceness; its default is 15.
NICENESS_ENV = "RAY_worker_niceness"


# ------------------------------------------------------------------------------- pure pieces


@dataclass(frozen=True)
class Verdict:
    baseline_s: float
    farm_s: float
    added_s: float
    added_percent: float
    allowed_s: float
    passed: bool


def overhead_verdict(baseline_s: float, farm_s: float, percent: float = TARGET_PERCENT,
                     seconds: float = TARGET_SECONDS) -> Verdict:
    """The farm's added time per job against the target: at most max(`percent` of the in-process
    time, `seconds`)."""
    if baseline_s <= 0:
        raise ValueError(f"the in-process time must be positive, got {baseline_s}")
    added = farm_s - baseline_s
    allowed = max(baseline_s * percent / 100.0, seconds)
    return Verdict(baseline_s, farm_s, added, 100.0 * added / baseline_s, allowed, added <= allowed + 1e-9)


def interleaved(repeat: int) -> list[str]:
    """The order of the timed runs: in-process and farm alternate, each leading every other round."""
    order: list[str] = []
    for i in range(repeat):
        order += ["inproc", "farm"] if i % 2 == 0 else ["farm", "inproc"]
    return order


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# ------------------------------------------------------------------------------- the two sides


def job_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": "a lighthouse on a cliff, waves rolling in", "preset": "fast",
            "resolution": args.resolution, "num_frames": args.frames, "num_inference_steps": args.steps,
            "seed": 1234}


def image_bytes() -> bytes:
    from bench.generation import SAMPLE_IMAGE
    from bench.scheduler import png_bytes

    return SAMPLE_IMAGE.read_bytes() if SAMPLE_IMAGE.is_file() else png_bytes(256)


class InProcess:
    """The worker's backend, called directly (what `Worker._render` calls for each job)."""

    def __init__(self, workdir: Path):
        from cluster.vram_classes import default_classes
        from serving.backends import ModelBackend
        from serving.config import load_settings

        settings = load_settings({"model": "tiny-random"}, env={})
        self.backend = ModelBackend(settings, default_classes()[CLASS])
        self.workdir = workdir
        self.count = 0

    def run(self, data: bytes, fields: dict[str, Any], others=None) -> dict[str, Any]:
        """One job; `others()`: CPU seconds of the idle farm's processes, sampled around it."""
        from pipeline.request import parse_params

        self.count += 1
        out = self.workdir / f"job{self.count}"
        cpu = cpu_seconds()
        cluster = others() if others else float("nan")
        started = time.perf_counter()
        result = self.backend.run(uuid.uuid4().hex, data, parse_params(fields), out,
                                  lambda i, n: None, lambda: False)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu,
                "cluster_cpu_s": (others() - cluster) if others else float("nan"),
                "timings": result.record["timings"]}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when `pid` is None), all its threads."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def niceness(pid: int | None = None) -> int | None:
    """The scheduling niceness of a process (this one when `pid` is None), from /proc."""
    try:
        stat = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[16])
    except (OSError, IndexError, ValueError):
        return None


def cluster_pids(sim) -> set[int]:
    """Every live process of this cluster: its nodes' processes (raylet, GCS, dashboard, ...) and
    all their descendants (Ray workers: Serve controller, proxy, replicas)."""
    try:
        roots = {info.process.pid for node in sim._cluster.list_all_nodes()
                 for infos in node.all_processes.values() for info in infos}
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
    except Exception:  # noqa: BLE001 - only a diagnostic
        return set()
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def worker_pid(sim) -> int | None:
    """The pid of the farm's newest worker replica: a child of one of this cluster's raylets whose
    command line names a `Worker_` deployment (Linux /proc; None where that is not available)."""
    found: list[tuple[int, int]] = []  # (start time, pid)
    try:
        raylets = {info.process.pid for node in sim._cluster.list_all_nodes()
                   for info in node.all_processes.get("raylet", [])}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) in raylets and b"Worker_" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append((int(stat[19]), int(entry)))
    except Exception:  # noqa: BLE001 - only a diagnostic
        return None
    return max(found)[1] if found else None


@contextlib.contextmanager
def cluster(node_cpus: int, worker_niceness: int | None = None) -> Iterator[Any]:
    """A `SimulatedCluster` with one 12gb node of `node_cpus` CPUs and Serve on a free port;
    yields (the cluster, the port). `worker_niceness`: Ray's `RAY_worker_niceness` for the
    raylets it starts (None: Ray's default, 15)."""
    from ray import serve

    from cluster.simulated import SimulatedCluster
    from serving.harness import start_serve

    logging.getLogger("ray").setLevel(logging.WARNING)
    saved = os.environ.get(NICENESS_ENV)
    if worker_niceness is not None:
        os.environ[NICENESS_ENV] = str(worker_niceness)  # the raylets read it when they start
    try:
        sim = SimulatedCluster({CLASS: 1}, head_cpus=1, node_cpus=node_cpus).start()
    finally:
        if saved is None:
            os.environ.pop(NICENESS_ENV, None)
        else:
            os.environ[NICENESS_ENV] = saved
    try:
        sim.connect(namespace="i2v-bench-overhead", log_to_driver=False, logging_level=logging.WARNING)
        port = start_serve()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        yield sim, port
    finally:
        try:
            serve.shutdown()
        finally:
            sim.shutdown()


def probe_threads(num_cpus: float) -> dict[str, Any]:
    """What Ray gives an actor that reserves `num_cpus` CPUs: OMP_NUM_THREADS and torch's threads."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    class Probe:
        def threads(self):
            import torch

            return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}

    actor = Probe.remote()
    try:
        return ray.get(actor.threads.remote(), timeout=120)
    finally:
        ray.kill(actor)


class Farm:
    """The farm application deployed on the running cluster, and a client for it."""

    def __init__(self, sim, port: int, workdir: Path, worker_cpus: float, poll: float):
        from serving import harness
        from serving.app import APP_NAME
        from serving.client import FarmClient
        from serving.config import load_settings

        overrides = {
            # threads pinned to worker_cpus: like-for-like with the in-process side (the farm's own
            # default, `worker_threads` 0, gives a CPU worker all of the node's cores)
            "model": "tiny-random", "worker_cpus": worker_cpus, "worker_threads": max(1, int(worker_cpus)),
            "workers": harness.workers_for({CLASS: 1}),
            "job_db": str(workdir / "jobs.sqlite3"), "storage_url": f"file://{workdir / 'outputs'}",
            "spool_dir": str(workdir / "spool"),
        }
        self.app = APP_NAME
        self.url = f"http://127.0.0.1:{port}"
        self.client = FarmClient(self.url, timeout=60, token="")
        self.poll = poll
        harness.deploy(load_settings(overrides, env={}), self.url, {CLASS: 1}, timeout=300)
        self.pid = worker_pid(sim)
        self.nice = niceness(self.pid) if self.pid else None
        self.sim = sim

    def others_cpu(self) -> float:
        """CPU seconds used so far by the cluster's processes other than the worker (live ones)."""
        return sum(cpu_seconds(pid) for pid in cluster_pids(self.sim) - {self.pid})

    def run(self, data: bytes, fields: dict[str, Any]) -> dict[str, Any]:
        cpu = cpu_seconds(self.pid) if self.pid else float("nan")
        others = self.others_cpu()
        t0 = time.time()
        # reuse off: the same image, settings and seed every round would get the warm-up's result
        # back without rendering (serving/reuse.py); FarmClientError (code, message) if refused
        job_id = self.client.submit(data, {**fields, "reuse": False})["id"]
        t_submitted = time.time()
        while True:
            job = self.client.job(job_id)
            if job["status"] in TERMINAL:
                seen = time.time()
                break
            time.sleep(self.poll)
        worker_cpu = cpu_seconds(self.pid) - cpu if self.pid else float("nan")
        others = self.others_cpu() - others
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        finished = epoch(job["finished_at"])
        created, started = epoch(job["created_at"]), epoch(job["started_at"])
        worker = float(job["timings"]["total"])
        return {"seconds": finished - t0, "observed_s": seen - t0, "submit_s": t_submitted - t0, "cpu_s": worker_cpu,
                "cluster_cpu_s": others,
                "queue_s": started - created, "worker_s": worker,
                "rest_s": (finished - started) - worker, "timings": job["timings"]}

    def close(self) -> None:
        from serving import harness

        with contextlib.suppress(Exception):
            harness.undeploy()


# ------------------------------------------------------------------------------- a phase


def run_phase(name: str, sim, port: int, workdir: Path, inproc: InProcess, data: bytes, fields: dict[str, Any],
              threads: int, worker_cpus: float, repeat: int, poll: float) -> dict[str, Any]:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    farm = Farm(sim, port, workdir / name, worker_cpus, poll)
    try:
        print(f"  [{name}] farm ready; warming up", file=sys.stderr, flush=True)
        inproc.run(data, fields)
        farm.run(data, fields)
        runs: dict[str, list[dict[str, Any]]] = {"inproc": [], "farm": []}
        for side in interleaved(repeat):
            runs[side].append(inproc.run(data, fields, farm.others_cpu) if side == "inproc"
                              else farm.run(data, fields))
            print(f"  [{name}] {side}: {runs[side][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    finally:
        farm.close()
        torch.set_num_threads(saved)
    base = median([r["seconds"] for r in runs["inproc"]])
    farm_s = median([r["seconds"] for r in runs["farm"]])
    plumbing = median([r["submit_s"] + r["queue_s"] + r["rest_s"] for r in runs["farm"]])
    plumbing_verdict = overhead_verdict(base, base + plumbing)
    return {"phase": name, "threads": threads, "worker_cpus": worker_cpus, "runs": runs,
            "worker_nice": farm.nice,
            "verdict": overhead_verdict(base, farm_s).__dict__,
            "plumbing": {"plumbing_s": plumbing, "passed": plumbing_verdict.passed,
                         "render_gap_s": median([r["worker_s"] for r in runs["farm"]]) - base,
                         "cpu_ratio": median([r["cpu_s"] for r in runs["farm"]])
                         / median([r["cpu_s"] for r in runs["inproc"]])}}


def print_phase(res: dict[str, Any]) -> None:
    inproc, farm = res["runs"]["inproc"], res["runs"]["farm"]
    v = res["verdict"]
    sec = [r["seconds"] for r in inproc], [r["seconds"] for r in farm]
    rows = [
        [f"in-process ({res['threads']} torch threads)", f"{median(sec[0]):.3f}", f"{min(sec[0]):.3f}",
         f"{spread(sec[0]):.0%}", "", "", f"{median([r['seconds'] for r in inproc]):.3f}", "", "",
         f"{median([r['cpu_s'] for r in inproc]):.2f}", f"{median([r['cluster_cpu_s'] for r in inproc]):.2f}"],
        [f"farm (worker_cpus={res['worker_cpus']:g})", f"{median(sec[1]):.3f}", f"{min(sec[1]):.3f}",
         f"{spread(sec[1]):.0%}",
         f"{median([r['submit_s'] for r in farm]):.3f}", f"{median([r['queue_s'] for r in farm]):.3f}",
         f"{median([r['worker_s'] for r in farm]):.3f}", f"{median([r['rest_s'] for r in farm]):.3f}",
         f"{median([r['observed_s'] - r['seconds'] for r in farm]):.3f}",
         f"{median([r['cpu_s'] for r in farm]):.2f}", f"{median([r['cluster_cpu_s'] for r in farm]):.2f}"],
    ]
    print(table(["", "median s/job", "best s/job", "spread", "submit s", "queue s", "render s", "rest s",
                 "poll lag s", "CPU s/job", "farm CPU s/job"], rows))
    print(f"farm adds {v['added_s'] * 1000:+.0f} ms/job ({v['added_percent']:+.1f} %); allowed "
          f"max(5 %, 100 ms) = {v['allowed_s'] * 1000:.0f} ms -> {'PASS' if v['passed'] else 'FAIL'}")
    p = res["plumbing"]
    print(f"of which plumbing (submit + dispatch + rest) {p['plumbing_s'] * 1000:.0f} ms -> "
          f"{'PASS' if p['passed'] else 'FAIL'}; the render itself {p['render_gap_s'] * 1000:+.0f} ms slower in the "
          f"worker than in-process, at {p['cpu_ratio']:.2f}x the CPU seconds (~1: same work, less CPU time "
          f"granted: contention and niceness)")


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving_overhead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="timed jobs per side and phase (default 3)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    p.add_argument("--frames", type=int, default=8, help="frames (default 8)")
    p.add_argument("--resolution", default="512p", choices=("512p", "768p", "1024p"))
    p.add_argument("--worker-cpus", type=int, default=None,
                   help="phase A: worker_cpus of the farm and torch threads in-process "
                        "(default: this process's torch thread count)")
    p.add_argument("--no-default-cpus", action="store_true",
                   help="skip phase B (the farm as shipped, worker_cpus=1)")
    p.add_argument("--poll", type=float, default=0.25,
                   help="client poll interval in s (default 0.25; the farm's time ends at finished_at, so polling "
                        "only adds load)")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="start the cluster with RAY_worker_niceness=N (default: Ray's own, 15)")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.steps < 1 or not 8 <= args.frames <= 32:
        p.error("--repeat and --steps must be >= 1, --frames 8-32")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from pipeline.loading import _quiet_libraries

    _quiet_libraries()
    wall0 = time.monotonic()
    threads = args.worker_cpus or torch.get_num_threads()
    info = machine()
    fields = job_fields(args)
    data = image_bytes()
    print("i2v-farm serving overhead benchmark (tiny-random, CPU)")
    print(describe_machine(info))
    print(f"job: {args.resolution} of a {len(data)}-byte image, {args.frames} frames, {args.steps} steps "
          f"(preset fast otherwise), seed 1234; {args.repeat} timed jobs per side, interleaved, after a warm-up each")
    print(f"farm: SimulatedCluster {CLASS}:1 + Serve on 127.0.0.1, file storage, SQLite job store; "
          f"farm time = POST -> finished_at (client polls every {args.poll * 1000:.0f} ms: 'poll lag', not counted)")
    print(flush=True)
    out: dict[str, Any] = {"machine": info, "parameters": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()}, "phases": []}
    with tempfile.TemporaryDirectory(prefix="i2v-bench-overhead-") as tmp:
        workdir = Path(tmp)
        inproc = InProcess(workdir / "inproc")
        with cluster(node_cpus=max(2, threads), worker_niceness=args.worker_niceness) as (sim, port):
            probes = {n: probe_threads(n) for n in sorted({1, threads})}
            out["probes"] = probes
            print("what Ray gives an actor: " + "; ".join(
                f"num_cpus={n}: OMP_NUM_THREADS={p['OMP_NUM_THREADS']}, torch threads {p['torch_threads']}"
                for n, p in probes.items()) + f" (this process: {torch.get_num_threads()} torch threads)")
            print(flush=True)
            print(f"A. like for like: farm worker_cpus={threads}, in-process {threads} torch threads")
            a = run_phase("A", sim, port, workdir, inproc, data, fields, threads, threads, args.repeat, args.poll)
            print_phase(a)
            print(f"scheduling niceness: farm worker process {a.get('worker_nice')}, this process {niceness()} "
                  f"({NICENESS_ENV}={args.worker_niceness if args.worker_niceness is not None else 'Ray default'})")
            out["phases"].append(a)
            print(flush=True)
            if not args.no_default_cpus and threads != 1:
                print("B. one worker thread (Ray's OMP_NUM_THREADS=1 default), in-process 1 torch thread")
                b = run_phase("B", sim, port, workdir, inproc, data, fields, 1, 1, args.repeat, args.poll)
                print_phase(b)
                out["phases"].append(b)
                shipped = b["verdict"]["farm_s"]
                best = a["verdict"]["baseline_s"]
                print(f"one worker thread vs an in-process job on {threads} threads: "
                      f"{shipped:.3f} / {best:.3f} s = {shipped / best:.2f}x ({100 * (shipped / best - 1):+.0f} %; "
                      f"in-process 1 vs {threads} threads: {b['verdict']['baseline_s'] / best:.2f}x): the thread "
                      f"count Ray gives the worker (OMP_NUM_THREADS = worker_cpus), not the farm's plumbing")
                print(flush=True)
    a_v = out["phases"][0]["verdict"]
    print(f"summary: farm overhead {a_v['added_s'] * 1000:+.0f} ms/job ({a_v['added_percent']:+.1f} %) at "
          f"{threads} threads -> {'PASS' if a_v['passed'] else 'FAIL'}; load average at the end "
          f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())}; total {time.monotonic() - wall0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"measurements: {args.json}")
    return out


if __name__ == "__main__":
    main()
