"""`i2v-farm simulate` and `i2v-farm plan`: the fleet simulator and the capacity planner.

    i2v-farm simulate --fleet 12gb:300,24gb:500,80gb:200 --trace day [--hours 24] [--seed N]
                      [--json FILE] [--prices 12gb=0.25,...]
    i2v-farm plan --trace day --target-p95 120 --prices 12gb=0.25,24gb=0.60,40gb=1.10,80gb=2.50
                  [--hours H] [--mixes 3] [--workers N] [--json FILE]

Both follow the farm's settings (`I2V_*`, `I2V_CONFIG`): its VRAM classes, `max_attempts`,
`spill`, fair sharing, dtype and memory options; job times are real GPU seconds from the cost
model. See docs/fleet.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import InvalidRequest

from . import traces
from .plan import plan
from .report import plan_table, simulation_table
from .sim import SimConfig, parse_fleet, parse_prices, simulate


def add_commands(subparsers) -> None:
    sim = subparsers.add_parser("simulate", help="simulate a fleet on a workload trace (virtual time)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--fleet", required=True, help="GPUs per class, e.g. 12gb:300,24gb:500,80gb:200")
    _trace_args(sim)
    sim.add_argument("--prices", help="$ per GPU-hour per class, e.g. 12gb=0.25,24gb=0.60 (adds the cost)")
    sim.add_argument("--json", metavar="FILE", help="write the full report as JSON here")
    sim.set_defaults(func=cmd_simulate)

    pl = subparsers.add_parser("plan", help="the cheapest fleet that meets an interactive p95 wait",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _trace_args(pl)
    pl.add_argument("--target-p95", type=float, required=True, metavar="SECONDS",
                    help="interactive jobs' p95 queue wait to meet")
    pl.add_argument("--prices", required=True, help="$ per GPU-hour of each class the fleet may use")
    pl.add_argument("--mixes", type=int, default=3, help="class mixes to search (cheapest first; default 3)")
    pl.add_argument("--workers", type=int, default=None, metavar="N",
                    help="processes that search mixes at once (default: one per mix, at most the CPU count)")
    pl.add_argument("--json", metavar="FILE", help="write the plan as JSON here")
    pl.set_defaults(func=cmd_plan)


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="day | burst | steady | FILE.jsonl")
    p.add_argument("--hours", type=float, help="trace length (day: the busiest H hours; a file: its first H hours)")
    p.add_argument("--seed", type=int, default=0, help="random seed of a built-in trace (default 0)")


def _settings_config() -> tuple[Any, SimConfig]:
    from serving.config import load_settings

    try:
        settings = load_settings()
    except ValueError as exc:
        raise InvalidRequest(f"farm settings: {exc}") from None
    return settings.class_set, SimConfig.from_settings(settings, time_scale=1.0)


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        try:
            Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot write {path}: {exc.strerror or exc}", field="json") from None


@contextlib.contextmanager
def _progress_bar(trace: traces.Trace):
    """A progress bar on stderr (a terminal only) over the trace's hours, fed the virtual time
    the simulation has reached; the drain after the last arrival shows as the last hour."""
    from tqdm import tqdm

    hours = max(trace.duration / 3600.0, 1e-9)
    bar = tqdm(total=round(hours, 2), file=sys.stderr, disable=None, leave=False, desc="simulating",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} h [{elapsed}<{remaining}]")

    def on_progress(now: float) -> None:
        bar.n = round(min(now / 3600.0, hours), 2)
        bar.refresh()

    try:
        yield on_progress
    finally:
        bar.close()


def cmd_simulate(args: argparse.Namespace) -> int:
    class_set, config = _settings_config()
    fleet = parse_fleet(args.fleet, class_set)
    prices = parse_prices(args.prices, class_set)
    trace = traces.load(args.trace, seed=args.seed, hours=args.hours)
    with _progress_bar(trace) as on_progress:
        report = simulate(trace, fleet, config=config, class_set=class_set, prices=prices, progress=on_progress)
    print(simulation_table(report))
    _write_json(args.json, report)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    class_set, config = _settings_config()
    prices = parse_prices(args.prices, class_set)
    if args.mixes < 1:
        raise InvalidRequest("--mixes must be at least 1", field="mixes")
    trace = traces.load(args.trace, seed=args.seed, hours=args.hours)
    print(f"planning for {len(trace):,} jobs ({trace.duration / 3600:.1f} h of {trace.name})", file=sys.stderr)
    if args.workers is not None and args.workers < 1:
        raise InvalidRequest("--workers must be at least 1", field="workers")
    workers = args.workers if args.workers is not None else min(args.mixes, os.cpu_count() or 1)
    result = plan(trace, prices, args.target_p95, config=config, class_set=class_set, mixes=args.mixes,
                  log=lambda line: print(line, file=sys.stderr), workers=workers)
    print(plan_table(result))
    _write_json(args.json, result)
    return 0
