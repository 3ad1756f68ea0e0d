"""The fleet simulator: a discrete-event simulation of the farm in virtual time.

It runs the farm's own `serving.scheduler.Scheduler` the way the job manager drives it
(`serving/manager/`): every arrival is placed and admitted (`estimate_request` -> `admit`), and
whenever GPUs are free it asks `assign(free)` with the idle slots per class (`Capacity.free_slots`: GPUs
of the class minus the running jobs on it) and starts what it answers. A job runs for the cost
model's seconds on the class it was given (times `time_scale`, as `_run_seconds` does for the
`sim` model). Its true peak VRAM is the estimate times the arrival's `vram_factor`; above the
class's memory it fails out of memory after its first denoising step (as `SimBackend` does), and
the manager's `Attempts.on_failure` rule applies: `home` becomes the class it ran on, `on_failure(job,
"oom")` decides, a `Retry` is requeued on the next larger class.

Cost: a heap of running jobs' finish times and one `assign` call per instant at which something
changed and a GPU is free; nothing loops over all GPUs.
"""

from __future__ import annotations

import dataclasses
import heapq
import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.vram_classes import ClassSet, default_classes
from pipeline.errors import InvalidRequest
from serving.scheduler import PRIORITY_RANK, NoClassFits, QueuedJob, Retry, Scheduler, estimate_request

from .traces import Trace, request_params

PERCENTILES = (50, 95, 99)


@dataclass
class SimConfig:
    """The farm settings the simulation follows (their names as in `FarmSettings`)."""

    max_attempts: int = 3
    spill: bool = True
    spill_rule: str = "earliest_finish"
    """`earliest_finish` (the manager passes the running jobs' estimated seconds left) or `idle`."""
    fair_share: bool = True
    share_weights: dict[str, float] = field(default_factory=dict)
    time_scale: float = 1.0
    """Run seconds = cost-model seconds x this (the `sim` model's `sim_time_scale`; 1 for real GPUs)."""
    overhead_s: float = 0.0
    """Seconds every attempt adds to its run (dispatch, encode, upload); 0 by default."""
    dtype: str = "auto"
    cpu_offload: bool = False
    decode_chunk_size: int = 1

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "SimConfig":
        """The simulation of a farm with these `FarmSettings` (the `sim` model's time scale)."""
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if hasattr(settings, f.name)}
        values["time_scale"] = settings.sim_time_scale if getattr(settings, "model", "") == "sim" else 1.0
        values.update(overrides)
        return cls(**values)


def parse_fleet(text: str | Mapping[str, int], class_set: ClassSet | None = None) -> dict[str, int]:
    """`12gb:300,24gb:500` -> {"12gb": 300, "24gb": 500}; unknown classes or bad counts raise
    `InvalidRequest` (field `fleet`)."""
    known = class_set or default_classes()
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            name, sep, count = part.strip().partition(":")
            if not sep:
                raise InvalidRequest(f"--fleet wants CLASS:COUNT,... (e.g. 12gb:300,24gb:500), got {part!r}",
                                     field="fleet")
            try:
                items.append((name.strip(), int(count)))
            except ValueError:
                raise InvalidRequest(f"--fleet: the count of {name.strip()!r} must be a whole number, "
                                     f"got {count!r}", field="fleet") from None
    fleet: dict[str, int] = {}
    for name, count in items:
        if name not in known:
            raise InvalidRequest(f"--fleet: unknown VRAM class {name!r}; classes: {', '.join(known.names)}",
                                 field="fleet")
        if not isinstance(count, int) or count < 0 or count > 1_000_000:
            raise InvalidRequest(f"--fleet: the count of {name!r} must be 0 to 1000000, got {count!r}", field="fleet")
        if name in fleet:
            raise InvalidRequest(f"--fleet names {name!r} twice", field="fleet")
        fleet[name] = count
    if not any(fleet.values()):
        raise InvalidRequest("--fleet needs at least one GPU", field="fleet")
    return fleet


