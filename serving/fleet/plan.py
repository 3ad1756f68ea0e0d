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

import itertools
import math
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
) -> dict[str, Any]:
    """Search fleets of the priced classes for `trace`; return the cheapest feasible one, two
    alternatives and every simulation tried (`tried`)."""
    started = time.perf_counter()
    if not prices:
        raise InvalidRequest("plan needs --prices (CLASS=PRICE per GPU-hour for each class it may use)",
                             field="prices")
    if not (target_p95 > 0 and math.isfinite(target_p95)):
        raise InvalidRequest(f"--target-p95 must be a positive number of seconds, got {target_p95!r}",
                             field="target_p95")
    config = config or SimConfig()
    known = class_set or default_classes()
    priced = [c for c in known.names if c in prices]
    n_interactive = sum(1 for k in trace.kind if k == "interactive")
    if not n_interactive:
        raise InvalidRequest("the trace has no interactive jobs to plan a p95 wait for", field="trace")
    max_late = int(0.05 * n_interactive)
    cache: dict[tuple, dict[str, Any]] = {}
    tried: list[dict[str, Any]] = []

    def cost(fleet: Mapping[str, int]) -> float:
        return sum(n * prices[c] for c, n in fleet.items())

    def run(fleet: dict[str, int]) -> dict[str, Any]:
        key = tuple(sorted(fleet.items()))
        if key not in cache:
            rep = simulate(trace, fleet, config=config, class_set=known, prices=prices,
                           late_wait_s=target_p95, max_late=max_late)
            p95 = rep["by_kind"]["interactive"]["wait_s"]["p95"]
            ok = (not rep["aborted"] and p95 is not None and p95 <= target_p95 and rep["jobs"]["rejected"] == 0
                  and rep["jobs"]["failed"] == 0)
            cache[key] = {"fleet": dict(fleet), "cost_per_hour": round(cost(fleet), 2),
                          "p95_wait_s": None if rep["aborted"] else p95, "feasible": ok, "report": rep}
            tried.append({k: v for k, v in cache[key].items() if k != "report"} | {"wall_s": rep["wall_s"]})
            if log:
                log(f"  {_fleet_text(fleet):<40} ${cost(fleet):>9,.2f}/h  interactive p95 wait "
                    f"{'>' + format(target_p95, 'g') if rep['aborted'] else p95} s  "
                    f"{'ok' if ok else 'misses'}  ({rep['wall_s']:.1f} s)")
        return cache[key]

    # 1) mixes, ranked without simulating
    candidates = []
    for r in range(1, len(priced) + 1):
        for subset in itertools.combinations(priced, r):
            peak = _peak_work(trace, known.subset(subset), config)
            if peak is None or not all(peak.get(c, 0) > 0 for c in subset):
                continue
            candidates.append((cost(_fleet_at(peak, START_U)), subset, peak))
    if not candidates:
        raise InvalidRequest("no mix of the priced classes holds every job of the trace", field="prices")
    candidates.sort(key=lambda x: x[0])

    # 2) coarse: per mix, the largest utilisation target that still meets the p95 target
    answers = []
    for _, subset, peak in candidates[:mixes]:
        if log:
            log(f"mix {'+'.join(subset)}")
        lo, hi = None, None  # lo: feasible u, hi: infeasible u
        u = START_U
        for _ in range(12):
            got = run(_fleet_at(peak, u))
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
            continue
        if hi is not None:
            for _ in range(2):
                mid = math.sqrt(lo * hi)
                if _fleet_at(peak, mid) in (_fleet_at(peak, lo), _fleet_at(peak, hi)):
                    break
                if run(_fleet_at(peak, mid))["feasible"]:
                    lo = mid
                else:
                    hi = mid
        answers.append(cache[tuple(sorted(_fleet_at(peak, lo).items()))])
    if not answers:
        raise InvalidRequest(f"no fleet tried meets an interactive p95 wait of {target_p95:g} s", field="target_p95")
    answers.sort(key=lambda a: a["cost_per_hour"])

    # 3) fine: trim the cheapest, class by class
    best = answers[0]
    if refine:
        if log:
            log("trim")
        improved = True
        while improved:
            improved = False
            for c in sorted(best["fleet"], key=lambda c: -best["fleet"][c] * prices[c]):
                n = best["fleet"][c]
                cut = max(1, n // 10)
                smaller = {**best["fleet"], c: n - cut}
                if smaller[c] == 0:
                    del smaller[c]
                if not smaller:
                    continue
                got = run(smaller)
                if got["feasible"]:
                    best, improved = got, True
    alternatives = [a for a in answers if a is not best][:2]
    if len(alternatives) < 2:  # fewer mixes searched: the nearest feasible fleets tried
        others = sorted((cache[k] for k in cache if cache[k]["feasible"] and cache[k] is not best
                         and cache[k] not in alternatives), key=lambda a: a["cost_per_hour"])
        alternatives += others[: 2 - len(alternatives)]

    def view(a: dict[str, Any]) -> dict[str, Any]:
        rep = a["report"]
        return {"fleet": a["fleet"], "cost_per_hour": a["cost_per_hour"], "p95_wait_s": a["p95_wait_s"],
                "utilization": {c: v["utilization"] for c, v in rep["classes"].items()},
                "wait_s": rep["by_kind"]["interactive"]["wait_s"], "jobs_per_hour": rep["jobs_per_hour"]}

    return {
        "trace": trace.name,
        "target_p95_s": target_p95,
        "prices": {c: prices[c] for c in priced},
        **view(best),
        "alternatives": [view(a) for a in alternatives],
        "simulations": len(tried),
        "tried": tried,
        "wall_s": round(time.perf_counter() - started, 3),
    }


def _fleet_text(fleet: Mapping[str, int]) -> str:
    return ",".join(f"{c}:{n}" for c, n in fleet.items())
