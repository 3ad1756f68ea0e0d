"""Capacity planning: the cheapest fleet whose simulated interactive p95 queue wait meets a target.

The search (docs/fleet.md):

1. **Mixes.** Every subset of the priced classes is a candidate mix. A mix sizes each class for
   the work whose home it is (the smallest class of the mix that holds the job's estimate): at a
   utilisation target `u`, class c gets `ceil(peak-hour GPU-seconds homed on c / 3600 / u)`
   GPUs. Mixes that cannot hold the largest job are dropped; the rest are ranked by their cost at
   `u = 0.85` (no simulation), and the `mixes` cheapest are searched. A mix whose largest class
   is smaller than some job's true peak VRAM (estimate x `vram_factor`) is dropped too.
2. **Coarse.** For each of those mixes, `u` moves by a factor 1.3 from 0.85 until the simulated
   fleet flips between meeting and missing the target, then bisects twice: the fleet at the
   largest feasible `u` is the mix's answer. Fleets that are too small stop early (the simulation
   ends once more than 5% of interactive jobs waited longer than the target).
3. **Fine.** The cheapest answer is trimmed greedily: each class in turn loses 10% of its GPUs
   while the target is still met.

Feasible: interactive p95 wait <= target, no job refused (no class holds it) and none failed
(out of memory on the largest class of the fleet).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import multiprocessing
import queue
import time
from collections.abc import Mapping
from typing import Any, Callable

from cluster.vram_classes import ClassSet, default_classes
from pipeline.errors import InvalidRequest
from serving.scheduler import estimate_request

from .sim import SimConfig, simulate
from .traces import Trace, request_params

START_U = 0.85
STEP = 1.3


def _peak_work(trace: Trace, classes: ClassSet, config: SimConfig) -> dict[str, float] | None:
    """Per class of `classes`: GPU-seconds of the busiest hour of the work homed there (None:
    some job fits no class)."""
    homes: list[tuple[str, float]] = []
    for spec in trace.specs:
        params = request_params(spec)
        _, _, vram, seconds = estimate_request(classes, params, spec.get("image_width", 512),
                                               spec.get("image_height", 512), dtype=config.dtype,
                                               cpu_offload=config.cpu_offload,
                                               decode_chunk_size=config.decode_chunk_size)
        home = next((c.name for c in classes if c.memory_bytes >= vram), None)
        homes.append((home, seconds[home] * config.time_scale if home else math.nan, vram))
    largest = classes.classes[-1].memory_bytes
    hours = max(1, math.ceil(trace.duration / 3600.0 + 1e-9))
    work = {c: [0.0] * hours for c in classes.names}
    for t, s, factor in zip(trace.t, trace.spec, trace.vram_factor):
        home, secs, vram = homes[s]
        if home is None or vram * factor > largest:  # refused, or out of memory on the largest class
            return None
        work[home][min(hours - 1, int(t // 3600))] += secs
    span = min(3600.0, max(trace.duration, 1.0))
    return {c: max(w) * 3600.0 / span for c, w in work.items()}


def _fleet_at(peak: Mapping[str, float], u: float) -> dict[str, int]:
    return {c: max(1, math.ceil(w / 3600.0 / u)) for c, w in peak.items() if w > 0} or {}


def plan(
    trace: Trace,
    prices: Mapping[str, float],
    target_p95: float,
    *,
    config: SimConfig | None = None,
    class_set: ClassSet | None = None,
    mixes: int = 3,
    refine: bool = True,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Search fleets of the priced classes for `trace`; return the cheapest feasible one, two
    alternatives and every simulation tried (`tried`). `workers` > 1: the mixes' coarse searches
    run in that many processes at once (the answer is the same)."""
    started = time.perf_counter()
    if not prices:
        raise InvalidRequest("plan needs --prices (CLASS=PRICE per GPU-hour for each class it may use)",
                             field="prices")
    if not (target_p95 > 0 and math.isfinite(target_p95)):
        raise InvalidRequest(f"--target-p95 must be a positive number of seconds, got {target_p95!r}",
                             field="target_p95")
    if not any(k == "interactive" for k in trace.kind):
        raise InvalidRequest("the trace has no interactive jobs to plan a p95 wait for", field="trace")
    search = _Search(trace, prices, target_p95, config or SimConfig(), class_set or default_classes(), log)
    answers = [a for a in search.coarse_all(search.mixes()[:mixes], workers) if a]
    if not answers:
        raise InvalidRequest(f"no fleet tried meets an interactive p95 wait of {target_p95:g} s", field="target_p95")
    answers.sort(key=lambda a: a["cost_per_hour"])
    best = search.trim(answers[0]) if refine else answers[0]
    return {
        "trace": trace.name,
        "target_p95_s": target_p95,
        "prices": {c: prices[c] for c in search.priced},
        **_view(best),
        "alternatives": [_view(a) for a in search.alternatives(best, answers)],
        "simulations": len(search.tried),
        "tried": search.tried,
        "wall_s": round(time.perf_counter() - started, 3),
    }


