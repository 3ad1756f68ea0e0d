"""GPU workers of the compose farm: the plan for this host's GPUs, and one worker's `ray start`.

    python deploy/compose/gpu_worker.py plan          this host's GPUs, their VRAM classes, and the
                                                      lines for .env and deploy/serve-config.yaml
    python deploy/compose/gpu_worker.py start CLASS   join the head as a node of CLASS with the GPUs
                                                      in CUDA_VISIBLE_DEVICES (the gpu-<class> services)

Each gpu-<class> service runs one raylet for the GPUs of ONE class (its CUDA_VISIBLE_DEVICES,
from GPUS_<CLASS> in .env): Ray hands out GPU indices and custom resources separately, so a raylet
holding GPUs of two classes could give a 24gb replica a 12 GB card (`i2v-farm join` explains).
`start` refuses a GPU smaller than the class, says when one could serve a larger class, then
replaces itself with

    ray start --address=ray-head:6379 --num-gpus=N --resources='{"vram_CLASS": N}' --block ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: the project's packages are two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.gpus import LocalGpu, detect_gpus  # noqa: E402
from cluster.join import classes_from_env  # noqa: E402
from cluster.vram_classes import CLASS_MEMORY_TOLERANCE, ClassSet  # noqa: E402

HEAD_ENV = "RAY_HEAD_ADDRESS"
DEFAULT_HEAD = "ray-head:6379"
METRICS_PORT = 8080  # Prometheus finds every node's metrics agent here (Ray's service-discovery file)


def env_name(class_name: str) -> str:
    """The .env variable holding a class's GPU indices: `24gb` -> `GPUS_24GB`."""
    return "GPUS_" + class_name.upper().replace("-", "_")


def start_command(
    class_name: str, gpus: Sequence[LocalGpu], classes: ClassSet, head: str
) -> tuple[list[str], list[str]]:
    """(`ray start` argv, notes) for a worker of `class_name` holding `gpus`; ValueError if they do not fit."""
    cls = classes[class_name]
    if not gpus:
        raise ValueError(
            f"no GPU visible to this container (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): "
            f"set {env_name(class_name)} in deploy/compose/.env to this class's GPU indices (`docker compose run "
            "--rm gpu-plan` lists them) and check the NVIDIA Container Toolkit (`docker run --rm --gpus all "
            "ubuntu nvidia-smi`)"
        )
    notes = []
    floor = cls.memory_bytes * CLASS_MEMORY_TOLERANCE
    for gpu in gpus:
        if gpu.memory_bytes < floor:
            raise ValueError(
                f"{gpu.describe()} is too small for class {cls.name} ({cls.memory_gib:g} GiB, served from "
                f"{floor / 2**30:.1f} GiB): its jobs would run out of memory. Give it to the class "
                f"`docker compose run --rm gpu-plan` names for it, or leave it out of {env_name(class_name)}"
            )
        best = classes.for_memory(gpu.memory_bytes)
        if best is not None and best.memory_bytes > cls.memory_bytes:
            notes.append(f"note: {gpu.describe()} could serve class {best.name}; it serves {cls.name} here")
    n = len(gpus)
    argv = [
        "ray", "start", f"--address={head}", f"--num-gpus={n}",
        "--resources=" + json.dumps({cls.resource: n}),
        f"--metrics-export-port={METRICS_PORT}", "--block",
    ]
    return argv, notes


def plan(gpus: Sequence[LocalGpu], classes: ClassSet) -> str:
    """What to put in .env and serve-config.yaml for these GPUs (each in the largest class it holds)."""
    if not gpus:
        return ("No NVIDIA GPU is visible here. Install the NVIDIA driver and the NVIDIA Container Toolkit, "
                "then check `docker run --rm --gpus all ubuntu nvidia-smi`.\n")
    lines = ["GPUs on this host:"]
    by_class: dict[str, list[int]] = {}
    for gpu in gpus:
        cls = classes.for_memory(gpu.memory_bytes)
        label = f"class {cls.name}" if cls else f"below the smallest class {classes.classes[0].name}: not used"
        lines.append(f"  {gpu.index}  {gpu.name}  {gpu.memory_gib:.1f} GiB  {label}")
        if cls:
            by_class.setdefault(cls.name, []).append(gpu.index)
    if not by_class:
        return "\n".join(lines) + "\nNone of them can serve a VRAM class.\n"
    names = [c.name for c in classes if c.name in by_class]
    lines += ["", "deploy/compose/.env:", f"  COMPOSE_PROFILES={','.join(names)}"]
    lines += [f"  {env_name(name)}={','.join(map(str, by_class[name]))}" for name in names]
    lines += ["", "deploy/serve-config.yaml (applications[0].args.workers; one replica per GPU):", "  workers:"]
    lines += [f"    {name}: {{min_replicas: {len(by_class[name])}, max_replicas: {len(by_class[name])}}}"
              for name in names]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, detect: Callable[[], list[LocalGpu]] = detect_gpus,
         execvp: Callable[[str, list[str]], object] = os.execvp) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="this host's GPUs and the .env / serve-config lines for them")
    start = sub.add_parser("start", help="join the head as a GPU node of CLASS")
    start.add_argument("vram_class", metavar="CLASS")
    args = parser.parse_args(argv)
    try:
        classes = classes_from_env()
        if args.command == "plan":
            print(plan(detect(), classes), end="")
            return 0
        command, notes = start_command(args.vram_class, detect(), classes, os.environ.get(HEAD_ENV, DEFAULT_HEAD))
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(note, file=sys.stderr)
    print("starting: " + " ".join(command), flush=True)
    execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
