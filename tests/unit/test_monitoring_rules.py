"""monitoring/: the Prometheus config, alert rules (promtool check + unit tests) and the Grafana
dashboard and provisioning, checked against the metrics the farm really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import FarmMetrics, GiB, WorkerStats

ROOT = Path(__file__).resolve().parents[2] / "monitoring"
PROMETHEUS = ROOT / "prometheus"
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("'promtool' is not installed: run `make sysdeps` (Debian package prometheus)")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120)


def exported_names() -> set[str]:
    """Every series name the farm exports (histograms with their _bucket/_sum/_count)."""
    class C:
        name, memory_bytes = "12gb", 12 * GiB

    m = FarmMetrics([C])
    m.worker_event("12gb", WorkerStats(12 * GiB, node="n", gpu="0").annotate({"event": "started"}))
    cluster = {"classes": [{"name": "12gb", "memory_gib": 12, "replicas": {"running": 1, "min": 1, "max": 1},
                            "busy": 0, "queued": 0}], "jobs": {}}
    names = set()
    for family in text_string_to_metric_families(m.render(cluster, {}, alive_nodes=["n"]).decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    return set(re.findall(r"\bi2v_[a-zA-Z0-9_:]*", expr))  # no label is named i2v_*


def dashboard_exprs(path: Path) -> list[str]:
    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    return [t["expr"] for p in panels(json.loads(path.read_text())["panels"]) for t in p.get("targets", [])]


def test_promtool_accepts_the_config_and_its_rule_files():
    r = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(RULE_FILES)} rule files found" in r.stdout + r.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["i2v-farm"]["metrics_path"] == "/metrics"
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_promtool_accepts_the_rules():
    assert RULE_FILES
    r = promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_pass_their_unit_tests():
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    r = promtool("test", "rules", *map(str, tests))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_the_issue_asks_for_exists_and_is_unit_tested():
    alerts = {rule["alert"]: rule for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
              for rule in g["rules"] if "alert" in rule}
    assert {"I2VQueueStuck", "I2VClassWithoutHealthyReplicas", "I2VHighOOMRate", "I2VHighJobFailureRate",
            "I2VStorageUploadsFailing", "I2VFarmDown"} <= set(alerts)
    tested = {case["alertname"] for f in (PROMETHEUS / "tests").glob("*.yml")
              for t in yaml.safe_load(f.read_text())["tests"] for case in t.get("alert_rule_test", [])}
    assert tested == set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_and_dashboards_only_use_metrics_the_farm_exports():
    names = exported_names()
    assert all(n.startswith("i2v_") for n in names)
    used = set()
    for f in RULE_FILES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            for rule in g["rules"]:
                used |= metric_names(rule["expr"])
    for d in DASHBOARDS:
        for expr in dashboard_exprs(d):
            used |= metric_names(expr)
    assert len(used) > 10, used
    assert used <= names, sorted(used - names)


def test_dashboard_panels_query_prometheus_and_filter_by_the_class_variable():
    assert [d.name for d in DASHBOARDS] == ["i2v-farm.json"]
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uid = provisioned[0]["uid"]
    dash = json.loads(DASHBOARDS[0].read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["vram_class"]["includeAll"] and variables["vram_class"]["multi"]
    assert "i2v_" in variables["vram_class"]["definition"]
    assert variables["datasource"]["current"]["value"] == uid
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("jobs per minute", "video seconds", "p95", "queue depth", "peak gpu memory", "failures", "retries"):
        assert topic in titles, topic
    class_metrics = ("i2v_jobs_finished_total", "i2v_queue_depth", "i2v_job_latency_seconds", "i2v_oom_total")
    for expr in dashboard_exprs(DASHBOARDS[0]):
        if any(m in expr for m in class_metrics):
            assert 'vram_class=~"$vram_class"' in expr, expr
    # the grid: no two panels overlap
    cells = set()
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine


def test_grafana_provisioning_points_at_the_dashboards():
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/i2v-farm.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
