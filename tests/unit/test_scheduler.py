"""The scheduler: smallest-fit placement, priority queues, spill-up, backlog limits, retries."""

from __future__ import annotations

import heapq
import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.vram_classes import ClassSet, VramClass, default_classes
from pipeline.cost_model import RESOLUTIONS, GiB, Workload, estimate
from serving.scheduler import (
    PRIORITY_RANK,
    Backlogged,
    Fail,
    NoClassFits,
    QueuedJob,
    Retry,
    Scheduler,
    estimate_job,
)

CLASSES = default_classes()  # 12gb, 24gb, 40gb, 80gb


def job(id: str, gib: float = 1.0, *, priority="normal", seq=0, seconds=None, home="") -> QueuedJob:
    """A job of `gib` GiB (10 s on every class unless `seconds` is given)."""
    secs = {name: 10.0 for name in CLASSES.names} if seconds is None else seconds
    return QueuedJob(id, int(gib * GiB), dict(secs), priority=priority, seq=seq, home=home)


def ids(pairs):
    return [(j.id, c) for j, c in pairs]


# ------------------------------------------------------------------------------- placement


def test_estimate_job_matches_the_cost_model_per_class():
    w, h = RESOLUTIONS["512p"]
    vram, seconds = estimate_job(CLASSES, w, h, 16, 50, True)
    wl = Workload(w, h, 16, 50)
    assert vram == estimate(wl, CLASSES["80gb"].gpu_spec).vram_bytes
    # measured on an H200: 7.26 GiB allocated + 0.58 GiB CUDA context; the model adds 10% on activations
    assert 8.0 < vram / GiB < 8.2
    assert list(seconds) == ["12gb", "24gb", "40gb", "80gb"]
    for c in CLASSES:
        assert seconds[c.name] == pytest.approx(estimate(wl, c.gpu_spec).seconds)
    # Faster GPUs, fewer seconds.
    assert seconds["12gb"] > seconds["24gb"] > seconds["40gb"] > seconds["80gb"]
    # Options reach the cost model: no CFG is cheaper, float32 needs more memory.
    assert estimate_job(CLASSES, w, h, 16, 50, False)[1]["24gb"] < seconds["24gb"]
    assert estimate_job(CLASSES, w, h, 16, 50, True, dtype="float32")[0] > vram


@pytest.mark.parametrize(
    "resolution, frames, home",
    [("512p", 16, "12gb"), ("768p", 16, "12gb"), ("1024p", 16, "24gb"), ("1024p", 32, "40gb")],
)
def test_smallest_fitting_class_from_real_estimates(resolution, frames, home):
    w, h = RESOLUTIONS[resolution]
    vram, _ = estimate_job(CLASSES, w, h, frames, 50, True)
    s = Scheduler(CLASSES)
    assert s.place(vram) == home
    # Smallest: the next smaller class would not fit.
    idx = CLASSES.names.index(home)
    assert CLASSES[home].memory_bytes >= vram
    if idx:
        assert CLASSES.classes[idx - 1].memory_bytes < vram


def test_place_boundaries():
    s = Scheduler(CLASSES)
    assert s.place(12 * GiB) == "12gb"
    assert s.place(12 * GiB + 1) == "24gb"
    assert s.place(0) == "12gb"
    assert s.place(80 * GiB) == "80gb"
    with pytest.raises(NoClassFits):
        s.place(80 * GiB + 1)


def test_1024p_24_and_32_frames_on_a_12gb_24gb_subset():
    small = CLASSES.subset(["12gb", "24gb"])
    w, h = RESOLUTIONS["1024p"]
    # float16 x 24 frames: ~22.3 GiB by the cost model (it ran under a 24 GiB cap on an H200).
    vram16, _ = estimate_job(small, w, h, 24, 50, True)
    assert 22.0 < vram16 / GiB < 22.7
    assert Scheduler(small).place(vram16) == "24gb"
    # x 32 frames: ~28 GiB (out of memory under the 24 GiB cap), more than the largest class:
    # refused with the reason.
    vram32, seconds = estimate_job(small, w, h, 32, 50, True)
    assert 27.5 < vram32 / GiB < 28.5
    s = Scheduler(small)
    with pytest.raises(NoClassFits) as info:
        s.admit(QueuedJob("big", vram32, seconds))
    err = info.value
    assert err.needed_bytes == vram32 and err.largest == "24gb"
    assert f"{vram32 / GiB:.1f} GiB" in err.message
    assert "24gb" in err.message and "24.0 GiB" in err.message
    assert s.backlog() == {"12gb": 0, "24gb": 0} and len(s) == 0


def test_1024p_32_frames_float16_fits_no_class_of_a_12gb_only_subset():
    only12 = CLASSES.subset(["12gb"])
    w, h = RESOLUTIONS["1024p"]
    vram, _ = estimate_job(only12, w, h, 32, 50, True)
    with pytest.raises(NoClassFits) as info:
        Scheduler(only12).place(vram)
    assert info.value.largest == "12gb"
    assert "28.0 GiB" in info.value.message and "12.0 GiB" in info.value.message


