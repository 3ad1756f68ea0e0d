"""Plain-text tables of a simulation report and of a plan (the `--json` files hold everything)."""

from __future__ import annotations

from typing import Any


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pcts(stats: dict[str, Any]) -> str:
    return " / ".join(_s(stats.get(k)) for k in ("p50", "p95", "p99"))


def simulation_table(rep: dict[str, Any]) -> str:
    jobs = rep["jobs"]
    lines = [
        f"trace {rep['trace']}: {jobs['submitted']:,} jobs from {rep['callers']} callers over "
        f"{rep['trace_hours']:g} h; succeeded {jobs['succeeded']:,}, failed {jobs['failed']:,}, "
        f"refused (no class fits) {jobs['rejected']:,}; makespan {rep['makespan_s'] / 3600:.2f} h; "
        f"{rep['jobs_per_hour']:,.0f} jobs/h; OOM retries {rep['oom_retries']:,}",
        "",
        f"{'class':<8}{'gpus':>7}{'util':>8}{'jobs run':>11}{'spilled in':>12}{'spilled out':>13}{'oom':>7}",
    ]
    for name, c in rep["classes"].items():
        lines.append(f"{name:<8}{c['gpus']:>7,}{c['utilization'] * 100:>7.1f}%{c['jobs_run']:>11,}"
                     f"{c['spilled_in']:>12,}{c['spilled_out']:>13,}{c['oom']:>7,}")
    lines += ["", f"{'':<14}{'jobs':>9}   {'wait s p50 / p95 / p99':<28}{'latency s p50 / p95 / p99'}"]
    lines.append(f"{'all':<14}{jobs['succeeded']:>9,}   {_pcts(rep['wait_s']):<28}{_pcts(rep['latency_s'])}")
    for label, group in [*(("priority " + k, v) for k, v in rep["by_priority"].items()),
                         *((k, v) for k, v in rep["by_kind"].items())]:
        lines.append(f"{label:<14}{group['succeeded']:>9,}   {_pcts(group['wait_s']):<28}{_pcts(group['latency_s'])}")
    if "cost" in rep:
        cost = rep["cost"]
        per_k = "-" if cost["per_1000_jobs"] is None else f"${cost['per_1000_jobs']:,.2f}"
        lines += ["", f"cost: ${cost['per_hour']:,.2f}/h, ${cost['total']:,.2f} in all, {per_k} per 1,000 jobs"]
    if rep.get("aborted"):
        lines += ["", "stopped early: too many interactive jobs waited longer than the limit"]
    lines += ["", f"simulated in {rep['wall_s']:.1f} s"]
    return "\n".join(lines)


def plan_table(result: dict[str, Any]) -> str:
    rows = [("cheapest", result), *((f"alternative {i}", a) for i, a in enumerate(result["alternatives"], 1))]
    lines = [f"trace {result['trace']}: target interactive p95 wait {result['target_p95_s']:g} s "
             f"({result['simulations']} simulations, {result['wall_s']:.0f} s)", ""]
    for label, a in rows:
        fleet = ", ".join(f"{c}: {n:,}" for c, n in a["fleet"].items())
        util = ", ".join(f"{c} {u * 100:.0f}%" for c, u in a["utilization"].items())
        lines.append(f"{label:<15} ${a['cost_per_hour']:>10,.2f}/h  p95 wait {_s(a['p95_wait_s'])} s  "
                     f"[{fleet}]  utilisation {util}")
    return "\n".join(lines)
