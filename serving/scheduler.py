"""The scheduler: which VRAM class a job belongs to, and which queued job runs where next.

Pure decision logic (no Ray, no I/O, no clock): the job manager feeds it jobs, idle worker slots
and failures, and acts on what it returns. Deterministic: the same calls give the same answers.

**Placement.** A job's *home* is the smallest class (by memory) whose `memory_bytes` is at least
the cost model's peak-VRAM estimate. A job that fits no class is refused at once with
`NoClassFits` (it would otherwise wait forever).

**Queues and priorities.** Each class has its own queue of the jobs whose home it is, dispatched
by priority (`high` > `normal` > `low`), then by submission order (`seq`, oldest first). Queues
are heaps with lazy deletion, so admitting, canceling and dispatching cost O(log n).

**Dispatch and spill-up.** `assign(free)` is given the idle worker slots per class. First every
class takes jobs from its own queue. Then, if spill is on, a class with slots still free takes
jobs that are still queued in *smaller* classes which list it in their `spill_to` (default: every
larger class); such a job's own class had no slot left in that call (it would have taken the job
otherwise). Spilled work is picked by priority then age across the eligible queues, and the
smaller idle classes take it first (the big GPUs stay free for big jobs). Never down: a job
never runs on a class with less memory than its home.

**Backlog limit.** `admit` refuses a job with `Backlogged` (HTTP 429) when its home queue already
holds `backlog_limit` jobs; `retry_after` is the estimated time for that queue to drain: the sum of
its jobs' estimated seconds on that class over the class's worker count, rounded up, at least 1.
Retries and restart recovery use `requeue`, which skips the limit.

**Retries.** `on_failure` counts an attempt and decides: out of memory -> retry on the next larger
class (none larger: fail `out_of_memory`); worker died -> retry on the same class; both bounded
by `max_attempts` attempts in all; any other error fails the job at once (`generation_failed`).
The caller requeues a `Retry`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.vram_classes import ClassSet
from pipeline.cost_model import GiB, Workload, estimate

from .jobs import FailureKind

__all__ = [
    "PRIORITY_RANK",
    "Backlogged",
    "Fail",
    "NoClassFits",
    "QueuedJob",
    "Retry",
    "Scheduler",
    "estimate_job",
]

#: Priority names -> rank; a higher rank is dispatched first.
PRIORITY_RANK: dict[str, int] = {"low": -1, "normal": 0, "high": 1}

#: Failure kinds `Scheduler.on_failure` understands.
FAILURE_KINDS: tuple[str, ...] = tuple(k.value for k in FailureKind)


@dataclass
class QueuedJob:
    """What the scheduler knows about one job."""

    id: str
    vram_bytes: int
    """Cost-model peak VRAM estimate (bytes)."""
    seconds: dict[str, float]
    """Estimated run seconds per class name (Retry-After)."""
    priority: str = "normal"
    """`low` | `normal` | `high`."""
    seq: int = 0
    """Submission order (FIFO tie-break; smaller = older)."""
    home: str = ""
    """The class the job belongs to: the smallest fitting class; raised by OOM retries."""
    attempts: int = 0
    """Failed attempts so far."""


class NoClassFits(Exception):
    """The job's estimated peak VRAM exceeds the largest class: refuse it now."""

    def __init__(self, needed_bytes: int, largest: str, largest_bytes: int):
        self.needed_bytes = int(needed_bytes)
        self.largest = largest
        self.largest_bytes = int(largest_bytes)
        self.message = (
            f"estimated peak VRAM {needed_bytes / GiB:.1f} GiB exceeds the largest VRAM class "
            f"{largest} ({largest_bytes / GiB:.1f} GiB); reduce resolution, frames or use "
            f"memory options"
        )
        super().__init__(self.message)


class Backlogged(Exception):
    """The job's class queue is full: answer 429 with `Retry-After: retry_after`."""

    def __init__(
        self, vram_class: str, retry_after: int, queued: int | None = None, limit: int | None = None
    ):
        self.vram_class = vram_class
        self.retry_after = max(1, int(retry_after))
        self.queued = queued
        self.limit = limit
        counts = f" ({queued} jobs queued, limit {limit})" if queued is not None else ""
        self.message = (
            f"the {vram_class} queue is full{counts}; retry in about {self.retry_after} s"
        )
        super().__init__(self.message)