class _Search:
    """The planner's state: the simulations run so far (each fleet once) and the three steps."""

    def __init__(self, trace: Trace, prices: Mapping[str, float], target_p95: float, config: SimConfig,
                 known: ClassSet, log: Callable[[str], None] | None):
        self.trace, self.prices, self.target_p95, self.config, self.known = trace, prices, target_p95, config, known
        self.log = log or (lambda _msg: None)
        self.priced = [c for c in known.names if c in prices]
        self.max_late = int(0.05 * sum(1 for k in trace.kind if k == "interactive"))
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.tried: list[dict[str, Any]] = []

    def cost(self, fleet: Mapping[str, int]) -> float:
        return sum(n * self.prices[c] for c, n in fleet.items())

    def run(self, fleet: dict[str, int]) -> dict[str, Any]:
        """Simulate `fleet` once (later calls answer from the cache) and judge it."""
        key = tuple(sorted(fleet.items()))
        if key in self.cache:
            return self.cache[key]
        target = self.target_p95
        rep = simulate(self.trace, fleet, config=self.config, class_set=self.known, prices=self.prices,
                       late_wait_s=target, max_late=self.max_late)
        p95 = rep["by_kind"]["interactive"]["wait_s"]["p95"]
        ok = (not rep["aborted"] and p95 is not None and p95 <= target and rep["jobs"]["rejected"] == 0
              and rep["jobs"]["failed"] == 0)
        got = self.cache[key] = {"fleet": dict(fleet), "cost_per_hour": round(self.cost(fleet), 2),
                                 "p95_wait_s": None if rep["aborted"] else p95, "feasible": ok, "report": rep}
        self.tried.append({k: v for k, v in got.items() if k != "report"} | {"wall_s": rep["wall_s"]})
        self.log(f"  {_fleet_text(fleet):<40} ${self.cost(fleet):>9,.2f}/h  interactive p95 wait "
                 f"{'>' + format(target, 'g') if rep['aborted'] else p95} s  "
                 f"{'ok' if ok else 'misses'}  ({rep['wall_s']:.1f} s)")
        return got

    def mixes(self) -> list[tuple[float, tuple[str, ...], dict[str, float]]]:
        """Step 1: every subset of the priced classes that holds every job, cheapest first (sized at
        `START_U`, no simulation): (cost, classes, peak-hour GPU-seconds per class)."""
        candidates = []
        for r in range(1, len(self.priced) + 1):
            for subset in itertools.combinations(self.priced, r):
                peak = _peak_work(self.trace, self.known.subset(subset), self.config)
                if peak is None or not all(peak.get(c, 0) > 0 for c in subset):
                    continue
                candidates.append((self.cost(_fleet_at(peak, START_U)), subset, peak))
        if not candidates:
            raise InvalidRequest("no mix of the priced classes holds every job of the trace", field="prices")
        return sorted(candidates, key=lambda x: x[0])

    def coarse_all(self, candidates: list[tuple[float, tuple[str, ...], dict[str, float]]],
                   workers: int) -> list[dict[str, Any] | None]:
        """Step 2 for each mix, in this process or in `workers` processes (spawned: a fresh
        interpreter each, safe beside Ray's threads); their simulations join this search's."""
        if workers <= 1 or len(candidates) <= 1:
            return [self.coarse(subset, peak) for _, subset, peak in candidates]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as mp, concurrent.futures.ProcessPoolExecutor(
                min(workers, len(candidates)), mp_context=ctx) as pool:
            lines = mp.Queue()  # each simulation's log line, as it ends, from every process
            futures = [pool.submit(_coarse_alone, (self.trace, self.prices, self.target_p95, self.config,
                                                   self.known, subset, peak, lines))
                       for _, subset, peak in candidates]
            while not all(f.done() for f in futures) or not lines.empty():
                try:
                    self.log(lines.get(timeout=0.2))
                except queue.Empty:
                    pass
            results = [f.result() for f in futures]
        answers = []
        for key, cache, tried in results:  # in mix order, as the sequential search keeps them
            for (k, entry), row in zip(cache.items(), tried):  # `run` adds both together, in order
                if k not in self.cache:
                    self.cache[k] = entry
                    self.tried.append(row)
            answers.append(None if key is None else self.cache[key])
        return answers

    def coarse(self, subset: tuple[str, ...], peak: Mapping[str, float]) -> dict[str, Any] | None:
        """Step 2: the mix's fleet at the largest utilisation target that still meets the p95
        target (None: none tried does)."""
        self.log(f"mix {'+'.join(subset)}")
        lo, hi = None, None  # lo: feasible u, hi: infeasible u
        u = START_U
        for _ in range(12):
            got = self.run(_fleet_at(peak, u))
            if got["report"]["jobs"]["failed"] or got["report"]["jobs"]["rejected"]:
                break  # more GPUs of these classes will not help
            if got["feasible"]:
                lo = u
                if hi is not None:
                    break
                u *= STEP
            else:
                hi = u
                if lo is not None:
                    break
                u /= STEP
            if u < 0.02 or u > 20:
                break
        if lo is None:
            return None
        for _ in range(2 if hi is not None else 0):
            mid = math.sqrt(lo * hi)
            if _fleet_at(peak, mid) in (_fleet_at(peak, lo), _fleet_at(peak, hi)):
                break
            if self.run(_fleet_at(peak, mid))["feasible"]:
                lo = mid
            else:
                hi = mid
        return self.cache[tuple(sorted(_fleet_at(peak, lo).items()))]

    def trim(self, best: dict[str, Any]) -> dict[str, Any]:
        """Step 3: each class of `best` in turn loses 10% of its GPUs while the target is met."""
        self.log("trim")
        improved = True
        while improved:
            improved = False
            for c in sorted(best["fleet"], key=lambda c: -best["fleet"][c] * self.prices[c]):
                n = best["fleet"][c]
                smaller = {**best["fleet"], c: n - max(1, n // 10)}
                if smaller[c] == 0:
                    del smaller[c]
                if not smaller:
                    continue
                got = self.run(smaller)
                if got["feasible"]:
                    best, improved = got, True
        return best

    def alternatives(self, best: dict[str, Any], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The next two mixes' answers; with fewer mixes searched, the nearest feasible fleets tried."""
        alternatives = [a for a in answers if a is not best][:2]
        if len(alternatives) < 2:
            others = sorted((a for a in self.cache.values() if a["feasible"] and a is not best
                             and a not in alternatives), key=lambda a: a["cost_per_hour"])
            alternatives += others[: 2 - len(alternatives)]
        return alternatives


def _coarse_alone(args: tuple) -> tuple[tuple | None, dict[tuple, dict[str, Any]], list[dict[str, Any]]]:
    """One mix's coarse search in a worker process: (its answer's key, the simulations); its log
    lines go to the `lines` queue, marked with the mix."""
    trace, prices, target_p95, config, known, subset, peak, lines = args
    mix = "+".join(subset)
    search = _Search(trace, prices, target_p95, config, known,
                     lambda line: lines.put(line if line.startswith("mix ") else f"{line}  [{mix}]"))
    got = search.coarse(subset, peak)
    key = None if got is None else tuple(sorted(got["fleet"].items()))
    return key, search.cache, search.tried


def _view(a: dict[str, Any]) -> dict[str, Any]:
    rep = a["report"]
    return {"fleet": a["fleet"], "cost_per_hour": a["cost_per_hour"], "p95_wait_s": a["p95_wait_s"],
            "utilization": {c: v["utilization"] for c, v in rep["classes"].items()},
            "wait_s": rep["by_kind"]["interactive"]["wait_s"], "jobs_per_hour": rep["jobs_per_hour"]}


def _fleet_text(fleet: Mapping[str, int]) -> str:
    return ",".join(f"{c}:{n}" for c, n in fleet.items())
