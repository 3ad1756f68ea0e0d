"""How a machine joins the farm: the `ray start` line for its GPUs, and `i2v-farm join`.

A GPU node advertises one unit of its class resource per GPU next to `--num-gpus`
(`ray start --address=HEAD:6379 --num-gpus=1 --resources='{"vram_24gb": 1}'`); a worker
replica asks for `num_gpus: 1` plus its class resource, so Ray places it on a GPU of that class.
The head node advertises `i2v_head` (the job manager lives there) and, if it has GPUs, their
class resources too.

    i2v-farm join                       the line that starts the head node on this machine
    i2v-farm join --head HOST[:PORT]    the line that joins this machine to that head

Ray's token authentication is on (`RAY_AUTH_MODE=token`): every node of the farm reads the one
cluster token from a 0600 file (`RAY_AUTH_TOKEN_PATH`). The head's line points at the farm's
token file (created here if missing); a worker's at a copy of it, which the operator copies from
the head with mode 0600. The token itself is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence

from . import ray_auth
from .gpus import LocalGpu, detect_gpus
from .vram_classes import CLASS_MEMORY_TOLERANCE, HEAD_RESOURCE, ClassSet, VramClass, default_classes, parse_classes

DEFAULT_PORT = 6379
CLASSES_ENV = "I2V_CLASSES"
#: Settings of serving/config.py that say where the farm's Ray token lives (read here without
#: importing serving: `cluster` does not depend on it).
TOKEN_FILE_ENV = "I2V_RAY_TOKEN_FILE"
JOB_DB_ENV = "I2V_JOB_DB"
RAY_AUTH_ENV = "I2V_RAY_AUTH"
DEFAULT_JOB_DB = "./outputs/jobs.sqlite3"


def default_token_file(env: dict[str, str] | None = None) -> str:
    """Where the farm keeps its Ray token: `$I2V_RAY_TOKEN_FILE`, else `ray_token` beside the job
    store (`$I2V_JOB_DB`, default ./outputs/jobs.sqlite3), as `i2v-farm up` does; absolute."""
    env = os.environ if env is None else env
    if env.get(TOKEN_FILE_ENV):
        return os.path.abspath(os.path.expanduser(env[TOKEN_FILE_ENV]))
    job_db = env.get(JOB_DB_ENV) or DEFAULT_JOB_DB
    return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(job_db))), ray_auth.TOKEN_FILE_NAME)


def classes_from_env() -> ClassSet:
    """The farm's VRAM classes: `$I2V_CLASSES` (JSON) if set, else the defaults."""
    text = os.environ.get(CLASSES_ENV, "").strip()
    return parse_classes(text) if text else default_classes()


def classify(gpus: Sequence[LocalGpu], classes: ClassSet) -> list[tuple[LocalGpu, VramClass]]:
    """Each GPU with the largest class it can serve; ValueError for a GPU below the smallest class."""
    smallest = classes.classes[0]
    pairs = []
    for gpu in gpus:
        cls = classes.for_memory(gpu.memory_bytes)
        if cls is None:
            raise ValueError(
                f"{gpu.describe()} is smaller than the smallest VRAM class {smallest.name} "
                f"({smallest.memory_gib:g} GiB, served from {smallest.memory_gib * CLASS_MEMORY_TOLERANCE:.1f} GiB); "
                "leave it out of the farm by hiding it with CUDA_VISIBLE_DEVICES, "
                f"or configure a smaller class in ${CLASSES_ENV}"
            )
        pairs.append((gpu, cls))
    return pairs


def head_address_with_port(address: str) -> str:
    """`HOST` -> `HOST:6379`; `HOST:PORT` and `[v6]:PORT` as given."""
    address = address.strip()
    if not address or any(c.isspace() for c in address) or "'" in address:
        raise ValueError(f"head address {address!r} is not HOST or HOST:PORT")
    if address.startswith("["):  # [::1]:6379
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    host, sep, port = address.rpartition(":")
    if not sep:
        return f"{address}:{DEFAULT_PORT}"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"head address {address!r} is not HOST or HOST:PORT")
    return address


def _resources_flag(resources: dict[str, int]) -> str:
    return "--resources='" + json.dumps(resources) + "'"


