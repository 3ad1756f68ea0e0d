"""Probing a running Ray cluster the way an attacker on the network would (tests only).

- `listening_sockets(pids)`: every TCP socket in LISTEN state owned by these processes or their
  descendants (Ray's GCS, raylets, agents and workers are children of the process that started
  the cluster), with its bound address.
- `asgi_probe(port, marker, token)`: what Ray Serve sends between deployments, to a port: a
  `ray.serve.ASGIService/HandleRequest` call whose `pickled_request_metadata` is a pickle that,
  once unpickled, creates the directory `marker` (harmless, and proof that code ran). Without
  `token` Ray's token authentication must refuse it (`UNAUTHENTICATED`) before unpickling.
- `grpc_status(port, method, token)`: one empty unary call, for the services Ray's own gRPC
  servers have (`RAY_SERVICES`), to tell which servers check the token.

Every connection goes to 127.0.0.1 (a socket bound to all interfaces is reached there too).
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import time
from dataclasses import dataclass

import grpc
import psutil

LOOPBACK = "127.0.0.1"
ASGI_METHOD = "/ray.serve.ASGIService/HandleRequest"
#: One method of each gRPC service Ray's processes serve (an empty request is valid for each).
RAY_SERVICES = {
    "gcs": "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "raylet": "/ray.rpc.NodeManagerService/GetNodeStats",
    "object_manager": "/ray.rpc.ObjectManagerService/Pull",
    "core_worker": "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "dashboard_agent": "/ray.rpc.ReporterService/GetTraceback",
    "serve_replica": ASGI_METHOD,
}
#: Answers that mean "nothing of this request ran": refused for want of the token, no such method
#: on that server, or not a gRPC server at all (an HTTP port, a closed port).
REFUSED = {"UNAUTHENTICATED", "UNIMPLEMENTED", "UNAVAILABLE"}


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.ip)

    def __str__(self) -> str:
        return f"{self.name}[{self.pid}] {self.ip}:{self.port}"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x (an IPv6 socket for an IPv4 loopback address)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def process_tree(pids) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def listening_sockets(pids) -> list[Listener]:
    found = []
    for proc in process_tree(pids):
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:  # exited meanwhile
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.append(Listener(proc.pid, name, c.laddr.ip, c.laddr.port))
    return sorted(set(found), key=lambda l: (l.port, l.pid))


class MakeDir:
    """Unpickled, it calls `os.mkdir(path)`: the harmless payload of the probes."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _metadata(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else None


def grpc_status(port: int, method: str, token: str | None = None, payload: bytes = b"", timeout: float = 5) -> str:
    """The status name of one unary call (`OK` if it succeeded)."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, timeout=timeout, metadata=_metadata(token))
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def asgi_payload(marker: str) -> bytes:
    from ray.serve.generated.serve_pb2 import ASGIRequest

    return ASGIRequest(pickled_request_metadata=pickle.dumps(MakeDir(marker))).SerializeToString()


def asgi_probe(port: int, marker: str, token: str | None = None) -> str:
    """Send Serve's inter-deployment request carrying the marker pickle; the status name."""
    return grpc_status(port, ASGI_METHOD, token, asgi_payload(marker))


def session_dirs(pids) -> set[str]:
    """Ray session directories (`--session-dir=`) of the processes in these trees (their logs/)."""
    found = set()
    for proc in process_tree(pids):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        found |= {arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--session-dir=")}
    return found


def files_holding(needle: str, roots) -> list[str]:
    """Files under `roots` whose bytes contain `needle` (for "the token is in no log")."""
    data = needle.encode()
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    if not os.path.islink(path) and os.path.isfile(path):
                        with open(path, "rb") as f:
                            if data in f.read():
                                hits.append(path)
                except OSError:  # sockets, files rotated away meanwhile
                    continue
    return hits


def cmdlines_holding(needle: str, pids) -> list[str]:
    """Processes of these trees whose command line (visible to every user in `ps`) holds `needle`."""
    hits = []
    for proc in process_tree(pids):
        try:
            if any(needle in arg for arg in proc.cmdline()):
                hits.append(f"{proc.name()}[{proc.pid}]")
        except psutil.Error:
            continue
    return hits


def assert_no_exposed_port_runs_code(pids, workdir, token: str, deployments=("FarmApi", "JobManager", "Worker"),
                                     settle_s: float = 2.0) -> list[Listener]:
    """The attacker's test: every socket of these process trees not bound to loopback gets Serve's
    inter-deployment request with a marker pickle, without a token and with a wrong one; each must
    refuse it (a Serve replica: UNAUTHENTICATED) and no marker may appear. Positive control: the
    same request with `token` makes each replica unpickle it (its marker appears), so this fails
    if Ray's token check were off. Returns the exposed listeners."""
    exposed = [l for l in listening_sockets(pids) if not l.loopback]
    names = " ".join(l.name for l in exposed)
    for deployment in deployments:  # Ray binds each replica's gRPC server to [::]:0
        assert deployment in names, f"no exposed socket of a {deployment} replica among {[str(l) for l in exposed]}"
    markers, answers = [], {}
    for i, listener in enumerate(exposed):
        for label, credential in (("none", None), ("wrong", "0" * 64)):
            marker = os.path.join(workdir, f"unauth-{label}-{i}")
            markers.append(marker)
            answers[f"{listener} {label}"] = status = asgi_probe(listener.port, marker, credential)
            assert status in REFUSED, f"{listener} answered {status} to an unauthenticated pickle"
            if "ServeReplica" in listener.name:
                assert status == "UNAUTHENTICATED", (str(listener), status)
    time.sleep(settle_s)  # a late unpickle would show up now
    ran = [m for m in markers if os.path.exists(m)]
    assert ran == [], f"code ran without the token: {ran} ({answers})"

    for i, listener in enumerate(l for l in exposed if "ServeReplica" in l.name):
        marker = os.path.join(workdir, f"control-{i}")
        status = asgi_probe(listener.port, marker, token)
        assert status != "UNAUTHENTICATED" and os.path.isdir(marker), (str(listener), status)
    return exposed
