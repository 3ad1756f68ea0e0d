"""VRAM classes: the GPU sizes a farm is made of, as configuration.

A class has a name (`12gb`), the GPU memory its jobs may plan for, the Ray custom resource its
nodes advertise (one unit per GPU, `vram_12gb`) and the GPU the cost model times its jobs on.
Worker deployments ask for `num_gpus: 1` plus their class resource, so Ray places a replica only
on a node of that class. A job may spill up from its class to the classes in `spill_to`
(default: every larger class), never down.

`I2V_CLASSES` (or the settings file) replaces the defaults with a JSON list of objects with the
fields of `VramClass`, e.g. `[{"name": "16gb", "memory_gib": 16, "gpu": "rtx4090-24gb"}]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.cost_model import GPUS, GiB, GpuSpec

#: The Ray custom resource every node of a class advertises, one unit per GPU.
RESOURCE_PREFIX = "vram_"
#: A resource only the head node advertises: the job manager (and its durable store) live there.
HEAD_RESOURCE = "i2v_head"
#: A GPU reporting at least this fraction of a class's memory belongs to that class.
CLASS_MEMORY_TOLERANCE = 0.93


class VramClass(BaseModel):
    """One GPU size class of the farm."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", description="Class name, e.g. `12gb`.")
    memory_gib: float = Field(gt=0, le=4096, description="GPU memory a job of this class may plan for (GiB).")
    gpu: str = Field(description="Cost-model GPU (`pipeline.cost_model.GPUS`) that times this class's jobs.")
    spill_to: tuple[str, ...] | None = Field(
        None, description="Classes that may take this class's jobs when it is backed up (default: all larger)."
    )

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in GPUS:
            raise ValueError(f"unknown GPU {value!r}; known: {', '.join(sorted(GPUS))}")
        return value

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    @property
    def resource(self) -> str:
        """Ray custom resource name of this class (`vram_12gb`)."""
        return RESOURCE_PREFIX + self.name

    @property
    def gpu_spec(self) -> GpuSpec:
        return GPUS[self.gpu]

    @property
    def deployment(self) -> str:
        """Name of this class's Serve worker deployment (`Worker_12gb`)."""
        return "Worker_" + self.name


DEFAULT_CLASSES: tuple[VramClass, ...] = (
    VramClass(name="12gb", memory_gib=12, gpu="rtx3060-12gb"),
    VramClass(name="24gb", memory_gib=24, gpu="rtx4090-24gb"),
    VramClass(name="40gb", memory_gib=40, gpu="a100-40gb"),
    VramClass(name="80gb", memory_gib=80, gpu="h100-80gb"),
)


class ClassSet:
    """An ordered (smallest memory first) set of classes with spill rules resolved."""

    def __init__(self, classes: Iterable[VramClass]):
        ordered = sorted(classes, key=lambda c: (c.memory_gib, c.name))
        names = [c.name for c in ordered]
        if not ordered:
            raise ValueError("at least one VRAM class is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate VRAM class names: {names}")
        self.classes: tuple[VramClass, ...] = tuple(ordered)
        self._by_name = {c.name: c for c in ordered}
        self.spill: dict[str, tuple[str, ...]] = {}
        for c in ordered:
            larger = [o.name for o in ordered if o.memory_gib > c.memory_gib]
            if c.spill_to is None:
                self.spill[c.name] = tuple(larger)
            else:
                for target in c.spill_to:
                    if target not in self._by_name:
                        raise ValueError(f"class {c.name}: spill_to names unknown class {target!r}")
                    if target not in larger:
                        raise ValueError(f"class {c.name}: may only spill up, not to {target!r}")
                self.spill[c.name] = tuple(n for n in larger if n in c.spill_to)

    def __iter__(self):
        return iter(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, name: str) -> VramClass:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown VRAM class {name!r}; classes: {', '.join(self.names)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def subset(self, names: Iterable[str]) -> "ClassSet":
        wanted = set(names)
        return ClassSet(
            c.model_copy(update={"spill_to": tuple(t for t in self.spill[c.name] if t in wanted)})
            for c in self.classes
            if c.name in wanted
        )

    def for_memory(self, total_bytes: int) -> VramClass | None:
        """The largest class a GPU with `total_bytes` of memory can serve (None: too small).

        Cards report less than their label (a 24 GB RTX 4090: 23.99 GiB; an 80 GB H100: 79.6 GiB;
        the datacenter 24 GB A10G and L4 with ECC: 22.49 GiB), so a class counts as served down
        to 93% of its nominal size. The largest fp16 job (1024p x 32 frames, ~20.4 GiB) still fits
        those cards.
        """
        fitting = [c for c in self.classes if c.memory_bytes * CLASS_MEMORY_TOLERANCE <= total_bytes]
        return fitting[-1] if fitting else None


def parse_classes(text: str | Sequence[dict]) -> ClassSet:
    """Classes from JSON text (or already-parsed objects)."""
    data = json.loads(text) if isinstance(text, str) else text
    if not isinstance(data, list):
        raise ValueError("VRAM classes must be a JSON list of objects")
    return ClassSet(VramClass.model_validate(item) for item in data)


def default_classes() -> ClassSet:
    return ClassSet(DEFAULT_CLASSES)


def parse_simulate(spec: str, classes: ClassSet | None = None) -> dict[str, int]:
    """`"12gb:2,24gb:1"` -> `{"12gb": 2, "24gb": 1}` (GPU nodes per class), checked against `classes`."""
    classes = classes or default_classes()
    counts: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, count = part.partition(":")
        name = name.strip()
        if name not in classes:
            raise ValueError(f"--simulate: unknown VRAM class {name!r}; classes: {', '.join(classes.names)}")
        try:
            n = int(count) if sep else 1
        except ValueError:
            raise ValueError(f"--simulate: {part!r} is not CLASS:COUNT (e.g. 12gb:2)") from None
        if not 0 < n <= 64:
            raise ValueError(f"--simulate: node count for {name} must be 1-64, got {n}")
        if name in counts:
            raise ValueError(f"--simulate: class {name} given twice")
        counts[name] = n
    if not counts:
        raise ValueError("--simulate: give at least one CLASS:COUNT, e.g. 12gb:2,24gb:1")
    return counts