@dataclass(frozen=True)
class Retry:
    """Run the job again on `vram_class` (the caller requeues it)."""

    vram_class: str
    reason: str


@dataclass(frozen=True)
class Fail:
    """Give up: the job becomes `failed` with this error."""

    code: str
    message: str


# Heap entry: (-priority rank, seq, insertion counter, job id). The counter makes every key
# unique, so jobs never get compared and ties resolve in insertion order.
_Entry = tuple[int, int, int, str]


class _ClassQueue:
    """One class's queue: a heap with lazy deletion (canceled entries are skipped on pop)."""

    __slots__ = ("heap", "jobs", "dead")

    def __init__(self) -> None:
        self.heap: list[_Entry] = []
        self.jobs: dict[str, tuple[_Entry, QueuedJob]] = {}
        self.dead = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def push(self, entry: _Entry, job: QueuedJob) -> None:
        self.jobs[job.id] = (entry, job)
        heapq.heappush(self.heap, entry)

    def discard(self, job_id: str) -> QueuedJob | None:
        rec = self.jobs.pop(job_id, None)
        if rec is None:
            return None
        self.dead += 1
        if self.dead > 64 and self.dead > len(self.jobs):
            self.heap = [e for e, _ in self.jobs.values()]
            heapq.heapify(self.heap)
            self.dead = 0
        return rec[1]

    def _prune(self) -> None:
        heap, jobs = self.heap, self.jobs
        while heap:
            top = heap[0]
            rec = jobs.get(top[3])
            if rec is not None and rec[0] is top:
                return
            heapq.heappop(heap)
            self.dead -= 1

    def peek(self) -> _Entry | None:
        self._prune()
        return self.heap[0] if self.heap else None

    def pop(self) -> QueuedJob:
        self._prune()
        entry = heapq.heappop(self.heap)
        return self.jobs.pop(entry[3])[1]

    def ordered(self) -> list[tuple[_Entry, QueuedJob]]:
        return sorted(self.jobs.values(), key=lambda rec: rec[0])


