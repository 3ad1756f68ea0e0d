"""`i2v-farm up`: the whole farm on this machine, in the foreground, stopped by Ctrl-C.

    i2v-farm up                               # this machine's GPUs (none: one CPU worker)
    i2v-farm up --simulate 12gb:2,24gb:1      # fake-GPU nodes per VRAM class, for development
    i2v-farm up --model sim --simulate 12gb:4,24gb:2,80gb:1

It starts a local Ray cluster (on loopback), Ray Serve's HTTP proxy on `--host:--port`, and the
application of `serving.app`. The defaults are the embedded ones: `tiny-random` when no weights
are configured, results under `./outputs`, HTTP on 127.0.0.1:8000. On a real multi-node fleet,
start Ray on each node (`i2v-farm join`) and deploy `deploy/serve-config.yaml` instead.

Ray runs with its token authentication (`ray_auth: token`, the default): the cluster token lives
in `ray_token` beside the job store (0600, made on first start, never printed). A shell that
talks to this Ray cluster (`ray job submit`, `serve deploy`, `ray status`) needs
`RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file>`; `up --dashboard` prints the line.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import signal
import socket
import time

from cluster import ray_auth
from cluster.simulated import LOOPBACK, LOOPBACK_ENV, SimulatedCluster
from cluster.vram_classes import HEAD_RESOURCE, parse_simulate
from pipeline.errors import I2VError

from . import harness
from .config import FarmSettings, WorkerScaling, load_settings

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600


class LaunchError(I2VError):
    code = "launch_error"


def add_commands(subparsers) -> None:
    up = subparsers.add_parser(
        "up", help="run the farm on this machine (Ctrl-C stops it)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--host", help="HTTP address (default 127.0.0.1; env I2V_HOST)")
    up.add_argument("--port", type=int, help="HTTP port (default 8000; env I2V_PORT)")
    up.add_argument("--model", help="tiny-random (default), sim, a diffusers directory or a cached hub id")
    up.add_argument("--simulate", metavar="CLASS:N,...",
                    help="fake-GPU nodes per VRAM class instead of this machine's GPUs, e.g. 12gb:2,24gb:1")
    up.add_argument("--storage", dest="storage_url", help="file://DIR (default file://./outputs) or s3://BUCKET")
    up.add_argument("--job-db", dest="job_db", help="job store file (default ./outputs/jobs.sqlite3)")
    up.add_argument("--sim-time-scale", dest="sim_time_scale", type=float,
                    help="sim model: fraction of the predicted seconds to sleep (default 0.01)")
    up.add_argument("--no-spill", dest="spill", action="store_const", const=False,
                    help="pin every job to its own class (no spill-up)")
    up.add_argument("--dashboard", action="store_true",
                    help="start Ray's dashboard (for `ray job submit` batch jobs; prints its address)")
    up.add_argument("--trust-proxy", dest="trusted_proxies", metavar="CIDR[,CIDR]", type=_cidr_list,
                    help="reverse proxies whose X-Forwarded-For/-Proto are believed (env I2V_TRUSTED_PROXIES)")
    up.set_defaults(func=cmd_up)


def _cidr_list(text: str) -> list[str]:
    """`10.0.0.0/8,127.0.0.1` -> ["10.0.0.0/8", "127.0.0.1/32"] (argparse type; bad ones: a usage error)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one address or CIDR")
    return out


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"port {port} on {host} is already in use (another farm?); stop it or pick another with --port"
                ) from None
            raise LaunchError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def plan_nodes(settings: FarmSettings, simulate: str | None) -> tuple[dict[str, int], str]:
    """GPU nodes per class to start, and a sentence saying what they are."""
    classes = settings.class_set
    if simulate:
        try:
            counts = parse_simulate(simulate, classes)
        except ValueError as exc:
            raise LaunchError(str(exc), field="simulate") from None
        return counts, "simulated nodes (fake GPUs): " + ", ".join(f"{n} x {c}" for c, n in counts.items())
    from cluster.gpus import detect_gpus

    gpus = detect_gpus()
    counts: dict[str, int] = {}
    for gpu in gpus:
        c = classes.for_memory(gpu.memory_bytes)
        if c is None:
            log.warning("GPU %s (%s) is smaller than the smallest class; not used", gpu.index, gpu.name)
            continue
        counts[c.name] = counts.get(c.name, 0) + 1
    if counts:
        return counts, "this machine's GPUs: " + ", ".join(f"{n} x {c}" for c, n in counts.items())
    largest = classes.classes[-1].name
    return {largest: 1}, (f"no GPU found: one CPU worker standing in for class {largest} "
                          f"(use --simulate for several classes)")


