"""`deploy/serve-config.yaml` against Ray Serve's own schema, and the application it builds;
the farm's settings (file, environment, overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serving.app import build_app
from serving.config import FarmSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "serve-config.yaml"


def _app_args(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    args = dict(config["applications"][0]["args"])
    return {**args, "job_db": str(tmp_path / "jobs.sqlite3"), "storage_url": f"file://{tmp_path}/out"}


def test_serve_config_passes_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app" and app.route_prefix == "/"
    # the args are valid farm settings
    FarmSettings.model_validate(app.args)


def test_serve_config_builds_one_pinned_worker_deployment_per_class(tmp_path, monkeypatch):
    for var in ("I2V_MODEL", "I2V_CONFIG", "I2V_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    app = build_app(_app_args(tmp_path))
    ingress = app._bound_deployment
    assert ingress.name == "FarmApi"
    manager = ingress.init_args[0]._bound_deployment
    assert manager.name == "JobManager" and manager.ray_actor_options["resources"] == {"i2v_head": 0.01}
    # the ingress logs each request; the manager's line per handle call would only repeat it
    assert manager._deployment_config.logging_config["enable_access_log"] is False
    assert (ingress._deployment_config.logging_config or {}).get("enable_access_log", True)
    workers = manager.init_args[1]
    assert sorted(workers) == ["12gb", "24gb", "40gb", "80gb"]
    for name, bound in workers.items():
        dep = bound._bound_deployment
        assert dep.name == f"Worker_{name}"
        assert dep.ray_actor_options["num_gpus"] == 1
        assert dep.ray_actor_options["resources"] == {f"vram_{name}": 1}
        assert dep.max_ongoing_requests == 1  # one job per GPU
    scaling = workers["12gb"]._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 8)


def test_workers_must_name_known_classes(tmp_path):
    with pytest.raises(ValueError, match="unknown VRAM class '16gb'"):
        load_settings({"workers": {"16gb": {"max_replicas": 1}}}, env={})
    with pytest.raises(ValueError, match="min_replicas > max_replicas"):
        load_settings({"workers": {"12gb": {"min_replicas": 3, "max_replicas": 1}}}, env={})
    with pytest.raises(ValueError, match="no worker deployments"):
        build_app({"job_db": str(tmp_path / "j.sqlite3"), "storage_url": f"file://{tmp_path}"})


def test_settings_precedence_file_then_environment_then_overrides(tmp_path):
    path = tmp_path / "farm.yaml"
    path.write_text("model: sim\nport: 9000\nbacklog_limit: 7\nworkers:\n  24gb: {max_replicas: 2}\n")
    env = {"I2V_CONFIG": str(path), "I2V_PORT": "9100", "I2V_SPILL": "false",
           "I2V_CLASSES": json.dumps([{"name": "24gb", "memory_gib": 24, "gpu": "rtx4090-24gb"}])}
    s = load_settings({"port": 9200, "host": None}, env=env)
    assert (s.model, s.backlog_limit, s.port, s.spill, s.host) == ("sim", 7, 9200, False, "127.0.0.1")
    assert [c.name for c in s.classes] == ["24gb"] and s.workers["24gb"].max_replicas == 2
    assert load_settings(env=env).port == 9100


def test_bad_settings_say_which_and_why(tmp_path):
    with pytest.raises(ValueError, match="invalid setting port"):
        load_settings(env={"I2V_PORT": "eighty"})
    with pytest.raises(ValueError, match="storage_url"):
        load_settings({"storage_url": "ftp://x"}, env={})
    with pytest.raises(ValueError, match="cannot read settings file"):
        load_settings(env={"I2V_CONFIG": str(tmp_path / "missing.yaml")})


def test_defaults_are_a_working_local_farm():
    s = load_settings(env={})
    assert (s.model, s.host, s.port, s.storage_url) == ("tiny-random", "127.0.0.1", 8000, "file://./outputs")
    r = s.resolved()
    assert Path(r.job_db).is_absolute() and Path(r.storage_url[len("file://"):]).is_absolute()
