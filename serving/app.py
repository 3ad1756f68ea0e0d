"""The Serve application: ingress -> job manager -> one worker deployment per VRAM class.

`build_app(args)` is what `serve deploy deploy/serve-config.yaml` imports (`serving.app:build_app`)
and what `i2v-farm up` runs. `args` are `FarmSettings` fields; `I2V_*` variables fill the rest.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.vram_classes import HEAD_RESOURCE

from .api import FarmApi
from .config import FarmSettings, load_settings
from .manager import JobManager
from .worker import Worker

APP_NAME = "i2v-farm"
#: Serve's autoscaler reacts within seconds; GPUs are slow to fill, so keep replicas a while.
UPSCALE_DELAY_S = 2.0
DOWNSCALE_DELAY_S = 600.0


def worker_deployment(settings: FarmSettings, class_name: str):
    c = settings.class_set[class_name]
    scaling = settings.workers[class_name]
    options: dict[str, Any] = {
        "name": c.deployment,
        "max_ongoing_requests": 1,  # one job per GPU
        "ray_actor_options": {"num_gpus": 1, "num_cpus": settings.worker_cpus, "resources": {c.resource: 1}},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 5,
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": 1,
            "upscale_delay_s": UPSCALE_DELAY_S,
            "downscale_delay_s": DOWNSCALE_DELAY_S,
        }
    return serve.deployment(Worker).options(**options)


def affinity_env(settings: FarmSettings) -> dict[str, str]:
    """The job manager's handles route a LoRA job by Serve's model multiplexing (the adapter set as
    the model id): a free replica holding the set first, then the replicas holding the fewest sets,
    and any replica once Serve's matching timeout (drawn from [T, 2T]) has passed. T is half of
    `adapter_affinity_wait_s`, so affinity never holds a job back from a free GPU for longer."""
    return {"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": f"{settings.adapter_affinity_wait_s / 2:g}"}


def build(settings: FarmSettings) -> Application:
    settings = settings.resolved()
    if not any(w.max_replicas > 0 for w in settings.workers.values()):
        raise ValueError("no worker deployments: set `workers`, e.g. {\"12gb\": {\"max_replicas\": 2}}")
    data = settings.model_dump()
    workers = {
        c.name: worker_deployment(settings, c.name).bind(c.model_dump(), data) for c in settings.active_classes
    }
    manager = serve.deployment(JobManager).options(
        name="JobManager",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01},
                           "runtime_env": {"env_vars": affinity_env(settings)}},
        # A line per handle call from the ingress (each submission, GET, poll) says nothing the
        # ingress's own access log does not, and cost ~2% of the manager's CPU under load.
        logging_config={"enable_access_log": False},
    ).bind(data, workers)
    ingress = serve.deployment(FarmApi).options(
        name="FarmApi",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(manager, data)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Entry point for `serve run` / `serve deploy` (`import_path: serving.app:build_app`)."""
    return build(load_settings(overrides=dict(args or {})))