def parse_prices(text: str | Mapping[str, float] | None, class_set: ClassSet | None = None) -> dict[str, float]:
    """`12gb=0.25,24gb=0.60` -> {"12gb": 0.25, "24gb": 0.6} ($ per GPU-hour; field `prices`)."""
    if not text:
        return {}
    known = class_set or default_classes()
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in text.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                raise InvalidRequest(f"--prices wants CLASS=PRICE,... (per GPU-hour), got {part.strip()!r}",
                                     field="prices")
            items.append((name, value))
    prices: dict[str, float] = {}
    for name, value in items:
        name = str(name).strip()
        if name not in known:
            raise InvalidRequest(f"--prices: unknown VRAM class {name!r}; classes: {', '.join(known.names)}",
                                 field="prices")
        try:
            price = float(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"--prices wants CLASS=PRICE,... (per GPU-hour), got {name}={value!r}",
                                 field="prices") from None
        if not math.isfinite(price) or price < 0:
            raise InvalidRequest(f"--prices: the price of {name!r} must be a number >= 0, got {value!r}",
                                 field="prices")
        prices[name] = price
    return prices


def make_scheduler(classes: ClassSet, config: SimConfig) -> Scheduler:
    """The farm's scheduler as the manager builds it (queues unbounded: see docs/fleet.md), with
    whatever fair-sharing options this version of `Scheduler` takes."""
    accepted = inspect.signature(Scheduler).parameters
    kwargs: dict[str, Any] = {"backlog_limit": None, "max_attempts": config.max_attempts, "spill": config.spill}
    for name, value in (("fair_share", config.fair_share), ("share_weights", config.share_weights)):
        if name in accepted:
            kwargs[name] = value
    return Scheduler(classes, **kwargs)


_QUEUED_FIELDS = {f.name for f in dataclasses.fields(QueuedJob)}