def test_admit_sets_home_and_keeps_a_given_one():
    s = Scheduler(CLASSES)
    a = job("a", 7.1)
    b = job("b", 12.8)
    c = job("c", 1.0, home="40gb")  # e.g. raised by an earlier OOM
    for j in (a, b, c):
        s.admit(j)
    assert (a.home, b.home, c.home) == ("12gb", "24gb", "40gb")
    assert s.backlog() == {"12gb": 1, "24gb": 1, "40gb": 1, "80gb": 0}
    with pytest.raises(ValueError):
        s.admit(job("d", home="13gb"))
    with pytest.raises(ValueError):
        s.admit(job("e", priority="urgent"))
    with pytest.raises(ValueError):
        s.admit(job("a"))  # already queued


# ------------------------------------------------------------------------------- order


def test_priority_then_fifo_order():
    s = Scheduler(CLASSES)
    specs = [("n1", "normal", 1), ("l0", "low", 0), ("h3", "high", 3), ("n0", "normal", 0), ("h5", "high", 5)]
    for i, p, seq in specs:
        s.admit(job(i, priority=p, seq=seq))
    assert [j.id for j in s.queued("12gb")] == ["h3", "h5", "n0", "n1", "l0"]
    assert ids(s.assign({"12gb": 2})) == [("h3", "12gb"), ("h5", "12gb")]
    assert ids(s.assign({"12gb": 10})) == [("n0", "12gb"), ("n1", "12gb"), ("l0", "12gb")]
    assert s.assign({"12gb": 1}) == []


def test_queued_all_classes_in_global_dispatch_order():
    s = Scheduler(CLASSES)
    s.admit(job("a", 1, seq=2))
    s.admit(job("b", 30, seq=1))
    s.admit(job("c", 20, seq=3, priority="high"))
    assert [j.id for j in s.queued()] == ["c", "b", "a"]
    assert PRIORITY_RANK == {"low": -1, "normal": 0, "high": 1}


# ------------------------------------------------------------------------------- spill


def test_own_class_runs_its_jobs_when_it_has_a_slot():
    s = Scheduler(CLASSES)
    s.admit(job("a", 5))
    assert ids(s.assign({"12gb": 1, "24gb": 1, "80gb": 1})) == [("a", "12gb")]


def test_spill_up_when_own_class_is_full_and_a_larger_one_idle():
    s = Scheduler(CLASSES)
    for i in range(3):
        s.admit(job(f"j{i}", 5, seq=i))
    out = ids(s.assign({"12gb": 1, "24gb": 1}))
    assert out == [("j0", "12gb"), ("j1", "24gb")]
    assert [j.id for j in s.queued()] == ["j2"]
    # Own class busy (0 slots), two idle larger classes: the smaller idle one takes it first.
    s.admit(job("j3", 5, seq=3))
    assert ids(s.assign({"40gb": 1, "80gb": 1})) == [("j2", "40gb"), ("j3", "80gb")]


def test_never_spill_down():
    s = Scheduler(CLASSES)
    s.admit(job("big", 30))  # home 40gb
    assert s.assign({"12gb": 4, "24gb": 4}) == []
    assert ids(s.assign({"80gb": 1})) == [("big", "80gb")]


def test_own_queue_before_spilled_work():
    s = Scheduler(CLASSES)
    s.admit(job("small-old", 5, seq=0, priority="high"))  # home 12gb
    s.admit(job("mid-new", 20, seq=9, priority="low"))  # home 24gb
    # 12gb has no slot; 24gb has one: its own (low, newer) job goes before the spilled high one.
    assert ids(s.assign({"24gb": 1})) == [("mid-new", "24gb")]
    assert ids(s.assign({"24gb": 1})) == [("small-old", "24gb")]


def test_spilled_candidates_picked_by_priority_then_seq_across_classes():
    s = Scheduler(CLASSES)
    s.admit(job("a12", 5, seq=1))
    s.admit(job("b24", 20, seq=0))
    s.admit(job("c12", 5, seq=2, priority="high"))
    assert ids(s.assign({"40gb": 2})) == [("c12", "40gb"), ("b24", "40gb")]
    assert ids(s.assign({"40gb": 2})) == [("a12", "40gb")]


def test_spill_disabled():
    s = Scheduler(CLASSES, spill=False)
    s.admit(job("a", 5, seq=0))
    s.admit(job("b", 5, seq=1))
    assert ids(s.assign({"12gb": 1, "24gb": 2, "80gb": 2})) == [("a", "12gb")]
    assert [j.id for j in s.queued("12gb")] == ["b"]


def test_spill_to_config_is_respected():
    classes = ClassSet(
        [
            VramClass(name="12gb", memory_gib=12, gpu="rtx3060-12gb", spill_to=("40gb",)),
            VramClass(name="24gb", memory_gib=24, gpu="rtx4090-24gb", spill_to=()),
            VramClass(name="40gb", memory_gib=40, gpu="a100-40gb"),
        ]
    )
    s = Scheduler(classes)
    s.admit(job("a", 5, seq=0, seconds={}))  # home 12gb, may spill to 40gb only
    s.admit(job("b", 20, seq=1, seconds={}))  # home 24gb, may not spill
    s.admit(job("c", 20, seq=2, seconds={}))
    # 24gb takes its own jobs but not 12gb's (not in its spill_to).
    assert ids(s.assign({"24gb": 3})) == [("b", "24gb"), ("c", "24gb")]
    assert [j.id for j in s.queued()] == ["a"]
    assert s.assign({"24gb": 3}) == []
    s.admit(job("d", 20, seq=3, seconds={}))
    # 40gb idle: takes 12gb's job, not 24gb's (24gb spills nowhere).
    assert ids(s.assign({"40gb": 3})) == [("a", "40gb")]
    assert [j.id for j in s.queued()] == ["d"]