def ray_start_command(gpus: Sequence[LocalGpu], classes: ClassSet, head_address: str | None,
                      token_file: str | None = None) -> str:
    """The `ray start` line that brings this machine into the farm.

    `head_address` None: the head node's line (`i2v_head`, plus class resources for its GPUs).
    Otherwise the worker line joining that head (`HOST` gets port 6379). A worker needs at least
    one GPU; any GPU below the smallest class raises ValueError naming it. A machine with GPUs of
    different classes gets one resource key per class and comment lines (`# ...`) above the
    command explaining that Ray cannot tie a class to a particular GPU index. The command itself
    is always the last line. With `token_file` the command starts with
    `RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=FILE` (Ray's token authentication, the token in FILE).
    """
    comments: list[str] = []
    if head_address is None and gpus and all(classes.for_memory(g.memory_bytes) is None for g in gpus):
        # A head is a CPU role; a small GPU there is simply not offered to the farm.
        comments.append(
            "# " + ", ".join(g.describe() for g in gpus)
            + f" is smaller than the smallest VRAM class {classes.classes[0].name}; not offered to the farm"
        )
        gpus = []
        no_gpu_flag = ["--num-gpus=0"]
    else:
        no_gpu_flag = []
    pairs = classify(gpus, classes)
    per_class = Counter(cls.name for _, cls in pairs)
    resources = {classes[name].resource: per_class[name] for name in classes.names if name in per_class}

    if head_address is None:
        parts = ["ray start --head", f"--port={DEFAULT_PORT}"]
        if pairs:
            parts.append(f"--num-gpus={len(pairs)}")
        parts += no_gpu_flag
        parts.append(_resources_flag({HEAD_RESOURCE: 1, **resources}))
    else:
        if not pairs:
            raise ValueError("this machine has no NVIDIA GPU to offer; a worker node needs at least one")
        parts = ["ray start", f"--address={head_address_with_port(head_address)}",
                 f"--num-gpus={len(pairs)}", _resources_flag(resources)]

    if len(per_class) > 1:
        comments += _mixed_node_warning(pairs, classes, head_address)
    if token_file:
        parts.insert(0, _shell_env(token_file))
    return "\n".join([*comments, " ".join(parts)])


def _shell_env(token_file: str) -> str:
    import shlex

    return f"{ray_auth.MODE_VAR}=token {ray_auth.PATH_VAR}={shlex.quote(token_file)}"


def token_instructions(token_file: str, head_address: str | None, created: bool) -> list[str]:
    """What the operator does so this node has the cluster token (comment lines, no token)."""
    if head_address is None:
        return [
            f"# Ray token authentication: the cluster token is in {token_file} (mode 0600"
            + (", created now" if created else "") + "); never share it in a chat or a repository.",
            "# Every GPU node needs a copy (mode 0600); shells that run `ray job submit` / `serve deploy` / "
            "`ray status`",
            f"# against this head need: {_shell_env(token_file)}",
        ]
    where = f"{token_file}" if os.path.exists(token_file) else f"{token_file} (not there yet)"
    return [
        f"# Ray token authentication: this node needs the head's cluster token in {where}.",
        "# Copy it from the head with mode 0600, e.g.:",
        f"#   umask 077; mkdir -p {shlex_quote(os.path.dirname(token_file))}",
        f"#   scp HEAD:PATH/ray_token {shlex_quote(token_file)} && chmod 600 {shlex_quote(token_file)}",
        "# (PATH: the directory of the head's job store, or what `i2v-farm join` printed there).",
    ]


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _mixed_node_warning(pairs, classes: ClassSet, head_address: str | None) -> list[str]:
    by_class: dict[str, list[int]] = {}
    for gpu, cls in pairs:
        by_class.setdefault(cls.name, []).append(gpu.index)
    lines = [
        "# WARNING: this machine has GPUs of different classes ("
        + ", ".join(f"{name}: GPU {','.join(map(str, idx))}" for name, idx in by_class.items()) + ").",
        "# Ray hands out GPU indices and custom resources separately, so a replica holding",
        "# a vram_<large> unit may be given a small GPU. To pin classes to GPUs, run one raylet per",
        "# class, each seeing only its GPUs (one container per class is simplest; two raylets on one",
        "# host also need their own ports), e.g.:",
    ]
    if head_address is None:  # a GPU-less head, then the GPUs join it from this same machine
        lines.append(f"#   ray start --head --port={DEFAULT_PORT} --num-gpus=0 {_resources_flag({HEAD_RESOURCE: 1})}")
        target = f"--address=THIS_HOST:{DEFAULT_PORT}"
    else:
        target = f"--address={head_address_with_port(head_address)}"
    for name in classes.names:
        if name in by_class:
            idx = by_class[name]
            lines.append(
                f"#   CUDA_VISIBLE_DEVICES={','.join(map(str, idx))} ray start {target} "
                f"--num-gpus={len(idx)} {_resources_flag({classes[name].resource: len(idx)})}"
            )
    lines.append("# or advertise every GPU here as the smallest class present.")
    return lines


