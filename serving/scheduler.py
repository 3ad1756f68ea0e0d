"""The scheduler: which VRAM class a job belongs to, and which queued job runs where next.

Pure decision logic (no Ray, no I/O, no clock): the job manager feeds it jobs, idle worker slots
and failures, and acts on what it returns. Deterministic: the same calls give the same answers.

**Placement.** A job's *home* is the smallest class (by memory) whose `memory_bytes` is at least
the cost model's peak-VRAM estimate. A job that fits no class is refused at once with
`NoClassFits` (it would otherwise wait forever).

**Queues and priorities.** Each class has its own queue of the jobs whose home it is, dispatched
by priority (`high` > `normal` > `low`) first. Within a priority, the callers (`QueuedJob.caller`,
the API token's name) share the class by *deficit round robin* over estimated GPU-seconds (the
job's seconds on that class): callers take turns; each turn adds `QUANTUM_S` x the caller's weight
(`share_weights`, default 1) to its credit, and a caller starts its oldest job (by `seq`) when its
credit covers the job's seconds, paying them from the credit. So a caller with a 2,000-job batch and
one with a single job alternate, and weight 2 gets twice the GPU-seconds of weight 1. With
`fair_share` off every job counts as one caller's: first come, first served. `queued()` lists a
queue in exactly the order it will be popped (what `queue_position` reports). Admitting and
canceling cost O(log n), popping O(log n + callers at that priority); `queued()` sorts once per
change of the queue.

**Dispatch and spill-up.** `assign(free, busy=...)` is given the idle worker slots per class and,
from the job manager, the estimated seconds left of each running job per class (`busy`). With
spill on and `busy` given, *earliest finish*: every queued job is planned, largest class first and
each queue in its order, onto the worker slot where it would finish first, among its home class
and the larger classes in its `spill_to` (default: every larger class), counting the work queued and
running there (a slot is free at its running job's end, then at the end of each job planned onto
it; ties go to the smaller class). Jobs planned onto idle slots start now; the others stay queued
and are planned again on the next call. So a job spills up only when the larger class would finish
it sooner than its home class, and it waits for a busy faster class when that is sooner than
starting on an idle slower one. Without `busy` (the `idle` rule, and callers that pass nothing):
every class takes its own queue first, then a class with slots still free takes the best jobs
(priority, then age) still queued in smaller classes that may spill to it, smaller idle classes
first (the big GPUs stay free for big jobs). Never down: a job never runs on a class with less
memory than its home.

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
from collections.abc import Mapping, Sequence
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
    caller: str = ""
    """Who submitted it (the API token's name): fair sharing splits GPU time among callers."""


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
#: A job's key within its priority level: (seq, insertion counter, job id).
_Key = tuple[int, int, str]

#: Fair-share credit unit: one microsecond of estimated GPU time.
_UNITS_PER_S = 1_000_000
#: Deficit round robin quantum: credit a caller of weight 1 gets per visit (1 ms of GPU time).
#: Small, so that no caller runs much more than one job ahead of its share; rounds in which
#: nobody could start a job are skipped in one step (`_Level.next_caller`), so small costs nothing.
QUANTUM_S = 0.001


class _Level:
    """The jobs of one priority in one class queue, shared among callers by deficit round robin.

    Each caller (a *flow*) has its jobs oldest first (`seq`) and a credit in GPU-microseconds.
    `ring` lists the callers with queued jobs in visit order; `ring[0]` is the one whose visit is
    under way (it has had its quantum for this visit). A visit starts by adding the caller's
    quantum (`QUANTUM_S` x its weight) to its credit; the caller then starts its oldest job if
    its credit covers the job's estimated GPU-seconds (the credit pays for it), else the turn
    passes to the next caller. A caller whose last job leaves the ring loses its credit; one
    that arrives joins at the end of the ring with one quantum (so between a backlogged caller
    and a newcomer with equal jobs, the newcomer goes first).
    """

    __slots__ = ("flows", "count", "live", "ring", "credit", "quantum")

    def __init__(self) -> None:
        # caller -> heap of (seq, counter, id), with lazy deletion: keys not in `live` are skipped
        self.flows: dict[str, list[_Key]] = {}
        self.count: dict[str, int] = {}  # caller -> its live keys
        self.live: dict[_Key, int] = {}  # queued job -> its cost (GPU-microseconds on the class)
        self.ring: list[str] = []
        self.credit: dict[str, int] = {}
        self.quantum: dict[str, int] = {}

    def add(self, caller: str, key: _Key, cost: int, quantum: int) -> None:
        self.live[key] = cost
        if caller in self.count:
            heapq.heappush(self.flows[caller], key)
            self.count[caller] += 1
            return
        self.flows[caller], self.count[caller] = [key], 1
        self.ring.append(caller)
        self.quantum[caller] = quantum
        self.credit[caller] = quantum  # its first quantum at once: a newcomer wins ties

    def head(self, caller: str) -> _Key:
        flow, live = self.flows[caller], self.live
        while flow[0] not in live:
            heapq.heappop(flow)
        return flow[0]

    def drop(self, caller: str, key: _Key, charge: bool) -> None:
        """Remove one job of `caller` (`charge`: it starts and its cost is paid from the credit)."""
        cost = self.live.pop(key)
        if charge:
            self.credit[caller] -= cost
        self.count[caller] -= 1
        if not self.count[caller]:
            del self.flows[caller], self.count[caller], self.credit[caller], self.quantum[caller]
            at = self.ring.index(caller)
            del self.ring[at]
            if at == 0 and self.ring:  # the next caller's visit starts
                self.credit[self.ring[0]] += self.quantum[self.ring[0]]

    def next_caller(self) -> str:
        """Advance the round robin to the caller whose oldest job starts next; return it.

        Caller p (its position in `ring`) first affords its head job on visit r (0: the visit
        under way for p = 0, the coming one for the others; later visits one ring cycle apart);
        the winner is the smallest (r, p). Every caller then gets the quanta of the visits it had
        on the way there, and the ring turns so the winner's visit is under way.
        """
        ring, credit, quantum, live = self.ring, self.credit, self.quantum, self.live
        caller = ring[0]
        need = live[self.head(caller)] - credit[caller]
        if need <= 0:
            return caller  # its visit goes on
        best, won = -(-need // quantum[caller]), 0  # ceil: visits still needed
        for p in range(1, len(ring)):
            caller = ring[p]
            r = -(-(live[self.head(caller)] - credit[caller]) // quantum[caller]) - 1
            if r < best:
                best, won = max(0, r), p
                if not best:
                    break
        for p, caller in enumerate(ring):
            credit[caller] += (best + (0 < p <= won)) * quantum[caller]
        if won:
            self.ring = ring[won:] + ring[:won]
        return self.ring[0]

    def order(self) -> list[_Key]:
        """Every queued job of this level in the order `next_caller` would start them."""
        keyed = []
        live = self.live
        for p, caller in enumerate(self.ring):
            q = self.quantum[caller]
            need = -self.credit[caller]
            for i, key in enumerate(sorted(k for k in self.flows[caller] if k in live)):
                need += live[key]
                visits = -(-need // q)
                r = max(0, visits) if p == 0 else max(0, visits - 1)
                keyed.append(((r, p, i), key))
        keyed.sort(key=operator.itemgetter(0))
        return [key for _, key in keyed]


class _ClassQueue:
    """One class's queue: a `_Level` per priority, served highest first."""

    __slots__ = ("name", "jobs", "levels", "fair", "weights", "_order")

    def __init__(self, name: str, fair: bool, weights: Mapping[str, float]) -> None:
        self.name = name
        self.fair = fair
        self.weights = weights
        self.jobs: dict[str, tuple[_Entry, QueuedJob]] = {}
        self.levels: dict[int, _Level] = {}  # -priority rank -> level
        self._order: list[tuple[_Entry, QueuedJob]] | None = None  # cached `ordered()`

    def __len__(self) -> int:
        return len(self.jobs)

    def caller(self, job: QueuedJob) -> str:
        return job.caller if self.fair else ""

    def cost(self, job: QueuedJob) -> int:
        """A job's estimated GPU-microseconds on this class (at least 1)."""
        secs = job.seconds.get(self.name)
        if secs is None:
            secs = max(job.seconds.values(), default=0.0)
        return max(1, round(float(secs) * _UNITS_PER_S))

    def quantum(self, caller: str) -> int:
        return max(1, round(QUANTUM_S * self.weights.get(caller, 1.0) * _UNITS_PER_S))

    def push(self, entry: _Entry, job: QueuedJob) -> None:
        self.jobs[job.id] = (entry, job)
        level = self.levels.get(entry[0])
        if level is None:
            level = self.levels[entry[0]] = _Level()
        caller = self.caller(job)
        level.add(caller, entry[1:], self.cost(job), self.quantum(caller))
        self._order = None

    def discard(self, job_id: str, charge: bool = False) -> QueuedJob | None:
        """Take a job out (`charge`: it starts, its caller pays its cost; else it is canceled)."""
        rec = self.jobs.get(job_id)
        if rec is None:
            return None
        entry, job = rec
        level = self.levels[entry[0]]
        level.drop(self.caller(job), entry[1:], charge)
        del self.jobs[job_id]
        if not level.ring:
            del self.levels[entry[0]]
        self._order = None
        return job

    def peek(self) -> _Entry | None:
        """The entry of the job `pop` returns next."""
        if not self.levels:
            return None
        rank = min(self.levels)
        level = self.levels[rank]
        caller = level.next_caller()  # turns the ring; the order stays
        return (rank, *level.head(caller))

    def pop(self) -> QueuedJob:
        entry = self.peek()
        assert entry is not None
        job = self.discard(entry[3], charge=True)
        assert job is not None
        return job

    def ordered(self) -> list[tuple[_Entry, QueuedJob]]:
        """Every queued job in the order `pop` returns them."""
        if self._order is None:
            self._order = [
                self.jobs[key[2]]
                for rank in sorted(self.levels)
                for key in self.levels[rank].order()
            ]
        return self._order


class Scheduler:
    """Placement, per-class priority queues shared fairly among callers, spill-up dispatch and
    retry decisions."""

    def __init__(
        self,
        classes: ClassSet,
        *,
        backlog_limit: int | None = 100,
        max_attempts: int = 3,
        spill: bool = True,
        fair_share: bool = True,
        share_weights: Mapping[str, float] | None = None,
    ):
        if backlog_limit is not None and backlog_limit < 0:
            raise ValueError(f"backlog_limit must be >= 0 or None, got {backlog_limit}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.classes = classes
        self.backlog_limit = backlog_limit
        self.max_attempts = max_attempts
        self.spill = spill
        self.fair_share = fair_share
        self.share_weights = dict(share_weights or {})
        for caller, weight in self.share_weights.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"share_weights[{caller!r}] must be a positive number, got {weight!r}")
        self._names: tuple[str, ...] = classes.names  # smallest first
        self._queues: dict[str, _ClassQueue] = {
            name: _ClassQueue(name, fair_share, self.share_weights) for name in self._names
        }
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

    def assign(
        self, free: Mapping[str, int], *, busy: Mapping[str, Sequence[float]] | None = None
    ) -> list[tuple[QueuedJob, str]]:
        """Pop jobs for the idle slots in `free` (class -> idle worker slots); return (job, class).

        Without `busy`: each class first takes its own queue; then (spill on) classes with slots
        left, smallest first, take the best jobs still queued in smaller classes that may spill
        to them. With `busy` (class -> estimated seconds left of each running job there) and
        spill on: earliest finish (`_assign_earliest_finish`). Classes missing from `free` have
        no idle slots; unknown classes raise ValueError.
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
        if busy is not None and self.spill:
            left: dict[str, list[float]] = {name: [] for name in self._names}
            for name, times in busy.items():
                self._check_class(name)
                for t in times:
                    if not (isinstance(t, (int, float)) and not math.isnan(t)):
                        raise ValueError(f"busy seconds for {name} must be numbers, got {t!r}")
                    left[name].append(max(0.0, float(t)))  # overdue: about to finish
            return self._assign_earliest_finish(slots, left)

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

    def _assign_earliest_finish(
        self, slots: Mapping[str, int], busy: Mapping[str, list[float]]
    ) -> list[tuple[QueuedJob, str]]:
        """Plan every queued job onto the worker slot that finishes it first; start those whose
        slot is idle now.

        Each slot is free at an estimated time (0 when idle, else its running job's seconds left).
        Classes are planned largest first (a class's own jobs go before work that spills to it),
        each queue in its dispatch order; a job takes the slot, among its home class and the
        classes it may spill to, where it would *finish* first (its estimated seconds on that
        class added to the slot's free time; ties: the smaller class), and that slot becomes free
        again when the job would end. A job planned onto an idle slot starts now; one planned onto
        a busy slot stays queued (the next call plans again), so a job waits for a faster class
        when that would finish it sooner, and a slower class idles only when nothing queued would
        finish sooner there.
        """
        free_at: dict[str, list[tuple[float, int]]] = {}  # class -> heap of (free at, 0 idle / 1 busy)
        for name in self._names:
            heap = [(0.0, 0)] * slots[name] + [(t, 1) for t in busy[name]]
            heapq.heapify(heap)
            free_at[name] = heap
        idle = sum(slots.values())
        out: list[tuple[QueuedJob, str]] = []
        for home in reversed(self._names):
            targets = [c for c in (home, *self.classes.spill[home]) if free_at[c]]
            if not targets:
                continue  # no worker of the class (or larger) is up: it waits
            heaps = [(free_at[c], c) for c in targets]
            for _, job in list(self._queues[home].ordered()):
                if not idle:
                    return out
                secs = job.seconds
                best = None
                for heap, c in heaps:  # smallest class first: ties stay there
                    took = secs.get(c)
                    if took is None:  # no estimate for the class: its slowest known one
                        took = max(secs.values(), default=0.0)
                    end = heap[0][0] + took
                    if best is None or end < best[0]:
                        best = (end, heap, c)
                end, heap, on = best
                was_busy = heap[0][1]
                heapq.heapreplace(heap, (end, 1))
                if not was_busy:
                    idle -= 1
                    self._queues[home].discard(job.id, charge=True)
                    del self._home_of[job.id]
                    out.append((job, on))
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
