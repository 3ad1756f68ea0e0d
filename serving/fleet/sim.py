"""The fleet simulator: a discrete-event simulation of the farm in virtual time.

It runs the farm's own `serving.scheduler.Scheduler` the way the job manager drives it
(`serving/manager.py`): every arrival is placed and admitted (`estimate_request` -> `admit`), and
whenever GPUs are free it asks `assign(free)` with the idle slots per class (`_free_slots`: GPUs
of the class minus the running jobs on it) and starts what it answers. A job runs for the cost
model's seconds on the class it was given (times `time_scale`, as `_run_seconds` does for the
`sim` model). Its true peak VRAM is the estimate times the arrival's `vram_factor`; above the
class's memory it fails out of memory after its first denoising step (as `SimBackend` does), and
the manager's `_on_failure` rule applies: `home` becomes the class it ran on, `on_failure(job,
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
from collections.abc import Mapping
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
) -> dict[str, Any]:
    """Run `trace` on `fleet` (class -> GPUs) and return the report (docs/fleet.md lists the keys).

    `late_wait_s`/`max_late`: stop early (`aborted: true`) once more than `max_late` interactive
    jobs have waited longer than `late_wait_s` (the planner's shortcut for fleets that are too
    small). `record_jobs`: add `job_log`, one `[id, class, start, finish, status]` per job.
    """
    started_wall = time.perf_counter()
    config = config or SimConfig()
    known = class_set or default_classes()
    fleet = {c: int(n) for c, n in fleet.items() if int(n) > 0}
    if not fleet:
        raise InvalidRequest("the fleet has no GPUs", field="fleet")
    classes = known.subset(fleet)
    names = classes.names
    memory = {c: classes[c].memory_bytes for c in names}
    sched = make_scheduler(classes, config)
    with_caller = "caller" in _QUEUED_FIELDS
    # The manager's `_busy_seconds`: per class, the estimated seconds left of each running job.
    pass_busy = (config.spill and config.spill_rule == "earliest_finish"
                 and "busy" in inspect.signature(Scheduler.assign).parameters)
    expected_end: dict[str, dict[int, float]] = {c: {} for c in names}  # class -> job -> start + estimate
    prices = dict(prices or {})
    missing = [c for c in names if prices and c not in prices]
    if missing:
        raise InvalidRequest(f"--prices has no price for {', '.join(missing)}", field="prices")

    # The cost model once per distinct request: (peak VRAM, run seconds per class, steps).
    scale = config.time_scale
    estimates: list[tuple[int, dict[str, float], int]] = []
    for spec in trace.specs:
        params = request_params(spec)
        _, _, vram, seconds = estimate_request(
            classes, params, spec.get("image_width", 512), spec.get("image_height", 512), dtype=config.dtype,
            cpu_offload=config.cpu_offload, decode_chunk_size=config.decode_chunk_size)
        estimates.append((vram, {k: v * scale for k, v in seconds.items()}, params.num_inference_steps))

    n = len(trace)
    arr_t, spec_of, factor_of = trace.t, trace.spec, trace.vram_factor
    kind_of, prio_of, caller_of = trace.kind, trace.priority, trace.caller
    jobs: list[QueuedJob | None] = [None] * n
    queued_since = [0.0] * n
    wait = [0.0] * n
    finish = [math.nan] * n
    final_class: list[str | None] = [None] * n
    first_start = [math.nan] * n
    status = [""] * n

    gpus = dict(fleet)
    busy = {c: 0 for c in names}
    free_total = sum(gpus.values())
    busy_s = {c: 0.0 for c in names}
    jobs_run = {c: 0 for c in names}
    attempts_on = {c: 0 for c in names}
    spilled_in = {c: 0 for c in names}
    spilled_out = {c: 0 for c in names}
    oom_on = {c: 0 for c in names}
    oom_retries = oom_failed = rejected = 0
    late = 0
    aborted = False
    running: list[tuple[float, int, int, str, bool]] = []  # (finish time, seq, job, class, out of memory)
    seq = 0
    overhead = config.overhead_s
    heappush, heappop = heapq.heappush, heapq.heappop
    i = 0
    now = 0.0
    while i < n or running:
        now = arr_t[i] if i < n else math.inf
        if running and running[0][0] <= now:
            now = running[0][0]
        # 1) attempts that end now (the manager's `_execute` -> `_on_failure`)
        while running and running[0][0] <= now:
            _, _, j, c, oom = heappop(running)
            busy[c] -= 1
            if pass_busy:
                del expected_end[c][j]
            free_total += 1
            job = jobs[j]
            if oom:
                oom_on[c] += 1
                job.home = c  # retry on the class above the one that ran out
                decision = sched.on_failure(job, "oom", "out of memory (simulated)")
                if isinstance(decision, Retry):
                    oom_retries += 1
                    queued_since[j] = now
                    sched.requeue(job)
                else:
                    oom_failed += 1
                    status[j] = "failed"
                    finish[j] = now
            else:
                jobs_run[c] += 1
                status[j] = "succeeded"
                finish[j] = now
        # 2) arrivals now (the manager's `_submit`)
        while i < n and arr_t[i] <= now:
            vram, seconds, _ = estimates[spec_of[i]]
            fields = {"id": str(i), "vram_bytes": vram, "seconds": seconds, "priority": prio_of[i], "seq": i + 1}
            if with_caller:
                fields["caller"] = caller_of[i]
            job = QueuedJob(**fields)
            try:
                sched.admit(job)
            except NoClassFits:
                rejected += 1
                status[i] = "rejected"
            else:
                jobs[i] = job
                queued_since[i] = now
            i += 1
        # 3) dispatch (the manager's `_dispatch` with `_free_slots`)
        if free_total and len(sched):
            free = {c: gpus[c] - busy[c] for c in names}
            if pass_busy:
                # Only the soonest `queued` of them can matter to the plan (each job takes one).
                queued = len(sched)
                left = {}
                for c in names:
                    ends = expected_end[c].values()
                    if len(ends) > queued:
                        ends = heapq.nsmallest(queued, ends)
                    left[c] = [e - now if e > now else 0.0 for e in ends]
                assigned = sched.assign(free, busy=left)
            else:
                assigned = sched.assign(free)
            for job, c in assigned:
                j = int(job.id)
                waited = now - queued_since[j]
                wait[j] += waited
                if first_start[j] != first_start[j]:
                    first_start[j] = now
                if (late_wait_s is not None and kind_of[j] == "interactive" and wait[j] > late_wait_s
                        and wait[j] - waited <= late_wait_s):  # counted once, when it crosses the limit
                    late += 1
                vram, seconds, steps = estimates[spec_of[j]]
                oom = vram * factor_of[j] > memory[c]
                run = (seconds[c] / steps if oom else seconds[c]) + overhead
                busy[c] += 1
                free_total -= 1
                busy_s[c] += run
                attempts_on[c] += 1
                if c != job.home:
                    spilled_in[c] += 1
                    spilled_out[job.home] += 1
                final_class[j] = c
                seq += 1
                heappush(running, (now + run, seq, j, c, oom))
                if pass_busy:
                    expected_end[c][j] = now + seconds[c]
            if max_late is not None and late > max_late:
                aborted = True
                break

    return _report(
        trace, fleet, classes, prices, config, started_wall, now,
        wait=wait, finish=finish, status=status, final_class=final_class, first_start=first_start,
        busy_s=busy_s, jobs_run=jobs_run, attempts_on=attempts_on, spilled_in=spilled_in,
        spilled_out=spilled_out, oom_on=oom_on, oom_retries=oom_retries, oom_failed=oom_failed,
        rejected=rejected, aborted=aborted, record_jobs=record_jobs,
    )


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """{"p50", "p95", "p99", "mean", "max"} of `values` (seconds, rounded; None when empty)."""
    if not len(values):
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None, "max": None}
    got = np.percentile(values, PERCENTILES)
    out = {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, got)}
    out["mean"] = round(float(values.mean()), 3)
    out["max"] = round(float(values.max()), 3)
    return out


def _report(trace, fleet, classes, prices, config, started_wall, end, *, wait, finish, status, final_class,
            first_start, busy_s, jobs_run, attempts_on, spilled_in, spilled_out, oom_on, oom_retries,
            oom_failed, rejected, aborted, record_jobs) -> dict[str, Any]:
    arr = np.asarray(trace.t, dtype=float)
    finish_a = np.asarray(finish, dtype=float)
    wait_a = np.asarray(wait, dtype=float)
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
        class_rows[c] = {
            "gpus": fleet[c],
            "gpu": classes[c].gpu,
            "utilization": round(min(1.0, busy_s[c] / (fleet[c] * horizon)), 4),
            "busy_gpu_hours": round(busy_s[c] / 3600.0, 2),
            "jobs_run": jobs_run[c],
            "attempts": attempts_on[c],
            "spilled_in": spilled_in[c],
            "spilled_out": spilled_out[c],
            "oom": oom_on[c],
        }
    n = len(trace)
    report: dict[str, Any] = {
        "trace": trace.name,
        "fleet": dict(fleet),
        "jobs": {"submitted": n, "succeeded": int(done.sum()), "failed": int((status_a == "failed").sum()),
                 "rejected": rejected, "unfinished": int(n - finished.sum() - rejected)},
        "classes": class_rows,
        "oom_retries": oom_retries,
        "oom_failed": oom_failed,
        "wait_s": percentiles(wait_a[done]),
        "latency_s": percentiles(latency[done]),
        "by_priority": {p: group(prio_a == p) for p in sorted(PRIORITY_RANK, key=PRIORITY_RANK.get, reverse=True)
                        if (prio_a == p).any()},
        "by_kind": {k: group(kind_a == k) for k in ("interactive", "batch") if (kind_a == k).any()},
        "callers": len(set(trace.caller)),
        "trace_hours": round(trace.duration / 3600.0, 3),
        "makespan_s": round(makespan, 3),
        "jobs_per_hour": round(float(done.sum()) / (horizon / 3600.0), 1),
        "aborted": aborted,
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
        report["job_log"] = [[str(j), final_class[j], None if first_start[j] != first_start[j] else first_start[j],
                              None if not finished[j] else finish[j], status[j]] for j in range(n)]
    report["wall_s"] = round(time.perf_counter() - started_wall, 3)
    return report