# --- `i2v-farm join` -------------------------------------------------------------------------

def add_join_command(subparsers, detect: Callable[[], list[LocalGpu]] | None = None) -> argparse.ArgumentParser:
    """Register `i2v-farm join [--head HOST[:PORT]]` on an argparse subparsers object.

    `detect` lists this machine's GPUs (default: `cluster.join.detect_gpus`, looked up when the
    command runs, so tests may monkeypatch it). `args.func(args)` returns the exit status.
    """
    parser = subparsers.add_parser(
        "join",
        help="print the `ray start` line that brings this machine into the farm",
        description="Detect this machine's NVIDIA GPUs, map each to a VRAM class and print the "
        "`ray start` line to run here: without --head, the head node's line; with --head, the "
        f"line that joins this GPU machine to that head. Classes: ${CLASSES_ENV} (JSON) or the defaults.",
    )
    parser.add_argument("--head", metavar="HOST[:PORT]",
                        help=f"address of the running head node (port {DEFAULT_PORT} if left out)")
    parser.add_argument("--token-file", metavar="PATH",
                        help=f"the Ray cluster token file (default ${TOKEN_FILE_ENV}, else ray_token beside "
                             f"${JOB_DB_ENV}, ./outputs/ray_token); the head's is created if missing")
    parser.set_defaults(func=lambda args: cmd_join(args, detect))
    return parser


def cmd_join(args: argparse.Namespace, detect: Callable[[], list[LocalGpu]] | None = None) -> int:
    try:
        classes = classes_from_env()
    except ValueError as exc:
        return _error(f"${CLASSES_ENV} is not a valid list of VRAM classes: {exc}")
    gpus = (detect or detect_gpus)()
    role = "head node" if args.head is None else f"worker joining {args.head}"

    if gpus:
        print(f"GPUs on this machine ({len(gpus)}):")
        for gpu in gpus:
            cls = classes.for_memory(gpu.memory_bytes)
            label = f"class {cls.name}" if cls else f"too small (smallest class: {classes.classes[0].name})"
            print(f"  {gpu.index}  {gpu.name}  {gpu.memory_gib:.1f} GiB  {label}")
    elif args.head is not None:
        return _error(
            "no NVIDIA GPU found on this machine (nvidia-smi and torch.cuda see none), so it has nothing "
            "to offer as a worker; run this on a GPU machine, or run `i2v-farm join` without --head "
            "to start the head node here"
        )
    else:
        print("No NVIDIA GPU on this machine: the head node offers no GPU (workers join it).")

    auth = os.environ.get(RAY_AUTH_ENV, "token").strip().lower() != "off"
    token_file = os.path.abspath(os.path.expanduser(args.token_file)) if getattr(args, "token_file", None) \
        else default_token_file()
    try:
        line = ray_start_command(gpus, classes, args.head, token_file=token_file if auth else None)
    except ValueError as exc:
        return _error(str(exc))
    if auth:
        created = False
        if args.head is None and not os.path.exists(token_file):
            try:
                ray_auth.ensure_token_file(token_file)
            except (OSError, ValueError) as exc:
                return _error(f"cannot create the Ray cluster token file {token_file}: {exc}")
            created = True
        for note in token_instructions(token_file, args.head, created):
            print(note)
    else:
        print(f"# WARNING: ${RAY_AUTH_ENV}=off: " + ray_auth.OFF_WARNING)
    private = " (umask 077: Ray's files private):" if auth else ":"
    print(f"Run this on this machine to start it as the {role}" + private)
    *notes, command = line.splitlines()
    for note in notes:
        print(note)
    print(("umask 077; " if auth else "") + command)
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