def simulate(
    trace: Trace,
    fleet: Mapping[str, int],
    *,
    config: SimConfig | None = None,
    class_set: ClassSet | None = None,
    prices: Mapping[str, float] | None = None,
    late_wait_s: float | None = None,
    max_late: int | None = None,
    record_jobs: bool = False,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Run `trace` on `fleet` (class -> GPUs) and return the report (docs/fleet.md lists the keys).

    `late_wait_s`/`max_late`: stop early (`aborted: true`) once more than `max_late` interactive
    jobs have waited longer than `late_wait_s` (the planner's shortcut for fleets that are too
    small). `record_jobs`: add `job_log`, one `[id, class, start, finish, status]` per job.
    `progress`: called now and then with the virtual time reached (seconds), and once at the end.
    """
    started_wall = time.perf_counter()
    config = config or SimConfig()
    known = class_set or default_classes()
    fleet = {c: int(n) for c, n in fleet.items() if int(n) > 0}
    if not fleet:
        raise InvalidRequest("the fleet has no GPUs", field="fleet")
    classes = known.subset(fleet)
    prices = dict(prices or {})
    missing = [c for c in classes.names if prices and c not in prices]
    if missing:
        raise InvalidRequest(f"--prices has no price for {', '.join(missing)}", field="prices")
    run = _Run(trace, fleet, classes, config, late_wait_s, max_late)
    end = run.run(progress)
    return _report(run, prices, started_wall, end, record_jobs)


@dataclass
class _ClassStats:
    """What one class did in a run (the report's `classes.{name}` row)."""

    gpus: int
    busy: int = 0  # GPUs running an attempt now
    busy_s: float = 0.0
    jobs_run: int = 0
    attempts: int = 0
    spilled_in: int = 0
    spilled_out: int = 0
    oom: int = 0


class _Run:
    """One simulation: the trace's jobs through the farm's scheduler in virtual time.

    `run()` repeats, at each instant something happens: attempts that end (the manager's
    `Attempts.execute` -> `on_failure`), arrivals (`JobManager._submit`), then dispatch
    (`Attempts.dispatch` with `Capacity.free_slots`). Per job it keeps wait, finish, status and
    classes, in lists by trace index.
    """

    def __init__(self, trace: Trace, fleet: Mapping[str, int], classes: ClassSet, config: SimConfig,
                 late_wait_s: float | None, max_late: int | None):
        self.trace, self.fleet, self.classes, self.config = trace, fleet, classes, config
        self.late_wait_s, self.max_late = late_wait_s, max_late
        self.names = classes.names
        self.memory = {c: classes[c].memory_bytes for c in self.names}
        self.sched = make_scheduler(classes, config)
        self.with_caller = "caller" in _QUEUED_FIELDS
        # The manager's `Capacity.seconds_left`: per class, the estimated seconds left of each running job.
        self.pass_busy = (config.spill and config.spill_rule == "earliest_finish"
                          and "busy" in inspect.signature(Scheduler.assign).parameters)
        self.expected_end: dict[str, dict[int, float]] = {c: {} for c in self.names}  # job -> start + estimate
        self.estimates = self._estimates()
        n = len(trace)
        self.jobs: list[QueuedJob | None] = [None] * n
        self.queued_since = [0.0] * n
        self.wait = [0.0] * n
        self.finish = [math.nan] * n
        self.final_class: list[str | None] = [None] * n
        self.first_start = [math.nan] * n
        self.status = [""] * n
        self.stats = {c: _ClassStats(gpus=fleet[c]) for c in self.names}
        self.free_total = sum(fleet.values())
        self.oom_retries = self.oom_failed = self.rejected = self.late = 0
        self.counted_late = bytearray(n)  # interactive jobs counted in `late`
        self.overdue: list[tuple[float, int, float]] = []  # (wait passes the limit at, job, queued since)
        self.aborted = False
        self.running: list[tuple[float, int, int, str, bool]] = []  # (finish time, seq, job, class, OOM)
        self.seq = 0
        self.next_arrival = 0

    def _estimates(self) -> list[tuple[int, dict[str, float], int]]:
        """The cost model once per distinct request: (peak VRAM, run seconds per class, steps)."""
        config, scale = self.config, self.config.time_scale
        out = []
        for spec in self.trace.specs:
            params = request_params(spec)
            _, _, vram, seconds = estimate_request(
                self.classes, params, spec.get("image_width", 512), spec.get("image_height", 512),
                dtype=config.dtype, cpu_offload=config.cpu_offload, decode_chunk_size=config.decode_chunk_size)
            out.append((vram, {k: v * scale for k, v in seconds.items()}, params.num_inference_steps))
        return out

    def run(self, progress: Callable[[float], None] | None = None) -> float:
        """Simulate until every job has ended (or the planner's abort); return the last instant.
        `progress(now)` every 2,048 instants and at the end."""
        arr_t, n, running = self.trace.t, len(self.trace), self.running
        now, steps = 0.0, 0
        while self.next_arrival < n or running:
            steps += 1
            if progress is not None and not steps & 2047:
                progress(now)
            now = arr_t[self.next_arrival] if self.next_arrival < n else math.inf
            if running and running[0][0] <= now:
                now = running[0][0]
            self._end_attempts(now)
            self._arrive(now)
            if self.free_total and len(self.sched):
                self._dispatch(now)
            if self.max_late is not None and self._count_late(now) > self.max_late:
                self.aborted = True
                break
        if progress is not None:
            progress(now)
        return now

    def _count_late(self, now: float) -> int:
        """Interactive jobs that have waited longer than `late_wait_s` by `now`, counted once each:
        at their start, or, still queued, as soon as their wait passes the limit (so a fleet that
        is too small is known before its queue grows for hours)."""
        overdue = self.overdue
        while overdue and overdue[0][0] < now:
            _, j, since = heapq.heappop(overdue)
            if not self.counted_late[j] and self.queued_since[j] == since and str(j) in self.sched:
                self.counted_late[j] = 1
                self.late += 1
        return self.late

    def _watch_wait(self, j: int, now: float) -> None:
        """Job `j` is queued from `now`: note when its wait passes `late_wait_s` (interactive only)."""
        if self.late_wait_s is not None and self.trace.kind[j] == "interactive":
            heapq.heappush(self.overdue, (now + self.late_wait_s - self.wait[j], j, now))

    def _end_attempts(self, now: float) -> None:
        """Attempts that end at `now`: success, or an OOM the scheduler retries or fails."""
        running = self.running
        while running and running[0][0] <= now:
            _, _, j, c, oom = heapq.heappop(running)
            self.stats[c].busy -= 1
            if self.pass_busy:
                del self.expected_end[c][j]
            self.free_total += 1
            if not oom:
                self.stats[c].jobs_run += 1
                self.status[j], self.finish[j] = "succeeded", now
                continue
            self.stats[c].oom += 1
            job = self.jobs[j]
            job.home = c  # retry on the class above the one that ran out
            if isinstance(self.sched.on_failure(job, "oom", "out of memory (simulated)"), Retry):
                self.oom_retries += 1
                self.queued_since[j] = now
                self.sched.requeue(job)
                self._watch_wait(j, now)
            else:
                self.oom_failed += 1
                self.status[j], self.finish[j] = "failed", now

    def _arrive(self, now: float) -> None:
        """Jobs that arrive by `now`: placed and admitted, or refused when no class fits."""
        trace, i = self.trace, self.next_arrival
        while i < len(trace) and trace.t[i] <= now:
            vram, seconds, _ = self.estimates[trace.spec[i]]
            fields = {"id": str(i), "vram_bytes": vram, "seconds": seconds, "priority": trace.priority[i],
                      "seq": i + 1}
            if self.with_caller:
                fields["caller"] = trace.caller[i]
            job = QueuedJob(**fields)
            try:
                self.sched.admit(job)
            except NoClassFits:
                self.rejected += 1
                self.status[i] = "rejected"
            else:
                self.jobs[i] = job
                self.queued_since[i] = now
                self._watch_wait(i, now)
            i += 1
        self.next_arrival = i

    def _dispatch(self, now: float) -> None:
        """Ask the scheduler for the free GPUs and start what it answers."""
        free = {c: self.fleet[c] - self.stats[c].busy for c in self.names}
        if not self.pass_busy:
            assigned = self.sched.assign(free)
        else:
            # Only the soonest `queued` of them can matter to the plan (each job takes one).
            queued = len(self.sched)
            left = {}
            for c in self.names:
                ends = self.expected_end[c].values()
                if len(ends) > queued:
                    ends = heapq.nsmallest(queued, ends)
                left[c] = [e - now if e > now else 0.0 for e in ends]
            assigned = self.sched.assign(free, busy=left)
        for job, c in assigned:
            self._start(job, c, now)

    def _start(self, job: QueuedJob, c: str, now: float) -> None:
        """One attempt of `job` on class `c` from `now`: it ends (or runs out of memory) later."""
        j = int(job.id)
        waited = now - self.queued_since[j]
        self.wait[j] += waited
        if self.first_start[j] != self.first_start[j]:
            self.first_start[j] = now
        if (self.late_wait_s is not None and self.trace.kind[j] == "interactive" and self.wait[j] > self.late_wait_s
                and not self.counted_late[j]):  # counted once
            self.counted_late[j] = 1
            self.late += 1
        vram, seconds, steps = self.estimates[self.trace.spec[j]]
        oom = vram * self.trace.vram_factor[j] > self.memory[c]
        took = (seconds[c] / steps if oom else seconds[c]) + self.config.overhead_s
        stats = self.stats[c]
        stats.busy += 1
        self.free_total -= 1
        stats.busy_s += took
        stats.attempts += 1
        if c != job.home:
            stats.spilled_in += 1
            self.stats[job.home].spilled_out += 1
        self.final_class[j] = c
        self.seq += 1
        heapq.heappush(self.running, (now + took, self.seq, j, c, oom))
        if self.pass_busy:
            self.expected_end[c][j] = now + seconds[c]


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """{"p50", "p95", "p99", "mean", "max"} of `values` (seconds, rounded; None when empty)."""
    if not len(values):
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None, "max": None}
    got = np.percentile(values, PERCENTILES)
    out = {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, got)}
    out["mean"] = round(float(values.mean()), 3)
    out["max"] = round(float(values.max()), 3)
    return out