def test_assign_rejects_unknown_classes_and_bad_counts():
    s = Scheduler(CLASSES)
    s.admit(job("a"))
    with pytest.raises(ValueError, match="16gb"):
        s.assign({"16gb": 1})
    with pytest.raises(ValueError):
        s.assign({"12gb": -1})
    with pytest.raises(ValueError):
        s.assign({"12gb": 1.5})
    assert [j.id for j in s.queued()] == ["a"]  # nothing popped by a rejected call
    assert s.assign({}) == []


# ------------------------------------------------------------------------------- backlog


def test_backlog_limit_raises_backlogged_with_retry_after():
    s = Scheduler(CLASSES, backlog_limit=3)
    for i, secs in enumerate([100.0, 50.5, 30.0]):
        s.admit(job(f"j{i}", 5, seq=i, seconds={"12gb": secs, "24gb": 1.0}))
    s.admit(job("other", 20))  # another class is not affected
    with pytest.raises(Backlogged) as info:
        s.admit(job("j3", 5, seq=3), capacity={"12gb": 2})
    err = info.value
    assert err.vram_class == "12gb"
    assert err.retry_after == math.ceil(180.5 / 2) == 91
    assert "12gb" in err.message and "91" in err.message
    assert s.backlog() == {"12gb": 3, "24gb": 1, "40gb": 0, "80gb": 0}
    assert "j3" not in s
    # Without capacity: one worker.
    with pytest.raises(Backlogged) as info:
        s.admit(job("j4", 5, seq=4))
    assert info.value.retry_after == 181
    # requeue (retries, recovery) skips the limit.
    s.requeue(job("j5", 5, seq=5))
    assert s.backlog()["12gb"] == 4
    # A dispatch frees room again.
    s.assign({"12gb": 2})
    s.admit(job("j6", 5, seq=6))
    assert s.backlog()["12gb"] == 3


def test_retry_after_rules():
    s = Scheduler(CLASSES, backlog_limit=None)
    assert s.retry_after("12gb") == 1  # empty queue: at least 1
    s.admit(job("a", 5, seconds={"12gb": 0.2}))
    assert s.retry_after("12gb") == 1
    s.admit(job("b", 5, seconds={"12gb": 10.0}))
    assert s.retry_after("12gb") == 11
    assert s.retry_after("12gb", {"12gb": 4}) == math.ceil(10.2 / 4) == 3
    assert s.retry_after("12gb", {"12gb": 0}) == 11  # max(1, capacity)
    assert s.retry_after("12gb", {"24gb": 8}) == 11  # missing: 1 worker
    assert s.retry_after("24gb", {"24gb": 8}) == 1  # other class queues do not count
    with pytest.raises(ValueError):
        s.retry_after("16gb")


def test_unlimited_and_zero_backlog():
    s = Scheduler(CLASSES, backlog_limit=None)
    for i in range(500):
        s.admit(job(f"j{i}", seq=i))
    assert s.backlog()["12gb"] == 500
    z = Scheduler(CLASSES, backlog_limit=0)
    with pytest.raises(Backlogged):
        z.admit(job("a"))


# ------------------------------------------------------------------------------- remove


def test_remove():
    s = Scheduler(CLASSES)
    a, b, c = job("a", seq=0), job("b", seq=1), job("c", 20, seq=2)
    for j in (a, b, c):
        s.admit(j)
    assert s.remove("a") is a
    assert s.remove("a") is None
    assert s.remove("nope") is None
    assert s.backlog() == {"12gb": 1, "24gb": 1, "40gb": 0, "80gb": 0}
    assert ids(s.assign({"12gb": 5, "24gb": 5})) == [("b", "12gb"), ("c", "24gb")]
    assert s.remove("b") is None  # assigned jobs are no longer queued
    # Removed then re-admitted with a lower priority: queued once, at its new place.
    s.admit(a)
    s.admit(job("x", seq=1))
    assert [j.id for j in s.queued("12gb")] == ["a", "x"]
    s.remove("a")
    a.priority = "low"
    s.admit(a)
    assert [j.id for j in s.queued("12gb")] == ["x", "a"]
    assert ids(s.assign({"12gb": 1})) == [("x", "12gb")]
    assert ids(s.assign({"12gb": 5})) == [("a", "12gb")]
    assert len(s) == 0 and s.assign({"12gb": 5}) == []


def test_many_removes_keep_order_and_counts():
    s = Scheduler(CLASSES, backlog_limit=None)
    for i in range(1000):
        s.admit(job(f"j{i}", seq=i))
    for i in range(0, 1000, 3):
        assert s.remove(f"j{i}") is not None
    left = [f"j{i}" for i in range(1000) if i % 3]
    assert [j.id for j in s.queued("12gb")] == left
    assert [j.id for j, _ in s.assign({"12gb": 1000})] == left


# ------------------------------------------------------------------------------- failures