class Scheduler:
    """Placement, per-class priority queues, spill-up dispatch and retry decisions."""

    def __init__(
        self,
        classes: ClassSet,
        *,
        backlog_limit: int | None = 100,
        max_attempts: int = 3,
        spill: bool = True,
    ):
        if backlog_limit is not None and backlog_limit < 0:
            raise ValueError(f"backlog_limit must be >= 0 or None, got {backlog_limit}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.classes = classes
        self.backlog_limit = backlog_limit
        self.max_attempts = max_attempts
        self.spill = spill
        self._names: tuple[str, ...] = classes.names  # smallest first
        self._queues: dict[str, _ClassQueue] = {name: _ClassQueue() for name in self._names}
        self._home_of: dict[str, str] = {}  # queued job id -> class queue holding it
        self._counter = itertools.count()
        # For each class, the smaller classes whose jobs may spill to it.
        self._spill_from: dict[str, tuple[str, ...]] = {
            name: tuple(h for h in self._names if name in classes.spill[h]) for name in self._names
        }

    # ---------------------------------------------------------------------------- placement

    def place(self, vram_bytes: int) -> str:
        """The smallest class with `memory_bytes >= vram_bytes`; `NoClassFits` if none."""
        for c in self.classes.classes:
            if c.memory_bytes >= vram_bytes:
                return c.name
        largest = self.classes.classes[-1]
        raise NoClassFits(vram_bytes, largest.name, largest.memory_bytes)

    # ---------------------------------------------------------------------------- queues

    def admit(self, job: QueuedJob, capacity: Mapping[str, int] | None = None) -> None:
        """Place (if `job.home` is empty) and enqueue a new job.

        Raises `NoClassFits` when no class is large enough and `Backlogged` when its home queue
        already holds `backlog_limit` jobs (`capacity`: workers per class, for `retry_after`).
        """
        self._check_job(job)
        if not job.home:
            job.home = self.place(job.vram_bytes)
        self._check_class(job.home)
        n = len(self._queues[job.home])
        if self.backlog_limit is not None and n >= self.backlog_limit:
            raise Backlogged(job.home, self.retry_after(job.home, capacity), n, self.backlog_limit)
        self._enqueue(job)

    def requeue(self, job: QueuedJob) -> None:
        """Enqueue without the backlog check (retries, restart recovery); places if no home."""
        self._check_job(job)
        if not job.home:
            job.home = self.place(job.vram_bytes)
        self._check_class(job.home)
        self._enqueue(job)

    def remove(self, job_id: str) -> QueuedJob | None:
        """Drop a queued job (cancel) and return it; None if it is not queued."""
        home = self._home_of.pop(job_id, None)
        if home is None:
            return None
        return self._queues[home].discard(job_id)

    def queued(self, vram_class: str | None = None) -> list[QueuedJob]:
        """Queued jobs in dispatch order: one class's queue, or all of them (priority, then seq)."""
        if vram_class is not None:
            self._check_class(vram_class)
            return [job for _, job in self._queues[vram_class].ordered()]
        recs = [rec for q in self._queues.values() for rec in q.jobs.values()]
        return [job for _, job in sorted(recs, key=lambda rec: rec[0])]

    def backlog(self) -> dict[str, int]:
        """Queued jobs per home class (every class, 0 included)."""
        return {name: len(q) for name, q in self._queues.items()}

    def __len__(self) -> int:
        return len(self._home_of)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._home_of

    def retry_after(self, vram_class: str, capacity: Mapping[str, int] | None = None) -> int:
        """Seconds until `vram_class`'s queue plausibly drains (at least 1).

        The queued jobs' estimated seconds on that class, summed, divided by its worker count
        (`capacity[vram_class]`, default 1), rounded up. A job without an estimate for the class
        counts with its slowest known estimate.
        """
        self._check_class(vram_class)
        total = 0.0
        for _, job in self._queues[vram_class].jobs.values():
            secs = job.seconds.get(vram_class)
            if secs is None:
                secs = max(job.seconds.values(), default=0.0)
            total += max(0.0, float(secs))
        workers = max(1, int((capacity or {}).get(vram_class, 1)))
        return max(1, math.ceil(total / workers))

    # ---------------------------------------------------------------------------- dispatch

    def assign(self, free: Mapping[str, int]) -> list[tuple[QueuedJob, str]]:
        """Pop jobs for the idle slots in `free` (class -> idle worker slots); return (job, class).

        Each class first takes its own queue; then (spill on) classes with slots left, smallest
        first, take the best jobs still queued in smaller classes that may spill to them.
        Classes missing from `free` have no slots; unknown classes raise ValueError.
        """
        slots: dict[str, int] = {name: 0 for name in self._names}
        for name, n in free.items():
            self._check_class(name)
            try:
                count = operator.index(n)
            except TypeError:
                count = -1
            if count < 0:
                raise ValueError(f"free slots for {name} must be a non-negative integer, got {n!r}")
            slots[name] = count

        out: list[tuple[QueuedJob, str]] = []
        # 1) Own queues.
        for name in self._names:
            q = self._queues[name]
            while slots[name] and len(q):
                out.append((self._pop(name), name))
                slots[name] -= 1
        if not self.spill:
            return out
        # 2) Spill up. A smaller class that still has jobs queued here has no slot left.
        for name in self._names:
            sources = [h for h in self._spill_from[name] if len(self._queues[h])]
            while slots[name] and sources:
                best = min(sources, key=self._head)
                out.append((self._pop(best), name))
                slots[name] -= 1
                if not len(self._queues[best]):
                    sources.remove(best)
        return out

    # ---------------------------------------------------------------------------- failures

    def on_failure(self, job: QueuedJob, kind: str, message: str = "") -> Retry | Fail:
        """Count a failed attempt of `job` (`job.home`: the class it ran on) and decide.

        `oom`: retry on the next larger class (sets `job.home`); `worker_died`: retry on the
        same class; both while `attempts < max_attempts`. `error`: fail at once.
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind must be one of {FAILURE_KINDS}, got {kind!r}")
        kind = FailureKind(kind)
        job.attempts += 1
        detail = f": {message}" if message else ""
        if kind == FailureKind.ERROR:
            return Fail(kind.fail_code.value, message or "generation failed")
        self._check_class(job.home)
        if kind == FailureKind.OOM:
            larger = self._next_larger(job.home)
            if larger is None:
                return Fail(
                    kind.fail_code.value,
                    f"out of memory on {job.home}, the largest VRAM class{detail}",
                )
            if job.attempts >= self.max_attempts:
                return Fail(
                    kind.fail_code.value,
                    f"out of memory on {job.home} after {job.attempts} attempts{detail}",
                )
            previous, job.home = job.home, larger
            return Retry(larger, f"out of memory on {previous}; retrying on {larger}{detail}")
        # worker_died
        if job.attempts >= self.max_attempts:
            return Fail(
                kind.fail_code.value,
                f"the worker died {job.attempts} times (max_attempts {self.max_attempts}){detail}",
            )
        return Retry(
            job.home, f"worker died (attempt {job.attempts} of {self.max_attempts}){detail}"
        )

    # ---------------------------------------------------------------------------- internals

    def _enqueue(self, job: QueuedJob) -> None:
        if job.id in self._home_of:
            raise ValueError(f"job {job.id!r} is already queued")
        entry: _Entry = (-PRIORITY_RANK[job.priority], job.seq, next(self._counter), job.id)
        self._queues[job.home].push(entry, job)
        self._home_of[job.id] = job.home

    def _head(self, name: str) -> _Entry:
        entry = self._queues[name].peek()
        assert entry is not None
        return entry

    def _pop(self, name: str) -> QueuedJob:
        job = self._queues[name].pop()
        del self._home_of[job.id]
        return job

    def _next_larger(self, name: str) -> str | None:
        memory = self.classes[name].memory_bytes
        for c in self.classes.classes:
            if c.memory_bytes > memory:
                return c.name
        return None

    def _check_class(self, name: str) -> None:
        if name not in self._queues:
            raise ValueError(f"unknown VRAM class {name!r}; classes: {', '.join(self._names)}")

    @staticmethod
    def _check_job(job: QueuedJob) -> None:
        if job.priority not in PRIORITY_RANK:
            raise ValueError(
                f"priority must be one of {', '.join(PRIORITY_RANK)}, got {job.priority!r}"
            )


def estimate_job(
    classes: ClassSet,
    width: int,
    height: int,
    num_frames: int,
    num_inference_steps: int,
    guidance: bool,
    dtype: str = "float16",
    decode_chunk_size: int = 1,
    *,
    cpu_offload: bool = False,
) -> tuple[int, dict[str, float]]:
    """(peak VRAM bytes, estimated seconds per class name) of one job, from the cost model.

    Peak VRAM does not depend on the GPU; seconds use each class's `gpu_spec`.
    """
    workload = Workload(
        width,
        height,
        num_frames,
        num_inference_steps,
        guidance=guidance,
        dtype=dtype,
        decode_chunk_size=decode_chunk_size,
        cpu_offload=cpu_offload,
    )
    vram: int | None = None
    seconds: dict[str, float] = {}
    for c in classes:
        est = estimate(workload, c.gpu_spec)
        if vram is None:
            vram = est.vram_bytes
        seconds[c.name] = est.seconds
    if vram is None:
        raise ValueError("estimate_job needs at least one VRAM class")
    return vram, seconds


def estimate_request(
    classes: ClassSet, params, image_width: int, image_height: int, *, dtype: str = "auto",
    cpu_offload: bool = False, decode_chunk_size: int = 1,
) -> tuple[int, int, int, dict[str, float]]:
    """(output width, output height, peak VRAM bytes, seconds per class) of a request: its
    `GenerationParams` on an image of this size, with the farm's dtype (auto: fp16, as on a GPU)
    and memory options. What submission and `POST /v1/estimate` both place jobs by."""
    from pipeline.request import output_size

    out_w, out_h = output_size(params.resolution, image_width, image_height)
    vram, seconds = estimate_job(
        classes, out_w, out_h, params.num_frames, params.num_inference_steps, params.guidance_scale > 1,
        dtype="float16" if dtype == "auto" else dtype, decode_chunk_size=decode_chunk_size, cpu_offload=cpu_offload,
    )
    return out_w, out_h, vram, seconds
