"""The NVIDIA GPUs of this machine, found without needing CUDA.

`detect_gpus()` asks `nvidia-smi` (it ships with the driver, so it is there on any GPU node even
when this environment has a CPU-only torch) and falls back to `torch.cuda` when `nvidia-smi` is
missing but torch has CUDA. A machine with neither has no GPUs: `[]`, never an error.

`CUDA_VISIBLE_DEVICES` narrows the list as it narrows what Ray and CUDA see, so
`CUDA_VISIBLE_DEVICES=0 i2v-farm join ...` describes one GPU of a mixed machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3

#: What `detect_gpus` asks nvidia-smi for; `parse_nvidia_smi` reads the answer.
NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits")
NVIDIA_SMI_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class LocalGpu:
    """One GPU of this machine: its index (as nvidia-smi and CUDA count), name and total memory."""

    index: int
    name: str
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def describe(self) -> str:
        return f"GPU {self.index} ({self.name}, {self.memory_gib:.1f} GiB)"


def parse_nvidia_smi(text: str) -> list[LocalGpu]:
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`.

    Each line is `index, name, MiB`. A name may itself hold commas, so the index is the first field
    and the memory the last. Lines that do not parse (`[N/A]` memory, warnings) are skipped with a
    log message rather than failing the whole machine.
    """
    gpus: list[LocalGpu] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            logger.warning("nvidia-smi: ignoring line %r (expected index, name, memory)", line)
            continue
        index, name, memory = fields[0], ", ".join(fields[1:-1]), fields[-1]
        try:
            gpus.append(LocalGpu(index=int(index), name=name, memory_bytes=int(float(memory) * MiB)))
        except ValueError:
            logger.warning("nvidia-smi: ignoring line %r (index or memory is not a number)", line)
    return gpus


def _query_nvidia_smi() -> list[LocalGpu] | None:
    """GPUs per nvidia-smi; None when nvidia-smi is missing or fails (then torch may know)."""
    exe = shutil.which(NVIDIA_SMI_QUERY[0])
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *NVIDIA_SMI_QUERY[1:]], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi did not answer: %s", exc)
        return None
    if out.returncode != 0:
        # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
        logger.warning("nvidia-smi failed (status %d): %s", out.returncode, (out.stderr or out.stdout).strip())
        return None
    return parse_nvidia_smi(out.stdout)


def _query_torch() -> list[LocalGpu]:
    """GPUs per torch.cuda (indices as CUDA numbers them, i.e. already after CUDA_VISIBLE_DEVICES)."""
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(LocalGpu(index=i, name=props.name, memory_bytes=int(props.total_memory)))
        return gpus
    except Exception as exc:  # a broken driver must not break `join`
        logger.warning("torch.cuda could not list GPUs: %s", exc)
        return []


def visible(gpus: list[LocalGpu], cuda_visible_devices: str | None) -> list[LocalGpu]:
    """The GPUs `CUDA_VISIBLE_DEVICES` leaves visible (unset: all; empty: none).

    Only numeric entries can be matched against nvidia-smi indices; a list of UUIDs (`GPU-...`) or
    MIG ids is not narrowed (with a warning), since this query does not report them.
    """
    if cuda_visible_devices is None:
        return list(gpus)
    entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
    if not entries:
        return []
    if not all(e.lstrip("-").isdigit() for e in entries):
        logger.warning("CUDA_VISIBLE_DEVICES=%s names GPUs by UUID; listing every GPU", cuda_visible_devices)
        return list(gpus)
    by_index = {g.index: g for g in gpus}
    chosen = []
    for e in entries:
        i = int(e)
        if i < 0:  # CUDA stops at the first invalid entry
            break
        if i in by_index:
            chosen.append(by_index[i])
    return chosen


def detect_gpus() -> list[LocalGpu]:
    """The NVIDIA GPUs of this machine that `CUDA_VISIBLE_DEVICES` leaves visible ([] if none)."""
    found = _query_nvidia_smi()
    if found is not None:
        return visible(found, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return _query_torch()