def test_oom_retries_on_the_next_larger_class_then_fails_on_the_largest():
    s = Scheduler(CLASSES, max_attempts=10)
    j = job("a", 5)
    s.admit(j)
    ((popped, _),) = s.assign({"12gb": 1})
    for expected in ("24gb", "40gb", "80gb"):
        d = s.on_failure(popped, "oom", "CUDA out of memory")
        assert isinstance(d, Retry) and d.vram_class == expected == popped.home
        assert "out of memory" in d.reason
        s.requeue(popped)
        assert ids(s.assign({expected: 1})) == [("a", expected)]
    d = s.on_failure(popped, "oom", "CUDA out of memory")
    assert d == Fail("out_of_memory", d.message) and "80gb" in d.message
    assert popped.home == "80gb" and popped.attempts == 4


def test_oom_bounded_by_max_attempts():
    s = Scheduler(CLASSES, max_attempts=2)
    j = job("b", 5, home="12gb")
    d1 = s.on_failure(j, "oom")
    assert isinstance(d1, Retry) and d1.vram_class == "24gb" and j.attempts == 1
    d2 = s.on_failure(j, "oom")
    assert isinstance(d2, Fail) and d2.code == "out_of_memory" and "2 attempts" in d2.message
    assert j.home == "24gb" and j.attempts == 2


def test_oom_next_larger_in_a_subset():
    s = Scheduler(CLASSES.subset(["12gb", "80gb"]))
    j = job("a", home="12gb")
    assert s.on_failure(j, "oom").vram_class == "80gb"


def test_worker_died_retries_on_the_same_class_up_to_max_attempts():
    s = Scheduler(CLASSES, max_attempts=3)
    j = job("a", 20, home="24gb")
    for n in (1, 2):
        d = s.on_failure(j, "worker_died", "actor died")
        assert isinstance(d, Retry) and d.vram_class == "24gb" and j.attempts == n
    d = s.on_failure(j, "worker_died", "actor died")
    assert isinstance(d, Fail) and d.code == "worker_died"
    assert "3 times" in d.message and "actor died" in d.message
    assert j.home == "24gb" and j.attempts == 3


def test_error_fails_at_once():
    s = Scheduler(CLASSES, max_attempts=5)
    j = job("a", home="12gb")
    assert s.on_failure(j, "error", "NaN in latents") == Fail("generation_failed", "NaN in latents")
    assert j.attempts == 1 and j.home == "12gb"
    with pytest.raises(ValueError):
        s.on_failure(j, "meteor")


# ------------------------------------------------------------------------------- scale


def test_thousands_of_jobs_dispatch_fast():
    s = Scheduler(CLASSES, backlog_limit=None)
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        s.admit(job(f"j{i}", (1, 20, 30, 70)[i % 4], seq=i, priority=("low", "normal", "high")[i % 3]))
    for i in range(0, n, 7):
        s.remove(f"j{i}")
    got = 0
    while len(s):
        got += len(s.assign({"12gb": 1, "40gb": 1, "80gb": 1}))
    elapsed = time.perf_counter() - start
    assert got == n - len(range(0, n, 7))
    assert elapsed < 10.0, elapsed  # ~2 s; O(n^2) would take minutes


# ------------------------------------------------------------------------------- property


@st.composite
def class_sets(draw):
    base = list(CLASSES.classes)
    names = draw(st.lists(st.sampled_from([c.name for c in base]), min_size=1, max_size=4, unique=True))
    chosen = [c for c in base if c.name in names]
    out = []
    for c in chosen:
        larger = [o.name for o in chosen if o.memory_gib > c.memory_gib]
        spill_to = None
        if larger:
            spill_to = draw(st.none() | st.lists(st.sampled_from(larger), unique=True).map(tuple))
        out.append(c.model_copy(update={"spill_to": spill_to}))
    return ClassSet(out)


def ops(class_names):
    admit = st.tuples(
        st.just("admit"),
        st.sampled_from([1, 5, 11, 13, 20, 30, 50, 85]) | st.integers(0, 85),  # GiB; > largest sometimes
        st.sampled_from(list(PRIORITY_RANK)),
        st.integers(0, 5),  # seq (duplicates on purpose)
    )
    assign = st.tuples(
        st.just("assign"),
        st.dictionaries(st.sampled_from(class_names), st.integers(0, 3), max_size=len(class_names)),
    )
    remove = st.tuples(st.just("remove"), st.integers(0, 40))
    return st.lists(st.one_of(admit, admit, assign, remove), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spill=st.booleans(), limit=st.sampled_from([None, 2, 5]))
