"""The fleet simulator and capacity planner (serving/fleet): traces, hand-computable simulations
(queueing, OOM retry, spill, priorities, fair sharing), the report's keys and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cluster.vram_classes import default_classes
from pipeline.errors import InvalidRequest
from serving.cli import main
from serving.fleet import traces
from serving.fleet.plan import plan
from serving.fleet.sim import SimConfig, parse_fleet, parse_prices, simulate
from serving.fleet.traces import Trace
from serving.scheduler import estimate_request

FAST = {"resolution": "512p", "num_frames": 8, "num_inference_steps": 10}  # 6.6 GiB: home 12gb
BIG = {"resolution": "768p", "num_frames": 24, "num_inference_steps": 10}  # 14.8 GiB: home 24gb


def seconds(fields: dict, cls: str, w: int = 512, h: int = 512) -> float:
    """The cost model's seconds of a request on a class (what the simulator must use)."""
    params = traces.request_params(fields)
    return estimate_request(default_classes(), params, w, h)[3][cls]


def make(rows: list[tuple]) -> Trace:
    """A trace from (t, fields, caller, priority, vram_factor) rows."""
    tr = Trace("test")
    for t, fields, caller, priority, factor in rows:
        spec = {**fields, "image_width": 512, "image_height": 512}
        if spec not in tr.specs:
            tr.specs.append(spec)
        tr.t.append(float(t))
        tr.spec.append(tr.specs.index(spec))
        tr.caller.append(caller)
        tr.kind.append("batch" if caller.startswith("team") else "interactive")
        tr.priority.append(priority)
        tr.vram_factor.append(factor)
    return tr


def starts(rep: dict) -> dict[int, tuple]:
    return {int(r[0]): (r[1], r[2], r[3], r[4]) for r in rep["job_log"]}


IDLE = SimConfig(spill_rule="idle")


# --------------------------------------------------------------------------- traces

def test_builtin_traces_are_deterministic_by_seed():
    a, b, c = (traces.day(seed=s, hours=1, scale=0.05) for s in (1, 1, 2))
    assert list(a.arrivals()) == list(b.arrivals())
    assert list(a.arrivals()) != list(c.arrivals())
    assert a.t == sorted(a.t) and a.duration <= 3600
    assert "interactive" in a.kind
    assert set(a.priority) <= {"low", "normal", "high"}
    for name in ("burst", "steady"):
        x, y = (traces.load(name, seed=3, hours=0.5) for _ in range(2))
        assert list(x.arrivals()) == list(y.arrivals()) and len(x) > 0


def test_day_trace_has_webui_mix_and_manifests():
    tr = traces.day(seed=0, hours=4, scale=0.2)
    presets = [tr.specs[s]["preset"] for s, k in zip(tr.spec, tr.kind) if k == "interactive"]
    share = {p: presets.count(p) / len(presets) for p in ("fast", "standard", "high")}
    assert abs(share["fast"] - 0.3) < 0.05 and abs(share["standard"] - 0.5) < 0.05, share
    batch = [(t, c) for t, c, k in zip(tr.t, tr.caller, tr.kind) if k == "batch"]
    assert batch, "a 4-hour day has manifests"
    # all rows of one manifest arrive at once, from one team
    first_t, team = batch[0]
    rows = [c for t, c in batch if t == first_t]
    assert len(rows) >= 100 and set(rows) == {team}
    assert {"low", "normal"} >= {p for p, k in zip(tr.priority, tr.kind) if k == "batch"}