def _report(run: _Run, prices: Mapping[str, float], started_wall: float, end: float,
            record_jobs: bool) -> dict[str, Any]:
    trace, fleet, classes, config = run.trace, run.fleet, run.classes, run.config
    finish, status = run.finish, run.status
    arr = np.asarray(trace.t, dtype=float)
    finish_a = np.asarray(finish, dtype=float)
    wait_a = np.asarray(run.wait, dtype=float)
    status_a = np.asarray(status)
    done = status_a == "succeeded"
    kind_a = np.asarray(trace.kind)
    prio_a = np.asarray(trace.priority)
    latency = finish_a - arr
    finished = np.isfinite(finish_a)
    makespan = float(np.nanmax(finish_a)) if finished.any() else 0.0
    horizon = max(makespan, trace.duration, 1e-9)

    def group(mask) -> dict[str, Any]:
        m = mask & done
        return {"jobs": int(mask.sum()), "succeeded": int(m.sum()),
                "wait_s": percentiles(wait_a[m]), "latency_s": percentiles(latency[m])}

    class_rows = {}
    for c in classes.names:
        st = run.stats[c]
        class_rows[c] = {
            "gpus": fleet[c],
            "gpu": classes[c].gpu,
            "utilization": round(min(1.0, st.busy_s / (fleet[c] * horizon)), 4),
            "busy_gpu_hours": round(st.busy_s / 3600.0, 2),
            "jobs_run": st.jobs_run,
            "attempts": st.attempts,
            "spilled_in": st.spilled_in,
            "spilled_out": st.spilled_out,
            "oom": st.oom,
        }
    n = len(trace)
    report: dict[str, Any] = {
        "trace": trace.name,
        "fleet": dict(fleet),
        "jobs": {"submitted": n, "succeeded": int(done.sum()), "failed": int((status_a == "failed").sum()),
                 "rejected": run.rejected, "unfinished": int(n - finished.sum() - run.rejected)},
        "classes": class_rows,
        "oom_retries": run.oom_retries,
        "oom_failed": run.oom_failed,
        "wait_s": percentiles(wait_a[done]),
        "latency_s": percentiles(latency[done]),
        "by_priority": {p: group(prio_a == p) for p in sorted(PRIORITY_RANK, key=PRIORITY_RANK.get, reverse=True)
                        if (prio_a == p).any()},
        "by_kind": {k: group(kind_a == k) for k in ("interactive", "batch") if (kind_a == k).any()},
        "callers": len(set(trace.caller)),
        "trace_hours": round(trace.duration / 3600.0, 3),
        "makespan_s": round(makespan, 3),
        "jobs_per_hour": round(float(done.sum()) / (horizon / 3600.0), 1),
        "aborted": run.aborted,
        "settings": {"spill": config.spill, "spill_rule": config.spill_rule, "fair_share": config.fair_share,
                     "max_attempts": config.max_attempts,
                     "time_scale": config.time_scale, "overhead_s": config.overhead_s},
    }
    if prices:
        per_hour = sum(fleet[c] * prices[c] for c in classes.names)
        total = per_hour * horizon / 3600.0
        report["cost"] = {"per_hour": round(per_hour, 2), "total": round(total, 2),
                          "per_1000_jobs": round(1000 * total / done.sum(), 2) if done.any() else None,
                          "prices": {c: prices[c] for c in classes.names}}
    if record_jobs:
        first_start = run.first_start
        report["job_log"] = [[str(j), run.final_class[j], None if first_start[j] != first_start[j] else first_start[j],
                              None if not finished[j] else finish[j], status[j]] for j in range(n)]
    report["wall_s"] = round(time.perf_counter() - started_wall, 3)
    return report
