"""The worker replicas Serve runs for each VRAM class, and what the job manager makes of them:
free slots to dispatch into (one more than the replicas when Serve's autoscaler may add one), how
often to read Serve's status, the estimated seconds left on each busy class (the spill rule), and
the classes as `GET /v1/cluster` shows them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.vram_classes import ClassSet

    from ..config import FarmSettings
    from .attempts import Running

REPLICA_REFRESH_S = 1.0
#: When every class runs the replicas it may (none starting or stopping, none to add): reading
#: Serve's status is costly (the controller builds the whole instance's details, this replica
#: parses them), so it is read less often.
REPLICA_REFRESH_STABLE_S = 5.0


async def read_replicas(classes: ClassSet, replicas: dict[str, dict[str, int]]) -> dict[str, float]:
    """Serve's replica states (state -> count) of each class's worker deployment, written into
    `replicas` (left as they were when the farm's application is not found); returns the free GPUs
    of each class resource (Ray's available resources)."""
    import ray

    states = replica_states(await asyncio.to_thread(_serve_details), [c.deployment for c in classes])
    if states is not None:
        for c in classes:
            replicas[c.name] = states[c.deployment]
    return {c.resource: ray.available_resources().get(c.resource, 0.0) for c in classes}


def _serve_details() -> dict[str, Any]:
    """What `serve.status()` reads from Serve's controller (the instance's details), as the plain
    dict the controller sends. `serve.status()` builds Serve's pydantic models of it first, which
    pickles each deployment's request-router class again (most of a status read's CPU in this
    replica: 66 ms of CPU per read against 2 ms for this dict, measured on a 3-worker farm)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return client.get_serve_details() if client is not None else {}


def replica_states(details: dict[str, Any], deployments: list[str]) -> dict[str, dict[str, int]] | None:
    """Replica states (state -> count) of each of `deployments` (a deployment not there: {}) in
    the first application of Serve's instance details (`_serve_details`) that has any of them;
    None when none has (the farm's application is not deployed)."""
    for app in (details.get("applications") or {}).values():
        found = app.get("deployments") or {}
        if any(d in found for d in deployments):
            return {d: dict(Counter(str(getattr(r["state"], "value", r["state"]))
                                    for r in (found.get(d) or {}).get("replicas") or ()))
                    for d in deployments}
    return None


def running_replicas(replicas: dict[str, dict[str, int]]) -> dict[str, int]:
    """RUNNING replicas per class (what admission counts as the class's capacity)."""
    return {c: s.get("RUNNING", 0) for c, s in replicas.items()}


@dataclass
class Capacity:
    """The farm's capacity at one moment: per class, its replicas' states (as Serve reported them),
    the free GPUs of its resource, its queued jobs (`backlog`) and the running jobs' attempts."""

    classes: ClassSet
    settings: FarmSettings
    replicas: dict[str, dict[str, int]]
    free_gpus: dict[str, float]
    backlog: dict[str, int]
    running: Iterable[Running]

    def busy(self) -> dict[str, int]:
        """Running jobs per class."""
        busy: dict[str, int] = {}
        for run in self.running:
            busy[run.vram_class] = busy.get(run.vram_class, 0) + 1
        return busy

    def free_slots(self) -> dict[str, int]:
        """Jobs each class can take now."""
        busy = self.busy()
        free = {}
        for c in self.classes:
            states = self.replicas.get(c.name, {})
            running = states.get("RUNNING", 0)
            slots = running - busy.get(c.name, 0)
            # Autoscaling: with work queued, room to grow and a free GPU of this class, hand Serve
            # one job more than it has replicas: its autoscaler then adds a replica.
            total = running + states.get("STARTING", 0)
            if (slots <= 0 and self.backlog.get(c.name, 0) > 0 and total < self.settings.workers[c.name].max_replicas
                    and busy.get(c.name, 0) <= total
                    and (self.free_gpus.get(c.resource, 0) >= 1 or self.settings.node_autoscaling)):
                slots = 1
            free[c.name] = max(0, slots)
        return free

    def refresh_interval(self) -> float:
        """Seconds between two reads of Serve's replica states: `REPLICA_REFRESH_S` while a
        class has replicas that are not RUNNING (starting, stopping, recovering), fewer than its
        `min_replicas`, or queued work and room to grow; else `REPLICA_REFRESH_STABLE_S`."""
        for c in self.classes.names:
            states = self.replicas.get(c, {})
            running = states.get("RUNNING", 0)
            scaling = self.settings.workers[c]
            if (any(n for state, n in states.items() if state != "RUNNING") or running < scaling.min_replicas
                    or (self.backlog.get(c, 0) > 0 and running < scaling.max_replicas)):
                return REPLICA_REFRESH_S
        return REPLICA_REFRESH_STABLE_S

    def seconds_left(self) -> dict[str, list[float]]:
        """Per class, the estimated seconds left of each running job (the scheduler's spill rule)."""
        now = time.monotonic()
        left: dict[str, list[float]] = {c: [] for c in self.classes.names}
        for run in self.running:
            secs = run.job.seconds.get(run.vram_class, 0.0)
            left[run.vram_class].append(max(0.0, secs - (now - run.started)))
        return left

    def class_views(self) -> list[dict[str, Any]]:
        """Each class as `GET /v1/cluster` shows it."""
        busy = self.busy()
        classes = []
        for c in self.classes:
            states = self.replicas.get(c.name, {})
            scaling = self.settings.workers[c.name]
            classes.append({
                "name": c.name,
                "memory_gib": c.memory_gib,
                "gpu": c.gpu,
                "resource": c.resource,
                "deployment": c.deployment,
                "spill_to": list(self.classes.spill[c.name]),
                "replicas": {"running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0),
                             "min": scaling.min_replicas, "max": scaling.max_replicas},
                "busy": busy.get(c.name, 0),
                "queued": self.backlog.get(c.name, 0),
                "free_gpus": self.free_gpus.get(c.resource, 0.0),
            })
        return classes
