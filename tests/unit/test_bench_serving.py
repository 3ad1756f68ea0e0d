"""`bench.serving_overhead` and `bench.control_plane`: the target check, the latency statistics,
the manager-alone profile (no Ray), and one tiny run of each bench through a real farm (slow)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from bench.control_plane import (
    ENCODES,
    cpu_by_group,
    cpu_delta,
    cpu_rows,
    growth_verdict,
    latency_groups,
    parse_cluster,
    percentile,
    process_group,
    rate,
    tenths,
)
from bench.serving_overhead import interleaved, overhead_verdict

# --- serving overhead ------------------------------------------------------------------------


def test_target_is_five_percent_of_a_long_job():
    v = overhead_verdict(10.0, 10.45)  # allowed: 5 % of 10 s = 0.5 s
    assert v.allowed_s == pytest.approx(0.5) and v.passed
    assert v.added_s == pytest.approx(0.45) and v.added_percent == pytest.approx(4.5)
    assert not overhead_verdict(10.0, 10.6).passed


def test_target_is_100_ms_for_a_short_job():
    v = overhead_verdict(1.0, 1.09)  # 5 % would be 50 ms; 100 ms is larger
    assert v.allowed_s == pytest.approx(0.1) and v.passed
    assert not overhead_verdict(1.0, 1.11).passed
    assert overhead_verdict(1.0, 0.95).passed  # faster than in-process (noise) passes


def test_target_boundary_and_bad_baseline():
    assert overhead_verdict(2.0, 2.1).passed  # exactly 100 ms
    with pytest.raises(ValueError):
        overhead_verdict(0.0, 1.0)


def test_runs_are_interleaved_and_each_side_leads_every_other_round():
    assert interleaved(3) == ["inproc", "farm", "farm", "inproc", "inproc", "farm"]
    assert interleaved(0) == []


# --- control plane ---------------------------------------------------------------------------


def test_percentile_interpolates_linearly():
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))


def test_first_and_last_hundred():
    lat = [0.01] * 100 + [0.5] * 800 + [0.02] * 99 + [1.0]
    first, last = latency_groups(lat)
    assert (first.count, last.count) == (100, 100)
    assert first.p50 == pytest.approx(0.01) and last.p50 == pytest.approx(0.02)
    assert last.p99 == pytest.approx(np.percentile([0.02] * 99 + [1.0], 99))


def test_fewer_than_two_hundred_submissions_split_in_halves():
    first, last = latency_groups([1.0, 2.0, 3.0, 4.0])
    assert (first.count, last.count) == (2, 2) and first.p50 == 1.5 and last.p50 == 3.5


def test_growth_verdict():
    first, last = latency_groups([0.010] * 100 + [0.012] * 100)
    assert growth_verdict(first, last)[0]
    first, last = latency_groups([0.010] * 100 + [0.040] * 100)
    flat, text = growth_verdict(first, last)
    assert not flat and "4.00" in text and "GROWS" in text
    # tiny absolute growth (under 5 ms) is noise, not growth
    first, last = latency_groups([0.001] * 100 + [0.004] * 100)
    assert growth_verdict(first, last)[0]


def test_rate_counts_intervals_and_trims_the_ends():
    assert rate([0.0, 1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0)
    times = [0.0] + [10.0 + i * 0.5 for i in range(9)]  # a slow start, then 2/s
    assert rate(times, trim=0.1) == pytest.approx(2.0)
    assert math.isnan(rate([1.0]))


def test_tenths_report_backlog_and_latency():
    lat = [0.001 * (i + 1) for i in range(20)]
    rows = tenths(lat, list(range(20)))
    assert len(rows) == 10 and rows[0][0] == "1-2" and rows[-1][0] == "19-20"
    assert rows[0][1] == "0"  # median of backlog 0 and 1, rounded
    assert rows[-1][2] == f"{1000 * np.percentile([0.019, 0.020], 50):.1f}"


def test_parse_cluster():
    assert parse_cluster("12gb:2,24gb:1") == {"12gb": 2, "24gb": 1}
    for bad in ("12gb", "12gb:0", ":2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_cluster(bad)


def test_processes_are_grouped_by_the_part_of_the_farm_they_are():
    assert process_group("ray::ServeReplica:i2v-farm:JobManager.handle_request_with_rejection") == "JobManager"
    assert process_group("ray::ServeReplica:i2v-farm:FarmApi") == "FarmApi"
    assert process_group("ray::ServeReplica:i2v-farm:Worker_24gb.handle_request") == "Worker (all)"
    assert process_group("ray::ProxyActor.receive_asgi_messages") == "Serve proxy"
    assert process_group("ray::ServeController.listen_for_change") == "Serve controller"
    assert process_group("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/s") == "Ray core (GCS, raylets)"
    assert process_group("/usr/bin/ffmpeg -y -f rawvideo -i -") == ENCODES
    assert process_group("ray::DashboardAgent") == "Ray other"


def test_cpu_per_job_rows_are_largest_first_with_a_total():
    delta = cpu_delta({"JobManager": 1.0, "FarmApi": 2.0}, {"JobManager": 4.0, "FarmApi": 3.0, "Serve proxy": 2.0})
    assert delta == {"JobManager": 3.0, "FarmApi": 1.0, "Serve proxy": 2.0}
    rows = cpu_rows(delta, jobs=100, wall_s=10.0)
    assert [r[0] for r in rows] == ["JobManager", "Serve proxy", "FarmApi", "all"]
    assert rows[0] == ["JobManager", "3.0", "30.0", "0.30"] and rows[-1] == ["all", "6.0", "60.0", "0.60"]
    assert cpu_delta(None, {"a": 1.0}) == {}


def test_cpu_by_group_counts_this_process_and_its_children():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        deadline = time.monotonic() + 20
        while True:
            cpu = cpu_by_group()
            if cpu is None:
                pytest.skip("no /proc here")
            if cpu.get("Ray other", 0) >= 0.25 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cpu["Ray other"] >= 0.25  # the child's busy loop, under this process
        assert cpu["bench (clients)"] > 0
    finally:
        child.kill()
        child.wait()


def test_manager_alone_accepts_every_job_and_reports_the_first_and_last(capsys):
    """Part 2 of the bench: the real JobManager in this process (no Ray), dispatch stopped."""
    from bench.control_plane import parse_args, run_manager_alone
    from bench.scheduler import png_bytes

    args = parse_args(["--jobs", "40", "--steps", "2"])
    out = run_manager_alone(args, png_bytes())
    assert len(out["latencies"]) == 40 and all(t > 0 for t in out["latencies"])
    assert out["first"]["count"] == out["last"]["count"] == 20
    text = capsys.readouterr().out
    assert "first 20" in text and "cProfile" in text and "_submit" in text


# --- whole benches through a real farm (Ray) ---------------------------------------------------


@pytest.mark.slow
def test_control_plane_bench_runs_through_the_farm(tmp_path, capsys):
    from bench.control_plane import main

    out = main(["--jobs", "24", "--clients", "2", "--steps", "2", "--no-profile", "--json", str(tmp_path / "c.json")])
    summary = out["farm"]["summary"]
    assert summary["succeeded"] == 24 and summary["started_per_s"] > 0
    assert len(out["farm"]["submissions"]) == 24
    text = capsys.readouterr().out
    assert "p50 last/first" in text and "jobs started/s" in text


@pytest.mark.slow
def test_serving_overhead_bench_runs_through_the_farm(tmp_path, capsys, tiny_model):
    from bench.serving_overhead import main

    out = main(["--repeat", "1", "--steps", "1", "--frames", "8", "--no-default-cpus", "--json",
                str(tmp_path / "o.json")])
    (phase,) = out["phases"]
    assert len(phase["runs"]["farm"]) == len(phase["runs"]["inproc"]) == 1
    assert phase["runs"]["farm"][0]["worker_s"] > 0
    text = capsys.readouterr().out
    assert "farm adds" in text and ("PASS" in text or "FAIL" in text)