def test_jsonl_round_trip_and_bad_lines(tmp_path):
    tr = traces.burst(seed=1, hours=0.2, scale=0.02)
    path = tmp_path / "t.jsonl"
    tr.write_jsonl(path)
    back = traces.load(str(path))
    assert len(back) == len(tr) and back.caller == tr.caller and back.priority == tr.priority
    assert [back.specs[s] for s in back.spec] == [tr.specs[s] for s in tr.spec]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "caller": "a", "preset": "fast"}\n{"t": 1, "num_frames": 99}\n')
    with pytest.raises(InvalidRequest) as err:
        traces.load(str(bad))
    assert "bad.jsonl:2" in err.value.message and err.value.field == "num_frames"
    bad.write_text('{"t": -1}\n')
    with pytest.raises(InvalidRequest, match="'t' must be"):
        traces.load(str(bad))
    with pytest.raises(InvalidRequest, match="one of day, burst, steady"):
        traces.load(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- the simulation

def test_one_gpu_queues_jobs_back_to_back():
    s = seconds(FAST, "24gb")
    rep = simulate(make([(0, FAST, "a", "normal", 1.0)] * 3 + [(10 * s, FAST, "a", "normal", 1.0)]),
                   {"24gb": 1}, record_jobs=True)
    assert rep["makespan_s"] == pytest.approx(11 * s, abs=2e-3)
    log = starts(rep)
    assert [log[i][1] for i in range(4)] == pytest.approx([0, s, 2 * s, 10 * s])
    assert rep["wait_s"]["max"] == pytest.approx(2 * s, rel=1e-3)
    assert rep["wait_s"]["p50"] == pytest.approx(0.5 * s, rel=1e-3)  # waits 0, s, 2s, 0
    assert rep["classes"]["24gb"]["jobs_run"] == 4
    assert rep["classes"]["24gb"]["utilization"] == pytest.approx(4 * s / (11 * s), rel=1e-3)
    assert rep["jobs"] == {"submitted": 4, "succeeded": 4, "failed": 0, "rejected": 0, "unfinished": 0}


def test_gpus_of_a_class_work_in_parallel_and_time_scale_applies():
    s = seconds(FAST, "24gb") * 0.5
    rep = simulate(make([(0, FAST, "a", "normal", 1.0)] * 4), {"24gb": 2}, config=SimConfig(time_scale=0.5))
    assert rep["makespan_s"] == pytest.approx(2 * s, abs=2e-3)
    assert rep["latency_s"]["max"] == pytest.approx(2 * s, rel=1e-3)


def test_out_of_memory_is_retried_on_the_next_larger_class():
    # 6.6 GiB estimated, 1.9x really: 12.6 GiB > 12 -> out of memory after the first of 10 steps
    s12, s24 = seconds(FAST, "12gb"), seconds(FAST, "24gb")
    rep = simulate(make([(0, FAST, "a", "normal", 1.9)]), {"12gb": 1, "24gb": 1}, config=IDLE, record_jobs=True)
    assert rep["oom_retries"] == 1 and rep["classes"]["12gb"]["oom"] == 1
    assert rep["classes"]["24gb"]["jobs_run"] == 1 and rep["classes"]["12gb"]["jobs_run"] == 0
    assert rep["makespan_s"] == pytest.approx(s12 / 10 + s24, abs=2e-3)
    assert starts(rep)[0][0] == "24gb"
    # a retry is not a spill: its home moved up
    assert rep["classes"]["24gb"]["spilled_in"] == 0
    # no larger class: it fails out_of_memory; above the largest: refused at once
    rep = simulate(make([(0, FAST, "a", "normal", 1.9)]), {"12gb": 1})
    assert rep["jobs"]["failed"] == 1 and rep["oom_failed"] == 1 and rep["oom_retries"] == 0
    rep = simulate(make([(0, BIG, "a", "normal", 1.0)]), {"12gb": 1})
    assert rep["jobs"]["rejected"] == 1 and rep["jobs"]["succeeded"] == 0


def test_spill_rules_idle_and_earliest_finish():
    s12, s24 = seconds(FAST, "12gb"), seconds(FAST, "24gb")
    assert s12 > 2 * s24  # a 24gb card finishes two of these before a 12gb card finishes one
    two = make([(0, FAST, "a", "normal", 1.0)] * 2)
    rep = simulate(two, {"12gb": 1, "24gb": 1}, config=IDLE, record_jobs=True)
    assert [starts(rep)[i][0] for i in (0, 1)] == ["12gb", "24gb"]  # own class first, then spill up
    assert rep["classes"]["24gb"]["spilled_in"] == 1 and rep["classes"]["12gb"]["spilled_out"] == 1
    assert rep["makespan_s"] == pytest.approx(s12, abs=2e-3)
    rep = simulate(two, {"12gb": 1, "24gb": 1}, record_jobs=True)  # earliest finish (the default)
    assert [starts(rep)[i][0] for i in (0, 1)] == ["24gb", "24gb"]
    assert rep["makespan_s"] == pytest.approx(2 * s24, abs=2e-3)
    assert rep["classes"]["12gb"]["utilization"] == 0 and rep["classes"]["24gb"]["spilled_in"] == 2
    rep = simulate(two, {"12gb": 1, "24gb": 1}, config=SimConfig(spill=False), record_jobs=True)
    assert [starts(rep)[i][0] for i in (0, 1)] == ["12gb", "12gb"]  # never spills; never down
    assert rep["makespan_s"] == pytest.approx(2 * s12, abs=2e-3)


def test_priority_first_then_fair_share_between_callers():
    s = seconds(FAST, "24gb")
    rows = [(0, FAST, "team-a", "normal", 1.0)] * 50 + [(0.5 * s, FAST, "bob", "normal", 1.0),
                                                         (0.6 * s, FAST, "carol", "high", 1.0)]
    rep = simulate(make(rows), {"24gb": 1}, record_jobs=True)
    log = starts(rep)
    assert log[51][1] == pytest.approx(s)  # high: the next free slot
    assert log[50][1] == pytest.approx(2 * s)  # bob shares with team-a: right after
    rep = simulate(make(rows), {"24gb": 1}, config=SimConfig(fair_share=False), record_jobs=True)
    assert starts(rep)[50][1] == pytest.approx(51 * s)  # first come, first served: behind the batch
    assert rep["by_kind"]["interactive"]["wait_s"]["max"] == pytest.approx(50.5 * s, rel=1e-3)


def test_report_keys_and_cost():
    rep = simulate(traces.steady(seed=0, hours=0.1, scale=0.02), {"12gb": 2, "24gb": 3, "80gb": 1},
                   prices={"12gb": 0.25, "24gb": 0.6, "80gb": 2.5})
    for key in ("jobs", "classes", "oom_retries", "wait_s", "latency_s", "by_priority", "by_kind",
                "jobs_per_hour", "cost", "wall_s"):
        assert key in rep, key
    for c in ("12gb", "24gb", "80gb"):
        assert {"gpus", "utilization", "jobs_run", "spilled_in", "spilled_out"} <= set(rep["classes"][c])
    assert set(rep["wait_s"]) >= {"p50", "p95", "p99"} and set(rep["by_kind"]) == {"interactive", "batch"}
    assert rep["cost"]["per_hour"] == pytest.approx(2 * 0.25 + 3 * 0.6 + 2.5)
    assert sum(v["jobs_run"] for v in rep["classes"].values()) == rep["jobs"]["succeeded"] > 0
    assert sum(v["spilled_in"] for v in rep["classes"].values()) == sum(
        v["spilled_out"] for v in rep["classes"].values())
    with pytest.raises(InvalidRequest, match="no price for 80gb"):
        simulate(traces.steady(hours=0.05, scale=0.01), {"24gb": 1, "80gb": 1}, prices={"24gb": 0.6})


def test_parse_fleet_and_prices():
    assert parse_fleet("12gb:300, 24gb:500,80gb:0") == {"12gb": 300, "24gb": 500, "80gb": 0}
    for bad, match in (("12gb=3", "CLASS:COUNT"), ("16gb:3", "unknown VRAM class"), ("12gb:x", "whole number"),
                       ("12gb:-1", "0 to"), ("12gb:0", "at least one GPU"), ("12gb:1,12gb:2", "twice")):
        with pytest.raises(InvalidRequest, match=match) as err:
            parse_fleet(bad)
        assert err.value.field == "fleet"
    assert parse_prices("12gb=0.25,80gb=2.5") == {"12gb": 0.25, "80gb": 2.5}
    with pytest.raises(InvalidRequest, match="CLASS=PRICE"):
        parse_prices("12gb:0.25")


# --------------------------------------------------------------------------- the planner

def test_plan_finds_the_cheapest_fleet_that_meets_the_target():
    # 20 jobs a minute for 10 minutes
    rows = [(i * 3.0, FAST, f"user-{i % 5}", "normal", 1.0) for i in range(200)]
    tr = make(rows)
    prices = {"24gb": 0.6, "80gb": 2.5}
    result = plan(tr, prices, target_p95=30.0, mixes=3)
    assert set(result) >= {"fleet", "cost_per_hour", "p95_wait_s", "alternatives", "utilization"}
    assert result["p95_wait_s"] <= 30.0
    assert result["cost_per_hour"] == pytest.approx(sum(n * prices[c] for c, n in result["fleet"].items()))
    assert all(a["cost_per_hour"] >= result["cost_per_hour"] for a in result["alternatives"])
    assert len(result["alternatives"]) == 2
    # it is what the simulator says, and a fleet 15% smaller in every class misses the target
    again = simulate(tr, result["fleet"])
    assert again["by_kind"]["interactive"]["wait_s"]["p95"] == result["p95_wait_s"]
    smaller = {c: int(n * 0.85) for c, n in result["fleet"].items() if int(n * 0.85)}
    if smaller:
        assert simulate(tr, smaller)["by_kind"]["interactive"]["wait_s"]["p95"] > 30.0
    with pytest.raises(InvalidRequest, match="--target-p95"):
        plan(tr, prices, target_p95=0)


def test_plan_searches_mixes_in_parallel_with_the_same_answer():
    rows = [(i * 3.0, FAST, f"user-{i % 5}", "normal", 1.0) for i in range(120)]
    tr = make(rows)
    prices = {"24gb": 0.6, "80gb": 2.5}
    logs: tuple[list[str], list[str]] = ([], [])
    alone = plan(tr, prices, target_p95=30.0, mixes=3, log=logs[0].append)
    together = plan(tr, prices, target_p95=30.0, mixes=3, workers=2, log=logs[1].append)
    for result in (alone, together):
        result.pop("wall_s")
        for t in result["tried"]:
            t.pop("wall_s")
    assert together == alone and together["simulations"] >= 3
    # the same simulations logged, as they end (mixes side by side: each line names its mix)
    alone_log, together_log = ([re.sub(r"\([\d.]+ s\)( +\[.*\])?$", "", ln) for ln in log] for log in logs)
    assert sorted(together_log) == sorted(alone_log) and sum(ln.startswith("mix ") for ln in together_log) >= 2
    coarse = logs[1][: logs[1].index("trim")] if "trim" in logs[1] else logs[1]
    assert all(ln.endswith("]") for ln in coarse if ln.startswith("  "))


# --------------------------------------------------------------------------- the CLI

def test_cli_simulate_writes_json(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"t": i, "caller": "a", "priority": "normal", **FAST}) + "\n"
                             for i in range(5)))
    out = tmp_path / "r.json"
    rc = main(["simulate", "--fleet", "24gb:2", "--trace", str(trace), "--json", str(out),
               "--prices", "24gb=0.6"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "24gb" in text and "interactive" in text and "cost: $1.20/h" in text
    rep = json.loads(out.read_text())
    assert rep["jobs"]["succeeded"] == 5 and rep["classes"]["24gb"]["gpus"] == 2
    assert {"p50", "p95", "p99"} <= set(rep["wait_s"]) and "normal" in rep["by_priority"]
    assert "simulating" not in capsys.readouterr().err  # no progress bar off a terminal


def test_a_simulation_reports_its_progress_in_virtual_time():
    tr = traces.load("day", hours=1)
    seen: list[float] = []
    rep = simulate(tr, {"12gb": 300, "24gb": 500, "80gb": 200}, progress=seen.append)
    assert len(seen) > 3 and seen == sorted(seen)  # now and then, never backwards
    assert seen[-1] == pytest.approx(rep["makespan_s"], abs=1e-3)  # and once at the end


def test_cli_simulate_shows_a_progress_bar_on_a_terminal(tmp_path):
    """`i2v-farm simulate` in a terminal (a pseudo-terminal here) draws its bar on stderr."""
    import fcntl
    import os
    import struct
    import subprocess
    import sys
    import termios
    import threading

    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal's size
    drawn = bytearray()

    def read_terminal() -> None:  # as it is written, so the bar never fills the terminal's buffer
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the other end closed: all read
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "simulate", "--fleet", "12gb:300,24gb:500,80gb:200",
                             "--trace", "day", "--hours", "1"], stdout=subprocess.PIPE, stderr=secondary, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    os.close(secondary)
    out, _ = proc.communicate(timeout=300)
    reader.join(10)
    os.close(primary)
    assert proc.returncode == 0 and b"interactive" in out
    assert b"simulating:" in drawn and re.search(rb" 0\.[1-9]/1\.0 h \[", drawn)  # on its way
    assert b"100%" in drawn and b" 1.0/1.0 h [" in drawn  # and at the end


def test_cli_errors_name_the_field(tmp_path, capsys):
    assert main(["simulate", "--fleet", "7gb:3", "--trace", "day"]) == 2
    assert "unknown VRAM class '7gb'" in capsys.readouterr().err
    assert main(["simulate", "--fleet", "24gb:1", "--trace", "nightly"]) == 2
    assert "--trace must be one of" in capsys.readouterr().err
    assert main(["simulate", "--fleet", "24gb:1", "--trace", "day", "--hours", "30"]) == 2
    assert "--hours" in capsys.readouterr().err
    assert main(["plan", "--trace", "steady", "--target-p95", "60", "--prices", "24gb=abc"]) == 2
    assert "--prices" in capsys.readouterr().err


def test_cli_plan(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"t": i * 4.0, "caller": f"u{i % 3}", **FAST}) + "\n" for i in range(120)))
    out = tmp_path / "plan.json"
    rc = main(["plan", "--trace", str(trace), "--target-p95", "20", "--prices", "24gb=0.6,80gb=2.5",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"fleet", "cost_per_hour", "p95_wait_s", "alternatives"}
    assert result["p95_wait_s"] <= 20
    assert "cheapest" in capsys.readouterr().out


def test_simulation_stops_early_once_too_many_interactive_jobs_wait_too_long():
    s = seconds(FAST, "24gb")
    tr = make([(0, FAST, "a", "normal", 1.0)] * 20)
    rep = simulate(tr, {"24gb": 1}, late_wait_s=2.5 * s, max_late=3)
    # the jobs start at 0, s, 2s, ...: at 3s, the first instant past 2.5s, the 17 jobs not started
    # before it have waited too long, queued or starting, and the run ends there (counting late
    # jobs only as they start, it would go on until the 4th of them starts, at 6s)
    assert rep["aborted"] and rep["jobs"]["succeeded"] == 3 and rep["jobs"]["unfinished"] == 17
    assert not simulate(tr, {"24gb": 1}, late_wait_s=2.5 * s, max_late=17)["aborted"]