def test_no_job_lost_or_duplicated_and_spill_rules_hold(data, spill, limit):
    classes = data.draw(class_sets())
    names = list(classes.names)
    s = Scheduler(classes, backlog_limit=limit, spill=spill)
    mem = {c.name: c.memory_bytes for c in classes}
    key = {}  # id -> dispatch key
    queued: dict[str, QueuedJob] = {}
    done: set[str] = set()
    removed: set[str] = set()
    counter = 0
    for op in data.draw(ops(names)):
        if op[0] == "admit":
            _, gib, prio, seq = op
            jid = f"j{counter}"
            counter += 1
            j = QueuedJob(jid, gib * GiB, {n: float(gib + 1) for n in names}, priority=prio, seq=seq)
            before = s.backlog()
            if gib * GiB > mem[names[-1]]:
                with pytest.raises(NoClassFits):
                    s.admit(j)
                continue
            home = min((n for n in names if mem[n] >= gib * GiB), key=lambda n: mem[n])
            if limit is not None and before[home] >= limit:
                with pytest.raises(Backlogged) as info:
                    s.admit(j)
                assert info.value.retry_after >= 1 and info.value.vram_class == home
                assert s.backlog() == before
                continue
            s.admit(j)
            assert j.home == home
            queued[jid] = j
            key[jid] = (-PRIORITY_RANK[prio], seq, counter)
        elif op[0] == "remove":
            jid = f"j{op[1]}"
            got = s.remove(jid)
            if jid in queued:
                assert got is queued.pop(jid)
                removed.add(jid)
            else:
                assert got is None
        else:
            free = op[1]
            out = s.assign(free)
            seen = [j.id for j, _ in out]
            assert len(seen) == len(set(seen))
            per_class = {n: 0 for n in names}
            for j, cls in out:
                assert j.id in queued and j.id not in done and j.id not in removed
                assert mem[cls] >= mem[j.home]
                per_class[cls] += 1
            for n in names:
                assert per_class[n] <= free.get(n, 0)
            for j, cls in out:
                if cls != j.home:
                    assert spill and cls in classes.spill[j.home]
                    # Spilled only if its home class had no slot left in this call.
                    assert per_class[j.home] == free.get(j.home, 0)
            for j, _ in out:
                done.add(j.id)
                del queued[j.id]
            # Each home queue is served as a prefix of its dispatch order.
            for n in names:
                taken = [key[j.id] for j, _ in out if j.home == n]
                left = [key[i] for i, q in queued.items() if q.home == n]
                if taken and left:
                    assert max(taken) < min(left)
            # Work-conserving: an idle slot left means nothing it may run is still queued.
            for n in names:
                if per_class[n] < free.get(n, 0):
                    homes = {n} | ({h for h in names if n in classes.spill[h]} if spill else set())
                    assert not [i for i, q in queued.items() if q.home in homes]
        assert {j.id for j in s.queued()} == set(queued)
        assert len(s.queued()) == len(queued) == len(s)
        assert sum(s.backlog().values()) == len(queued)
    # Drain everything: every admitted job comes out exactly once.
    rest = s.assign({n: 1000 for n in names})
    assert sorted(j.id for j, _ in rest) == sorted(queued)
    assert len(s) == 0 and s.queued() == []


# ------------------------------------------------------------------------------- fair sharing


TWO = CLASSES.subset(["12gb", "24gb"])


def cjob(id: str, caller: str, seq: int, secs: float = 10.0, *, priority="normal", on24: float | None = None):
    """A 12gb-homed job of `caller` taking `secs` on 12gb (and `on24` on 24gb, default the same)."""
    return QueuedJob(id, GiB, {"12gb": secs, "24gb": secs if on24 is None else on24}, priority=priority,
                     seq=seq, caller=caller)


def drain(s: Scheduler, vram_class: str = "12gb") -> list[str]:
    """Pop every queued job one at a time (one idle slot per call), as a dispatcher would."""
    out = []
    while len(s):
        got = s.assign({vram_class: 1})
        assert len(got) == 1
        out.append(got[0][0].id)
    return out


def test_callers_take_turns_within_a_priority():
    s = Scheduler(TWO, backlog_limit=None)
    for i in range(6):
        s.admit(cjob(f"b{i}", "batch", seq=i))
    s.admit(cjob("alice", "alice", seq=6))
    for i in range(2):
        s.admit(cjob(f"bob{i}", "bob", seq=7 + i))
    # First come, first served would put alice 7th and bob 8th and 9th.
    want = ["alice", "bob0", "b0", "bob1", "b1", "b2", "b3", "b4", "b5"]
    assert [j.id for j in s.queued("12gb")] == want
    assert drain(s) == want


def test_one_caller_alone_and_fair_share_off_are_first_come_first_served():
    s = Scheduler(TWO, backlog_limit=None, fair_share=False)
    for i in range(5):
        s.admit(cjob(f"j{i}", ("a", "b")[i < 4], seq=i))
    assert drain(s) == ["j0", "j1", "j2", "j3", "j4"]
    s = Scheduler(TWO, backlog_limit=None)
    for i in (3, 1, 2, 0):
        s.admit(cjob(f"j{i}", "a", seq=i))
    assert drain(s) == ["j0", "j1", "j2", "j3"]  # oldest first within a caller


def test_gpu_seconds_not_job_counts_are_shared():
    s = Scheduler(TWO, backlog_limit=None)
    for i in range(4):
        s.admit(cjob(f"long{i}", "renders", seq=i, secs=30.0))
    for i in range(12):
        s.admit(cjob(f"short{i}", "previews", seq=10 + i, secs=3.0))
    order = drain(s)
    served = {"renders": 0.0, "previews": 0.0}
    for jid in order:
        served["renders" if jid.startswith("long") else "previews"] += 30.0 if jid.startswith("long") else 3.0
        if served["renders"] < 120 and served["previews"] < 36:  # both still backlogged
            # each caller is at most one job (30 s) ahead of the other in GPU-seconds
            assert abs(served["renders"] - served["previews"]) <= 30.0, (jid, served)
    assert order.index("short9") < order.index("long1")  # ten 3 s jobs for one 30 s job