def cmd_up(args: argparse.Namespace) -> int:
    os.environ.update(LOOPBACK_ENV)
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "model", "storage_url", "job_db",
                                                     "sim_time_scale", "spill", "trusted_proxies")}
    try:
        settings = load_settings(overrides)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    from .files import apply_umask

    apply_umask(settings)  # Ray's processes, their logs and the farm's files inherit it
    check_port_free(settings.host, settings.port)
    counts, what = plan_nodes(settings, args.simulate)
    if not settings.workers:
        settings = settings.model_copy(update={"workers": {
            c: WorkerScaling(min_replicas=n, max_replicas=n) for c, n in counts.items()}})
    settings = settings.resolved()

    print(f"i2v-farm: model {settings.model}; {what}", flush=True)
    print(f"i2v-farm: results in {settings.storage_url}, jobs in {settings.job_db}", flush=True)
    from .auth import TokenStore, auth_enabled, tokens_path

    if auth_enabled(settings.auth, settings.host):
        store = TokenStore(tokens_path(settings))
        print(f"i2v-farm: API tokens required (listening on {settings.host}); {len(store.entries())} tokens in "
              f"{store.path}" + ("" if store.entries() else " -- create one: i2v-farm token create NAME"), flush=True)
    else:
        print("i2v-farm: " + api_auth_banner(settings), flush=True)
    if settings.trusted_proxies:
        print(f"i2v-farm: X-Forwarded-For/-Proto believed from {', '.join(settings.trusted_proxies)}", flush=True)
    token_file = _setup_ray_auth(settings)
    stop = _install_signal_handlers()
    cluster = None
    try:
        cluster = _start_ray(counts, simulated=bool(args.simulate) or not _has_gpus(what),
                             dashboard=getattr(args, "dashboard", False), token_file=token_file)
        _start_serve(settings)
        url = f"http://{settings.host}:{settings.port}"
        _wait_ready(url, stop)
        print(f"i2v-farm: ready at {url}  (API docs {url}/docs; Ctrl-C stops the farm)", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("i2v-farm: stopping ...", flush=True)
        _stop(cluster)
        print("i2v-farm: stopped", flush=True)
    return 0


def api_auth_banner(settings: FarmSettings) -> str:
    """Who is admin when API tokens are off, and why (the banner line of `up`)."""
    where = f"{settings.host}:{settings.port}"
    if settings.auth == "off":
        return (f"API tokens off (auth: off): every caller that reaches {where} is admin. "
                "On a network or behind a reverse proxy use I2V_AUTH=on with tokens")
    return (f"API tokens off: listening on {settings.host} only; every local caller is admin. "
            "Behind a reverse proxy or on a network use --host 0.0.0.0 / I2V_AUTH=on with tokens")


def _setup_ray_auth(settings: FarmSettings):
    """Ray's token auth for this process and the Ray processes it starts; the token file (None: off)."""
    if settings.ray_auth == "off":
        ray_auth.disable()
        print("i2v-farm: WARNING " + ray_auth.OFF_WARNING, flush=True)
        return None
    try:
        path = ray_auth.ensure_token_file(ray_auth.token_path(settings))
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot set up the Ray cluster token: {exc}") from None
    ray_auth.enable(path)
    print(f"i2v-farm: Ray: token authentication on (token file {path})", flush=True)
    return path


def _ray_shell_hint(dashboard_url: str, token_file) -> str:
    env = " ".join(f"{k}={v}" for k, v in LOOPBACK_ENV.items())
    if token_file is not None:
        env = f"{ray_auth.shell_env(token_file)} {env}"
    return (f"i2v-farm: Ray dashboard at {dashboard_url}; submit batch jobs from a shell with\n"
            f"  {env} ray job submit --address {dashboard_url} --working-dir . -- python -m serving.batch MANIFEST")


def _has_gpus(what: str) -> bool:
    return what.startswith("this machine's GPUs")


def _install_signal_handlers() -> dict[str, bool]:
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _start_ray(counts: dict[str, int], simulated: bool, dashboard: bool = False, token_file=None):
    import ray

    from cluster.vram_classes import default_classes

    if simulated:
        cluster = SimulatedCluster(counts, dashboard=dashboard, auth_token_file=token_file).start()
        cluster.connect(namespace="i2v-farm", log_to_driver=False)
        if dashboard:
            print(_ray_shell_hint(cluster.dashboard_url, token_file), flush=True)
        return cluster
    classes = default_classes()
    resources = {HEAD_RESOURCE: 1, **{classes[c].resource: n for c, n in counts.items()}}
    context = ray.init(num_gpus=sum(counts.values()), resources=resources, namespace="i2v-farm",
                       _node_ip_address=LOOPBACK, include_dashboard=dashboard, log_to_driver=False)
    if dashboard:
        print(_ray_shell_hint(f"http://{context.dashboard_url}", token_file), flush=True)
    return None


def _start_serve(settings: FarmSettings) -> None:
    harness.start_serve(settings.host, settings.port)
    harness.deploy(settings)


def _wait_ready(url: str, stop: dict[str, bool]) -> None:
    try:
        harness.wait_ready(url, None, READY_TIMEOUT_S, poll=1, stopped=lambda: stop["now"])
    except harness.FarmNotReady as exc:
        raise LaunchError(str(exc)) from None


def _stop(cluster) -> None:
    import ray

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave Ray half-stopped
    try:
        if ray.is_initialized():
            from ray import serve

            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("serve shutdown")
        if cluster is not None:
            cluster.shutdown()
        elif ray.is_initialized():
            ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
