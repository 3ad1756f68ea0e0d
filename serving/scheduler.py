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
queue in exactly the order it will be popped (what `queue_position` reports). Each level keeps
that order between changes (`_Level`): admitting a newer job inserts it (O(log n) to find its
place), a caller's oldest job starting only marks it; a change that moves other jobs (the round
robin turning on an idle-rule pop, a retry that keeps its age, a job starting ahead of its
caller's older ones) makes the next read sort the level once. Popping costs O(log n + callers at
that priority).

**Dispatch and spill-up.** `assign(free, busy=...)` is given the idle worker slots per class and,
from the job manager, the estimated seconds left of each running job per class (`busy`). With
spill on and `busy` given, *earliest finish*: every queued job is planned, largest class first and
each queue in its order, onto the worker slot where it would finish first, among its home class
and the larger classes in its `spill_to` (default: every larger class), counting the work queued and
running there (a slot is free at its running job's end, then at the end of each job planned onto
it; ties go to the smaller class). Jobs planned onto idle slots start now; the others stay queued
and are planned again on the next call. The plan is computed only as far as it decides what
starts (`_FinishPlan`: a queue whose classes have no idle slot left is planned only when a smaller
class's job needs its effect), with each job's seconds per class computed once, at admission.
So a job spills up only when the larger class would finish it sooner than its home class, and it
waits for a busy faster class when that is sooner than starting on an idle slower one. Without
`busy` (the `idle` rule, and callers that pass nothing): every class takes its own queue first,
then a class with slots still free takes the best jobs (priority, then age) still queued in
smaller classes that may spill to it, smaller idle classes first (the big GPUs stay free for big
jobs). Never down: a job never runs on a class with less
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

import bisect
import collections
import heapq
import itertools
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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

    **The order, kept.** Caller p's jobs (p: its place in the ring) start on visit r, where its
    credit first covers its jobs up to that one; jobs start in (r, p, age) order. `keyed` holds
    that order as sorted (r, place, key, item) tuples, where a caller's place is fixed when it
    joins (ring order, while the ring does not turn). The usual changes keep it: a newer job of a
    caller, or a new caller, is inserted (bisect); a caller's oldest job starting, or its newest
    one leaving, changes no other job's r (a start pays the job's cost from the credit its
    later jobs counted on), so it is only marked removed; the ring's first caller leaving hands
    its visit to the next, whose r stay the same. Anything else (the ring turning in
    `next_caller`, a retry that keeps its age, a job starting ahead of its caller's older ones)
    drops `keyed`, rebuilt with one sort when next read.
    """

    __slots__ = ("flows", "count", "live", "items", "ring", "credit", "quantum", "total", "place", "next_place",
                 "keyed", "dead")

    def __init__(self) -> None:
        # caller -> its keys (seq, counter, id) sorted, with lazy deletion: keys not in `live` are skipped
        self.flows: dict[str, list[_Key]] = {}
        self.count: dict[str, int] = {}  # caller -> its live keys
        self.live: dict[_Key, int] = {}  # queued job -> its cost (GPU-microseconds on the class)
        self.items: dict[_Key, object] = {}  # queued job -> what `entries` hands back with it
        self.ring: list[str] = []
        self.credit: dict[str, int] = {}
        self.quantum: dict[str, int] = {}
        self.total: dict[str, int] = {}  # caller -> the cost of its live keys
        self.place: dict[str, int] = {}  # caller -> its place in `keyed` (ring order)
        self.next_place = 0
        self.keyed: list[tuple[int, int, _Key, object]] | None = []  # the order; None: rebuild
        self.dead = 0  # removed keys still in `keyed`

    def add(self, caller: str, key: _Key, cost: int, quantum: int, item: object = None) -> None:
        """Queue a job (`item`: what `entries` hands back with it)."""
        self.live[key] = cost
        self.items[key] = item
        if caller in self.count:
            flow = self.flows[caller]
            newest = key > flow[-1]
            if newest:
                flow.append(key)  # the usual case: a newer job
            else:
                bisect.insort(flow, key)  # a retry keeps its age
                self.keyed = None
            self.count[caller] += 1
            self.total[caller] += cost
        else:
            self.flows[caller], self.count[caller], self.total[caller] = [key], 1, cost
            self.ring.append(caller)
            self.quantum[caller] = quantum
            self.credit[caller] = quantum  # its first quantum at once: a newcomer wins ties
            self.place[caller] = self.next_place
            self.next_place += 1
        if self.keyed is not None:
            bisect.insort(self.keyed, (self._visit(caller, self.total[caller]), self.place[caller], key, item))

    def _visit(self, caller: str, cost_so_far: int) -> int:
        """The visit (0: the one under way or coming) on which `caller` starts the job whose own and
        older jobs' costs add up to `cost_so_far`."""
        visits = -(-(cost_so_far - self.credit[caller]) // self.quantum[caller])
        return max(0, visits) if caller == self.ring[0] else max(0, visits - 1)

    def head(self, caller: str) -> _Key:
        flow, live = self.flows[caller], self.live
        if flow[0] not in live:
            dead = 1
            while flow[dead] not in live:
                dead += 1
            del flow[:dead]
        return flow[0]

    def drop(self, caller: str, key: _Key, charge: bool) -> None:
        """Remove one job of `caller` (`charge`: it starts and its cost is paid from the credit)."""
        kept = key == (self.head(caller) if charge else self._newest(caller))
        cost = self.live.pop(key)
        del self.items[key]
        if charge:
            self.credit[caller] -= cost
        self.count[caller] -= 1
        self.total[caller] -= cost
        flow = self.flows[caller]
        if len(flow) > 2 * self.count[caller] + 64:  # mostly removed keys: compact
            flow[:] = [k for k in flow if k in self.live]
        if not kept:
            self.keyed = None
        elif self.keyed is not None:
            self.dead += 1
            if self.dead > len(self.live) + 64:
                self.keyed = [e for e in self.keyed if e[2] in self.live]
                self.dead = 0
        if not self.count[caller]:
            for d in (self.flows, self.count, self.credit, self.quantum, self.total, self.place):
                del d[caller]
            at = self.ring.index(caller)
            del self.ring[at]
            if at == 0 and self.ring:  # the next caller's visit starts
                self.credit[self.ring[0]] += self.quantum[self.ring[0]]

    def _newest(self, caller: str) -> _Key:
        flow, live = self.flows[caller], self.live
        at = len(flow) - 1
        while flow[at] not in live:
            at -= 1
        return flow[at]

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
        self.keyed = None  # the same order, but the visits and places are counted from here
        return self.ring[0]

    def entries(self) -> list[tuple[int, int, _Key, object]]:
        """The order: (visit, place, key, item) sorted; keys no longer in `live` are to be skipped."""
        if self.keyed is None:
            keyed = []
            live = self.live
            for p, caller in enumerate(self.ring):
                self.place[caller] = p
                need = 0
                for key in self.flows[caller]:
                    cost = live.get(key)
                    if cost is not None:
                        need += cost
                        keyed.append((self._visit(caller, need), p, key, self.items[key]))
            keyed.sort()  # (visit, place, key) is unique: items are never compared
            self.keyed, self.dead, self.next_place = keyed, 0, len(self.ring)
        return self.keyed

    def order(self) -> list[_Key]:
        """Every queued job of this level in the order `next_caller` would start them."""
        live = self.live
        return [e[2] for e in self.entries() if e[2] in live]


class _ClassQueue:
    """One class's queue: a `_Level` per priority, served highest first."""

    __slots__ = ("name", "names", "jobs", "levels", "fair", "weights", "_order")

    def __init__(self, name: str, names: tuple[str, ...], fair: bool, weights: Mapping[str, float]) -> None:
        self.name = name
        self.names = names  # every class of the scheduler, smallest first
        self.fair = fair
        self.weights = weights
        self.jobs: dict[str, tuple[_Entry, QueuedJob]] = {}
        self.levels: dict[int, _Level] = {}  # -priority rank -> level
        self._order: list[tuple[_Entry, QueuedJob]] | None = None  # cached `ordered()`

    def __len__(self) -> int:
        return len(self.jobs)

    def caller(self, job: QueuedJob) -> str:
        return job.caller if self.fair else ""

    def quantum(self, caller: str) -> int:
        return max(1, round(QUANTUM_S * self.weights.get(caller, 1.0) * _UNITS_PER_S))

    def push(self, entry: _Entry, job: QueuedJob) -> None:
        self.jobs[job.id] = (entry, job)
        secs = job.seconds
        slowest = max(secs.values(), default=0.0)  # a class without an estimate: the slowest known
        took = tuple(float(secs.get(c, slowest)) for c in self.names)  # its seconds on each class
        cost = max(1, round(took[self.names.index(self.name)] * _UNITS_PER_S))  # GPU-microseconds here
        level = self.levels.get(entry[0])
        if level is None:
            level = self.levels[entry[0]] = _Level()
        caller = self.caller(job)
        level.add(caller, entry[1:], cost, self.quantum(caller), (job, took))
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
        """Every queued job in the order `pop` returns them (cached until the queue changes)."""
        if self._order is None:
            jobs = self.jobs
            self._order = [jobs[key[2]] for rank in sorted(self.levels) for key in self.levels[rank].order()]
        return self._order

    def plan_levels(self) -> list[tuple[list[tuple[int, int, _Key, Any]], dict[_Key, int]]]:
        """Per priority level, highest first: its order (`_Level.entries`, each item a job and its
        seconds on each class of `names`) and its live keys (what earliest finish plans with).
        Valid until the queue changes."""
        return [(level.entries(), level.live) for level in (self.levels[r] for r in sorted(self.levels))]


class _FinishPlan:
    """One earliest-finish pass of `Scheduler.assign`, computed only as far as it decides.

    The plan it stands for: homes largest first, each queue in its order; a job takes the slot
    among its targets where it would end first (a slot's free time plus the job's seconds on the
    class; ties: the smaller class, an idle slot before a busy one), and that slot is then free at
    the job's end. Jobs planned onto idle slots start now.

    What it skips without changing the answer: once a home's targets have no idle slot left, the
    rest of that queue can only plan onto busy slots and start nothing (idle slots are never made).
    Those jobs are *pending*: planned later, in the same order, only when a smaller home's job
    would pick a busy slot their plan may still push later. Planning more jobs only makes a
    slot's free time later (a heap's smallest value never falls), so a job that prefers an idle
    slot over a busy one's current free time prefers it over the final one too; and the pending
    homes touch only their targets, which no job planned meanwhile has written to (it took an
    idle slot, which their targets lack, or a busy slot no pending job may still reach).

    Classes are indices into the scheduler's names (smallest first); a job's seconds on each
    class come precomputed with it (`_ClassQueue.plan_levels`).
    """

    __slots__ = ("idle", "idle_left", "heaps", "pending", "reach", "started")

    def __init__(self, names: Sequence[str], slots: Mapping[str, int], busy: Mapping[str, list[float]]):
        self.idle = [slots[c] for c in names]  # idle slots left per class (free now)
        self.idle_left = sum(self.idle)
        self.heaps: list[list[float]] = []  # per class, the free times of its other slots
        for c in names:
            heap = list(busy[c])
            heapq.heapify(heap)
            self.heaps.append(heap)
        # Pending homes, largest first: [targets, next job's seconds, the rest of the queue].
        self.pending: collections.deque[list] = collections.deque()
        self.reach = [0] * len(names)  # per class, the pending homes that may still plan onto it
        self.started: list[tuple[QueuedJob, int]] = []

    def has_slots(self, c: int) -> bool:
        return bool(self.idle[c] or self.heaps[c])

    def run(self, targets: tuple[int, ...], levels: list[tuple[list[tuple], dict[_Key, int]]]) -> bool:
        """Plan a home's queue (`_ClassQueue.plan_levels`); False once no idle slot is left anywhere
        (nothing more starts)."""
        for at, (entries, live) in enumerate(levels):
            rest = iter(entries)
            for e in rest:
                if e[2] not in live:
                    continue  # removed
                if not self.idle_left:
                    return False
                if not self._plan(targets, e[3]):  # its targets have no idle slot: the rest waits
                    self.pending.append([targets, e[3][1], _live_items(rest, live, levels[at + 1:])])
                    for c in targets:
                        self.reach[c] += 1
                    return True
        return True

    def _plan(self, targets: tuple[int, ...], item: tuple[QueuedJob, tuple[float, ...]]) -> bool:
        """Plan one job of a home being planned; False (nothing done) if no target has an idle slot."""
        idle, heaps, reach = self.idle, self.heaps, self.reach
        job, took = item
        while True:
            best_end, best, any_idle = math.inf, -1, False
            for c in targets:  # smallest class first: ties stay there
                if idle[c]:
                    any_idle, end = True, took[c]
                else:
                    end = heaps[c][0] + took[c]
                if end < best_end:
                    best_end, best = end, c
            if idle[best] or not reach[best] or not any_idle or not self._plan_pending():
                break  # an idle slot, or a busy one whose free time is final
        if not any_idle:
            return False
        if idle[best]:
            idle[best] -= 1
            self.idle_left -= 1
            heapq.heappush(heaps[best], best_end)
            self.started.append((job, best))
        else:
            heapq.heapreplace(heaps[best], best_end)
        return True

    def _plan_pending(self) -> bool:
        """Plan the next pending job (largest pending home first); False if none is left."""
        if not self.pending:
            return False
        entry = self.pending[0]
        targets, took, heaps = entry[0], entry[1], self.heaps
        best_end, best = math.inf, -1
        for c in targets:  # no idle slot among them
            end = heaps[c][0] + took[c]
            if end < best_end:
                best_end, best = end, c
        heapq.heapreplace(heaps[best], best_end)
        nxt = next(entry[2], None)
        if nxt is not None:
            entry[1] = nxt[1]
        else:
            self.pending.popleft()
            for c in targets:
                self.reach[c] -= 1
        return True


def _busy_seconds(name: str, times: Sequence[float]) -> list[float]:
    """`assign`'s busy seconds of one class, checked (numbers, not NaN); overdue ones count 0."""
    try:
        ok = not math.isnan(math.fsum(times))  # C speed; NaN also from inf - inf: look closer
    except (TypeError, ValueError, OverflowError):  # OverflowError: huge (valid) values
        ok = False
    if not ok:
        for t in times:
            if not (isinstance(t, (int, float)) and not math.isnan(t)):
                raise ValueError(f"busy seconds for {name} must be numbers, got {t!r}")
    return [float(t) if t > 0 else 0.0 for t in times]  # overdue: about to finish


def _live_items(rest: Iterator[tuple], live: dict[_Key, int], levels: list[tuple[list[tuple], dict[_Key, int]]],
                ) -> Iterator[tuple[QueuedJob, tuple[float, ...]]]:
    """The items of a home's order from `rest` (an iterator into one level's entries) on, then of
    the later `levels`, skipping removed keys."""
    for e in rest:
        if e[2] in live:
            yield e[3]
    for entries, level_live in levels:
        for e in entries:
            if e[2] in level_live:
                yield e[3]


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
        self._index = {name: i for i, name in enumerate(self._names)}
        self._queues: dict[str, _ClassQueue] = {
            name: _ClassQueue(name, self._names, fair_share, self.share_weights) for name in self._names
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

    def position(self, job_id: str) -> int | None:
        """A queued job's place in its class queue's dispatch order (1 = next; None: not queued):
        `queued(its class)`'s index + 1, counted without building the list."""
        home = self._home_of.get(job_id)
        if home is None:
            return None
        at = 0
        for entries, live in self._queues[home].plan_levels():
            for e in entries:
                if e[2] in live:
                    at += 1
                    if e[2][2] == job_id:
                        return at
        raise AssertionError(f"queued job {job_id!r} is missing from its queue's order")

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
                left[name] = _busy_seconds(name, times)
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
        plan = _FinishPlan(self._names, slots, busy)
        index = self._index
        for home in reversed(self._names):
            targets = tuple(index[c] for c in (home, *self.classes.spill[home]) if plan.has_slots(index[c]))
            if targets and not plan.run(targets, self._queues[home].plan_levels()):
                break
        names = self._names
        for job, _ in plan.started:  # in the order they start, as `pop` would charge them
            self._queues[self._home_of.pop(job.id)].discard(job.id, charge=True)
        return [(job, names[c]) for job, c in plan.started]

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