def test_weights_split_gpu_seconds():
    s = Scheduler(TWO, backlog_limit=None, share_weights={"team": 2.0, "guest": 0.5})
    for i in range(20):
        s.admit(cjob(f"t{i}", "team", seq=3 * i))
        s.admit(cjob(f"u{i}", "user", seq=3 * i + 1))
        s.admit(cjob(f"g{i}", "guest", seq=3 * i + 2))
    first = drain(s)[:21]  # everyone still backlogged: GPU-seconds go 2 : 1 : 0.5
    counts = {p: sum(j.startswith(p) for j in first) for p in "tug"}
    assert counts == {"t": 12, "u": 6, "g": 3}, first


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_weights_are_refused(weight):
    with pytest.raises(ValueError, match="share_weights"):
        Scheduler(TWO, share_weights={"x": weight})


def test_priorities_order_before_fair_sharing():
    s = Scheduler(TWO, backlog_limit=None)
    for i in range(3):
        s.admit(cjob(f"n{i}", "batch", seq=i))
    s.admit(cjob("low", "alice", seq=3, priority="low"))
    s.admit(cjob("high", "batch", seq=4, priority="high"))
    s.admit(cjob("n-alice", "alice", seq=5))
    want = ["high", "n-alice", "n0", "n1", "n2", "low"]
    assert [j.id for j in s.queued("12gb")] == want and drain(s) == want


def test_queue_positions_are_the_order_jobs_leave_the_queue():
    """Whatever happens (admits, cancels, retries, pops, spills, both spill rules), `queued(c)` is
    exactly the order in which `assign` will hand out that class's jobs from then on."""
    import random

    for trial in range(150):
        rnd = random.Random(trial)
        s = Scheduler(TWO, backlog_limit=None, share_weights={"a": 2.0, "c": 0.5})
        n = 0
        for _ in range(50):
            op = rnd.random()
            if op < 0.55:
                secs = rnd.choice([0.05, 0.3, 1.0, 2.5, 0.0013, 40.0])
                s.admit(cjob(f"j{n}", rnd.choice("abcd"), seq=n, secs=secs, on24=secs / 6,
                             priority=rnd.choice(["low", "normal", "normal", "high"])))
                n += 1
            elif op < 0.7 and len(s):
                s.remove(rnd.choice(s.queued()).id)
            elif op < 0.75 and len(s):  # a retry: back in with its old seq
                j = s.remove(rnd.choice(s.queued()).id)
                s.requeue(j)
            else:
                want = [j.id for j in s.queued("12gb")]
                k = rnd.randint(0, 3)
                if rnd.random() < 0.5:
                    got = [j.id for j, _ in s.assign({"12gb": k})]
                else:  # no 12gb slot: the 24gb class takes them (idle rule)
                    got = [j.id for j, _ in s.assign({"24gb": k})]
                assert got == want[:k], (trial, got, want)
        want = [j.id for j in s.queued("12gb")]
        assert drain(s) == want, trial


def test_restart_recovery_gives_the_same_order():
    def jobs():
        return [cjob(f"j{i}", "abc"[i % 7 % 3], seq=i, secs=1.0 + i % 4) for i in range(15)]

    s = Scheduler(TWO, backlog_limit=None)
    for j in jobs():
        s.admit(j)
    before = [j.id for j in s.queued("12gb")]
    recovered = Scheduler(TWO, backlog_limit=None)
    for j in jobs():  # the manager requeues in submission order, with each job's owner
        recovered.requeue(j)
    assert [j.id for j in recovered.queued("12gb")] == before
    assert drain(recovered) == before
    assert before != [f"j{i}" for i in range(15)]  # not first come, first served


def test_fair_dispatch_stays_fast_with_many_callers():
    s = Scheduler(TWO, backlog_limit=None)
    n = 6000
    start = time.perf_counter()
    for i in range(n):
        s.admit(cjob(f"j{i}", f"c{i % 50}", seq=i, secs=1.0 + i % 7))
    assert len(s.queued("12gb")) == n
    got = 0
    while len(s):
        got += len(s.assign({"12gb": 3}))
    assert got == n
    assert time.perf_counter() - start < 10.0


# ------------------------------------------------------------------------------- earliest finish


def test_without_busy_assign_keeps_the_idle_rule():
    s = Scheduler(TWO)
    s.admit(cjob("a", "x", seq=0, secs=5.0, on24=0.8))
    assert ids(s.assign({"12gb": 1, "24gb": 1})) == [("a", "12gb")]  # its home has room


def test_earliest_finish_waits_for_a_faster_busy_class():
    s = Scheduler(TWO)
    for i in range(2):
        s.admit(cjob(f"a{i}", "x", seq=i, secs=5.0, on24=0.8))
    # 24gb frees in 1 s: a0 done at 1.8, a1 at 2.6 there; both sooner than 5 s on the idle 12gb GPU
    assert s.assign({"12gb": 1}, busy={"24gb": [1.0]}) == []
    assert [j.id for j in s.queued("12gb")] == ["a0", "a1"]
    # 24gb busy for 10 s more: the 12gb GPU finishes a0 first
    assert ids(s.assign({"12gb": 1}, busy={"24gb": [10.0]})) == [("a0", "12gb")]
    # the 24gb GPU is free now: it takes a1 (0.8 s) although the 12gb one is free too
    assert ids(s.assign({"12gb": 1, "24gb": 1}, busy={})) == [("a1", "24gb")]


