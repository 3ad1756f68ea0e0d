"""One way to bring a farm up and down: Serve on an address, the farm application deployed with
settings, a wait until it is ready (and, when asked, until each class runs its replicas), and
the tear-down. Used by `i2v-farm up` (serving/launcher.py), the integration tests' fixtures
(tests/integration/conftest.py) and the benches; `simulated_farm` does all of it on a
`SimulatedCluster` for a bench or a script.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class FarmNotReady(RuntimeError):
    """The farm did not answer `/readyz` with 200 (and the wanted replicas) in time."""


def start_serve(host: str = "127.0.0.1", port: int | None = None) -> int:
    """Start Serve's HTTP proxy on the head node only; returns its port (a free one by default)."""
    from ray import serve

    from cluster.simulated import free_port

    port = port or free_port()
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    return port


def readyz(url: str, timeout: float = 10) -> tuple[int, dict[str, Any] | str]:
    """(status, JSON body or the error text) of `GET url/readyz`; status 0 when unreachable."""
    from .client import FarmClient, FarmClientError

    try:
        status, payload, _ = FarmClient(url, timeout=timeout, token="").request("GET", "/readyz")
    except FarmClientError as exc:
        return 0, exc.message
    except ValueError as exc:  # a JSON content type with a body that is not JSON
        return 0, f"unreadable answer: {exc}"
    if status == 200:
        return status, payload if isinstance(payload, dict) else {}
    try:
        return status, payload["error"]["message"]
    except Exception:  # noqa: BLE001 - any body: report the status
        return status, f"HTTP {status}"


def wait_ready(url: str, replicas: Mapping[str, int] | None = None, timeout: float = 120, *,
               poll: float = 0.3, stopped: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Wait until `url/readyz` answers 200 and, if `replicas` is given, reports exactly those
    running replicas per class; returns its body. `stopped()` True ends the wait early ({})."""
    deadline = time.monotonic() + timeout
    last: Any = ""
    while not stopped():
        status, body = readyz(url)
        if status == 200 and isinstance(body, dict):
            if replicas is None or body.get("replicas") == dict(replicas):
                return body
            last = f"replicas {body.get('replicas')}, waiting for {dict(replicas)}"
        else:
            last = body
        if time.monotonic() > deadline:
            raise FarmNotReady(f"the farm did not become ready in {timeout:.0f} s: {last}")
        time.sleep(poll)
    return {}


def deploy(settings, url: str | None = None, replicas: Mapping[str, int] | None = None,
           timeout: float = 120) -> dict[str, Any]:
    """Deploy (or redeploy) the farm application with `settings`; with `url`, wait as
    `wait_ready` does and return the `/readyz` body."""
    from ray import serve

    from .app import APP_NAME, build

    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
    return wait_ready(url, replicas, timeout) if url else {}


def undeploy() -> None:
    """Delete the farm application (Serve and the cluster keep running)."""
    from ray import serve

    from .app import APP_NAME

    serve.delete(APP_NAME)


def workers_for(counts: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """The `workers` setting that runs exactly `counts` replicas per class."""
    return {c: {"min_replicas": n, "max_replicas": n} for c, n in counts.items()}


@contextlib.contextmanager
def simulated_farm(counts: Mapping[str, int], workdir: Path, overrides: Mapping[str, Any] | None = None, *,
                   head_cpus: float = 4, node_cpus: float = 2, namespace: str = "i2v-bench",
                   timeout: float = 300) -> Iterator[tuple[Any, str]]:
    """A `SimulatedCluster` with `counts` fake-GPU nodes per class, Serve on a free loopback port
    and the farm (results, job store and spool under `workdir`) running `counts` replicas:
    yields (cluster, url); tears everything down after."""
    from ray import serve

    from cluster.simulated import SimulatedCluster
    from serving.config import load_settings

    spec = ",".join(f"{c}:{n}" for c, n in counts.items())
    sim = SimulatedCluster(spec, head_cpus=head_cpus, node_cpus=node_cpus).start()
    try:
        sim.connect(namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
        port = start_serve()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        settings = load_settings({
            "job_db": str(workdir / "jobs.sqlite3"), "storage_url": f"file://{workdir / 'outputs'}",
            "spool_dir": str(workdir / "spool"), "workers": workers_for(counts), **(overrides or {}),
        }, env={})
        url = f"http://127.0.0.1:{port}"
        deploy(settings, url, dict(counts), timeout)
        yield sim, url
    finally:
        try:
            with contextlib.suppress(Exception):
                undeploy()
            serve.shutdown()
        finally:
            sim.shutdown()
