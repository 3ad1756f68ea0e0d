"""A simulated farm on one machine: Ray nodes with fake GPUs and VRAM-class resources.

Development and CI have no GPU. `SimulatedCluster` starts a real multi-node Ray cluster inside
this machine (Ray's own `ray.cluster_utils.Cluster`): a head node advertising `i2v_head` and no
GPU, and per VRAM class as many nodes as asked, each with `num_gpus=1` and one unit of its class
resource. Ray only counts those GPUs; the processes on them see no CUDA device, so the same
deployments that run on a real farm run here on CPU.

    with SimulatedCluster("12gb:2,24gb:1") as sim:
        sim.connect(namespace="i2v")        # or ray.init(address=sim.address)
        sim.nodes_by_class()                # {"12gb": [id, id], "24gb": [id]}

Everything stays on loopback (127.0.0.1). Ray on Linux would advertise the machine's interface
address and, worse, turn `ray.init(address="127.0.0.1:PORT")` into `INTERFACE_IP:PORT` (see
`ray._private.services.resolve_ip_for_localhost`), where nothing listens: the driver then hangs
retrying. So each node is started with `node_ip_address="127.0.0.1"`, and while the cluster is up
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set in the environment (for the Ray processes it starts
and any process launched from here, such as `ray job submit` drivers) and in this process's
already-imported Ray constants, which is what makes Ray resolve "local" to 127.0.0.1. Both are
put back on `shutdown()`. Another *process* that connects by address needs
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in its environment too (`LOOPBACK_ENV`).

With `auth_token_file=PATH` the cluster runs with Ray's token authentication (`cluster.ray_auth`):
the file is created (0600) if missing, and `RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH=PATH` are
set in this process's environment while the cluster is up, so every Ray process of the cluster,
this driver, and processes launched from here (`ray job submit`, job drivers) use it. Another
process needs the same two variables (`auth_env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

from .vram_classes import HEAD_RESOURCE, RESOURCE_PREFIX, ClassSet, default_classes, parse_simulate

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Environment a separate process needs to reach a loopback Ray cluster by address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Raylet environment of a simulated GPU node: Ray counts the GPU but sets no
#: CUDA_VISIBLE_DEVICES, and the processes there see no CUDA device even on a GPU machine.
FAKE_GPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
MiB = 1024**2


def free_port() -> int:
    """A TCP port free on loopback right now (for Ray, Serve and test servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class SimulatedCluster:
    """A local Ray cluster with a head node and fake-GPU nodes per VRAM class.

    Args:
        counts: GPU nodes per class, `{"12gb": 2, "24gb": 1}` or `"12gb:2,24gb:1"` (None: head only).
        classes: the farm's classes (default: `default_classes()`).
        head_cpus: CPUs the head node advertises (ingress, scheduler, job store live there).
        node_cpus: CPUs each GPU node advertises.
        object_store_memory: object store bytes per node (Ray's own memory; keep it modest).
        dashboard: start Ray's dashboard (needed for `ray job submit` and the Jobs API) on a free
            port, see `dashboard_url`; off by default, it costs a few processes.
        auth_token_file: run with Ray's token authentication, the token in this file (made 0600
            with a random token if missing). None: Ray's authentication as the environment says
            (`RAY_AUTH_MODE`; unset: none).

    `start()` (or `with`) brings it up; nothing runs before that. `shutdown()` stops every node
    (and disconnects this process if `connect()` connected it).
    """

    def __init__(
        self,
        counts: Mapping[str, int] | str | None = None,
        classes: ClassSet | None = None,
        *,
        head_cpus: int = 4,
        node_cpus: int = 2,
        object_store_memory: int = 128 * MiB,
        dashboard: bool = False,
        auth_token_file: str | os.PathLike | None = None,
    ):
        self.classes = classes or default_classes()
        if isinstance(counts, str):
            counts = parse_simulate(counts, self.classes)
        self.counts: dict[str, int] = dict(counts or {})
        for name, n in self.counts.items():
            self.classes[name]  # KeyError naming the classes for an unknown one
            if n < 0:
                raise ValueError(f"node count for {name} must be >= 0, got {n}")
        self.head_cpus = head_cpus
        self.node_cpus = node_cpus
        self.object_store_memory = object_store_memory
        self.dashboard = dashboard
        self.auth_token_file = os.path.abspath(auth_token_file) if auth_token_file else None
        self._auth_saved: dict = {}
        self._cluster = None
        self._connected = False
        self._saved: dict = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SimulatedCluster":
        """Start the head node, then every class node, and wait until all have registered."""
        if self._cluster is not None:
            return self
        t0 = time.monotonic()
        self._enter_loopback()
        try:
            if self.auth_token_file:
                from . import ray_auth

                self._auth_saved = ray_auth.enable(ray_auth.ensure_token_file(self.auth_token_file))
            from ray.cluster_utils import Cluster

            with _driver_kv_kept():
                self._cluster = Cluster(shutdown_at_exit=True)
                self._cluster.add_node(**self._head_args())
                for name, n in self.counts.items():
                    for _ in range(n):
                        self._cluster.add_node(wait=False, **self._class_node_args(name))
                self._cluster.wait_for_nodes(timeout=timeout)
        except BaseException:
            self.shutdown()
            raise
        logger.info("simulated cluster %s up in %.1fs: %s", self.address, time.monotonic() - t0, self.counts)
        return self

    def shutdown(self) -> None:
        """Stop every node (idempotent); disconnects this process first if `connect()` did connect it."""
        if self._connected:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            self._connected = False
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            with _driver_kv_kept():
                try:
                    cluster.shutdown()
                except Exception:  # a node that already died must not keep the others running
                    logger.exception("simulated cluster: shutdown failed")
                    for node in cluster.list_all_nodes():
                        node.kill_all_processes(check_alive=False, allow_graceful=False)
        self._leave_loopback()
        if self._auth_saved:
            from . import ray_auth

            ray_auth.restore(self._auth_saved)
            self._auth_saved = {}

    def __enter__(self) -> "SimulatedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- the cluster -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """GCS address (`127.0.0.1:PORT`) for `ray.init(address=...)`."""
        return self._require().address

    @property
    def dashboard_url(self) -> str | None:
        """`http://127.0.0.1:PORT` of Ray's dashboard when started with `dashboard=True`."""
        url = self._require().webui_url if self.dashboard else None
        return f"http://{url}" if url and not url.startswith("http") else url

    @property
    def auth_env(self) -> dict[str, str]:
        """Environment another process needs to talk to this cluster (`{}` without token auth)."""
        if not self.auth_token_file:
            return {}
        from .ray_auth import MODE_VAR, PATH_VAR

        return {MODE_VAR: "token", PATH_VAR: self.auth_token_file}

    @property
    def session_dir(self) -> str:
        """The head node's Ray session directory (its `logs/` hold every process's log)."""
        return self._require().head_node.get_session_dir_path()

    @property
    def head_node_id(self) -> str:
        return self._require().head_node.node_id

    def connect(self, namespace: str | None = None, **init_kwargs):
        """`ray.init` this process to the cluster (undone by `shutdown()`); returns Ray's context."""
        import ray

        context = ray.init(address=self.address, namespace=namespace, **init_kwargs)
        self._connected = True
        return context

    def nodes(self) -> list[dict]:
        """Alive nodes as `ray.nodes()` lists them (this process need not be connected)."""
        cluster = self._require()
        return [n for n in cluster.global_state.node_table() if n.get("Alive")]

    def nodes_by_class(self) -> dict[str, list[str]]:
        """`{class_name: [node_id_hex, ...]}` of alive nodes advertising a class resource."""
        found: dict[str, list[str]] = {}
        for node in self.nodes():
            for resource in node.get("Resources", {}):
                if resource.startswith(RESOURCE_PREFIX):
                    found.setdefault(resource[len(RESOURCE_PREFIX):], []).append(node["NodeID"])
        order = {name: i for i, name in enumerate(self.classes.names)}
        ordered = sorted(found.items(), key=lambda kv: (order.get(kv[0], 1 << 30), kv[0]))
        return {name: sorted(ids) for name, ids in ordered}

    def add_class_node(self, name: str) -> str:
        """Start one more GPU node of class `name`; returns its node id (hex) once registered."""
        cluster = self._require()
        self.classes[name]  # KeyError naming the classes for an unknown one
        with _driver_kv_kept():
            node = cluster.add_node(wait=True, **self._class_node_args(name))
        return node.node_id

    def remove_node(self, node_id: str, allow_graceful: bool = True) -> None:
        """Stop one GPU node (by hex id), as if its machine went away. The head cannot be removed."""
        cluster = self._require()
        if cluster.head_node is not None and cluster.head_node.node_id == node_id:
            raise ValueError("the head node cannot be removed from a running simulated cluster; use shutdown()")
        for node in list(cluster.worker_nodes):
            if node.node_id == node_id:
                with _driver_kv_kept():
                    cluster.remove_node(node, allow_graceful=allow_graceful)
                return
        raise KeyError(f"no node {node_id} in this simulated cluster")

    # --- internals ---------------------------------------------------------------------------

    def _require(self):
        if self._cluster is None:
            raise RuntimeError("simulated cluster is not running; call start() or use it in a `with` block")
        return self._cluster

    def _head_args(self) -> dict:
        return dict(
            node_ip_address=LOOPBACK,
            num_cpus=self.head_cpus,
            num_gpus=0,
            resources={HEAD_RESOURCE: 1},
            object_store_memory=self.object_store_memory,
            include_dashboard=self.dashboard,
            # Ray's default 8265 may be taken by another Ray on this machine; a taken port would
            # leave the cluster without its API server (job submission) and log an error.
            dashboard_host=LOOPBACK,
            dashboard_port=free_port(),
            # the head's dashboard agent serves the Jobs API; Ray's fixed 52365 may be another Ray's
            dashboard_agent_listen_port=free_port(),
        )

    def _class_node_args(self, name: str) -> dict:
        return dict(
            node_ip_address=LOOPBACK,
            num_cpus=self.node_cpus,
            num_gpus=1,
            resources={self.classes[name].resource: 1},
            object_store_memory=self.object_store_memory,
            env_vars=dict(FAKE_GPU_ENV),
        )

    def _enter_loopback(self) -> None:
        """Make Ray resolve local addresses to 127.0.0.1 here and in the processes started from here."""
        from ray._private import ray_constants

        var, value = next(iter(LOOPBACK_ENV.items()))
        self._saved = {"env": os.environ.get(var), "enable_cluster": ray_constants.ENABLE_RAY_CLUSTER}
        os.environ[var] = value
        # Read once when Ray was imported; Ray consults it when resolving "127.0.0.1:PORT".
        ray_constants.ENABLE_RAY_CLUSTER = False

    def _leave_loopback(self) -> None:
        if not self._saved:
            return
        from ray._private import ray_constants

        var = next(iter(LOOPBACK_ENV))
        if self._saved["env"] is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = self._saved["env"]
        ray_constants.ENABLE_RAY_CLUSTER = self._saved["enable_cluster"]
        self._saved = {}


@contextlib.contextmanager
def _driver_kv_kept():
    """Start or stop nodes without repointing this process's internal KV client at them.

    Ray points `ray.experimental.internal_kv` of the *calling* process at the GCS of every node it
    starts here. If this process is connected to another cluster (say a test session's shared
    one), its KV traffic (Serve, runtime envs) would silently go to this one, and fail once it
    is shut down. Put back whatever was there, or nothing.
    """
    from ray.experimental import internal_kv

    was = internal_kv.global_gcs_client
    try:
        yield
    finally:
        if was is not None:
            internal_kv._initialize_internal_kv(was)
        else:
            internal_kv._internal_kv_reset()