def test_earliest_finish_counts_the_larger_class_own_queue_first():
    s = Scheduler(TWO)
    s.admit(QueuedJob("big", 20 * GiB, {"12gb": 99.0, "24gb": 4.0}, seq=0))
    s.admit(cjob("small", "x", seq=1, secs=3.0, on24=0.5))
    # both GPUs idle: big takes 24gb; small would finish there at 4.5 s, on 12gb at 3 s
    assert ids(s.assign({"12gb": 1, "24gb": 1}, busy={})) == [("big", "24gb"), ("small", "12gb")]
    s.admit(cjob("small2", "x", seq=2, secs=3.0, on24=0.5))
    s.admit(QueuedJob("big2", 20 * GiB, {"12gb": 99.0, "24gb": 2.0}, seq=3))
    # 24gb frees in 0.2 s, but big2 is planned there first (done at 2.2): small2 finishes at 2.7
    # there, at 3 s on the 12gb GPU free in 0; so it waits
    assert s.assign({"12gb": 1}, busy={"24gb": [0.2]}) == []
    # one second more of big2 work on 24gb: now the 12gb GPU is sooner
    s.remove("big2")
    s.admit(QueuedJob("big3", 20 * GiB, {"12gb": 99.0, "24gb": 3.0}, seq=4))
    assert ids(s.assign({"12gb": 1}, busy={"24gb": [0.2]})) == [("small2", "12gb")]


def test_earliest_finish_ties_go_to_the_smaller_class_and_never_down():
    s = Scheduler(TWO)
    s.admit(cjob("tie", "x", seq=0, secs=2.0, on24=2.0))
    assert ids(s.assign({"12gb": 1, "24gb": 1}, busy={})) == [("tie", "12gb")]
    s.admit(QueuedJob("big", 20 * GiB, {"12gb": 1.0, "24gb": 50.0}, seq=1))
    assert s.assign({"12gb": 1}, busy={"24gb": []}) == []  # never down, however fast 12gb would be
    assert ids(s.assign({"24gb": 1}, busy={"12gb": [5.0]})) == [("big", "24gb")]


def test_earliest_finish_respects_spill_to_and_spill_off():
    only12 = ClassSet([c.model_copy(update={"spill_to": ()}) if c.name == "12gb" else c for c in TWO.classes])
    for s in (Scheduler(only12), Scheduler(TWO, spill=False)):
        s.admit(cjob("a", "x", seq=0, secs=5.0, on24=0.1))
        assert s.assign({"24gb": 1}, busy={"12gb": [3.0]}) == []
        assert ids(s.assign({"12gb": 1, "24gb": 1}, busy={})) == [("a", "12gb")]


def test_busy_is_checked():
    s = Scheduler(TWO)
    with pytest.raises(ValueError, match="unknown VRAM class"):
        s.assign({"12gb": 1}, busy={"13gb": [1.0]})
    with pytest.raises(ValueError, match="busy seconds"):
        s.assign({"12gb": 1}, busy={"24gb": [float("nan")]})
    s.admit(cjob("a", "x", seq=0, secs=5.0, on24=0.8))
    assert ids(s.assign({"12gb": 1}, busy={"24gb": [-3.0]})) == []  # overdue: about to finish


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_earliest_finish_loses_no_job_and_never_sends_one_down(data):
    classes = data.draw(class_sets())
    names = list(classes.names)
    mem = {c.name: c.memory_bytes for c in classes}
    s = Scheduler(classes, backlog_limit=None)
    queued: dict[str, QueuedJob] = {}
    for i in range(data.draw(st.integers(0, 25))):
        gib = data.draw(st.sampled_from([1, 11, 13, 30, 50]).filter(lambda g: g * GiB <= mem[names[-1]]))
        secs = {n: data.draw(st.floats(0.1, 20)) for n in names}
        j = QueuedJob(f"j{i}", gib * GiB, secs, seq=i, caller=data.draw(st.sampled_from("ab")))
        s.admit(j)
        queued[j.id] = j
    for _ in range(6):
        free = data.draw(st.dictionaries(st.sampled_from(names), st.integers(0, 2)))
        busy = data.draw(st.dictionaries(st.sampled_from(names), st.lists(st.floats(0, 30), max_size=3)))
        out = s.assign(free, busy=busy)
        per_class = {n: 0 for n in names}
        for j, c in out:
            assert queued.pop(j.id) is j
            assert c == j.home or c in classes.spill[j.home]  # never down, only where it may spill
            per_class[c] += 1
        assert all(per_class[n] <= free.get(n, 0) for n in names)
        assert sorted(j.id for j in s.queued()) == sorted(queued)
    # every job left runs once every class has a free slot and nothing runs
    rest = s.assign({n: 1000 for n in names}, busy={})
    assert sorted(j.id for j, _ in rest) == sorted(queued) and len(s) == 0


# ------------------------------------------------------------------------------- earliest finish: the whole plan


def full_plan(s: Scheduler, free, busy) -> list[tuple[str, str]]:
    """What `assign(free, busy=busy)` must answer, by the definition: every queued job planned
    (homes largest first, each queue in `queued()` order) onto the slot where it ends first; the
    jobs planned onto idle slots start. The scheduler computes only part of this plan."""
    names = s.classes.names
    free_at = {}
    for c in names:
        heap = [(0.0, 0)] * free.get(c, 0) + [(max(0.0, t), 1) for t in busy.get(c, [])]
        heapq.heapify(heap)
        free_at[c] = heap
    idle, out = sum(free.values()), []
    for home in reversed(names):
        targets = [c for c in (home, *s.classes.spill[home]) if free_at[c]]
        for j in s.queued(home) if targets else []:
            if not idle:
                return out
            ends = [(free_at[c][0][0] + j.seconds.get(c, max(j.seconds.values())), c) for c in targets]
            end, c = min(ends, key=lambda e: e[0])  # the first (smallest class) of equal ends
            if not free_at[c][0][1]:
                idle -= 1
                out.append((j.id, c))
            heapq.heapreplace(free_at[c], (end, 1))
    return out


def plan_matches_the_whole_plan(s: Scheduler, rng, names, rounds: int, arrivals: int, slots: int, busy_n: int):
    seq = len(s) + 1000
    for _ in range(rounds):
        for _ in range(rng.randrange(arrivals + 1)):
            seq += 1
            home = rng.choice(names)
            secs = {c: rng.choice([1.0, 2.0, 4.0, round(rng.uniform(0.5, 30.0), 1)]) for c in names}  # ties too
            s.requeue(QueuedJob(f"j{seq}", 1, secs, priority=rng.choice(["low", "normal", "normal", "high"]),
                                seq=seq, home=home, caller=rng.choice("abcd")))
        if rng.random() < 0.2 and len(s):
            s.remove(rng.choice(s.queued()).id)
        free = {c: rng.randrange(slots + 1) for c in names if rng.random() < 0.7}
        busy = {c: [rng.choice([0.0, 1.0, 2.0, round(rng.uniform(-1.0, 40.0), 1)]) for _ in range(rng.randrange(busy_n + 1))]
                for c in names}
        want = full_plan(s, free, busy)
        assert ids(s.assign(free, busy=busy)) == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_earliest_finish_answers_what_the_whole_plan_answers(data, seed):
    """Small queues, few slots, any spill settings: the partial plan starts exactly the jobs the
    whole plan starts, on the same classes, in the same order."""
    classes = data.draw(class_sets())
    s = Scheduler(classes, backlog_limit=None, fair_share=data.draw(st.booleans()))
    plan_matches_the_whole_plan(s, random.Random(seed), list(classes.names), rounds=12, arrivals=8, slots=2,
                                busy_n=3)


@pytest.mark.parametrize("seed", range(3))
def test_earliest_finish_matches_the_whole_plan_under_a_deep_backlog(seed):
    """Thousands queued and hundreds of busy slots, where most of a queue is pending (its
    classes have no idle slot) and smaller classes' jobs weigh idle slots against them."""
    rng = random.Random(seed)
    s = Scheduler(default_classes(), backlog_limit=None)
    names = list(s.classes.names)
    plan_matches_the_whole_plan(s, rng, names, rounds=1, arrivals=3000, slots=0, busy_n=0)
    plan_matches_the_whole_plan(s, rng, names, rounds=40, arrivals=30, slots=6, busy_n=150)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), weighted=st.booleans())
def test_the_kept_queue_order_is_the_order_computed_afresh(seed, weighted):
    """Each level keeps its fair-share order between changes (inserting newer jobs, marking
    started or canceled ones); after any mix of admissions, retries, cancels, idle-rule pops and
    earliest-finish starts it equals the order computed from scratch, and `queued()` lists the
    jobs in the order they then leave."""
    rng = random.Random(seed)
    s = Scheduler(TWO, backlog_limit=None, share_weights={"a": 2.0} if weighted else None)
    seq = 0
    for _ in range(150):
        op = rng.random()
        if op < 0.5 or not len(s):
            seq += 1
            old = rng.random() < 0.1 and seq > 5  # a retry keeps its age
            s.requeue(QueuedJob(f"j{seq}", rng.choice([1, 20]) * GiB, {"12gb": rng.choice([1.0, 3.0, 7.5]),
                                "24gb": rng.choice([0.5, 2.0])}, priority=rng.choice(["normal", "normal", "low"]),
                                seq=seq - 5 if old else seq, caller=rng.choice("abcde")))
        elif op < 0.6:
            s.remove(rng.choice(s.queued()).id)
        elif op < 0.8:
            s.assign({"12gb": rng.randrange(2), "24gb": rng.randrange(2)})
        else:
            s.assign({"12gb": rng.randrange(2), "24gb": rng.randrange(2)},
                     busy={"12gb": [rng.uniform(0, 9)], "24gb": [rng.uniform(0, 9)]})
        for q in s._queues.values():
            for level in q.levels.values():
                kept = level.order()
                level.keyed = None
                assert kept == level.order()
    for name in TWO.names:
        want = [j.id for j in s.queued(name)]
        assert [s.position(jid) for jid in want] == list(range(1, len(want) + 1))
        assert [s._pop(name).id for _ in want] == want
    assert s.position("j1") is None
