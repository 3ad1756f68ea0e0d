"""Workloads for the fleet simulator: who submits what, and when.

A `Trace` is a list of arrivals sorted by time: `t` (seconds from the start), `caller` (the
token's name), `kind` (`interactive` or `batch`), `priority`, the request fields (the same as
`POST /v1/jobs` takes: `preset`, `resolution`, `num_frames`, ...), the input image's size and a
`vram_factor` (the job's true peak VRAM over the cost model's estimate, like the `sim` model's
`sim_vram_factor`). Built-in traces are deterministic for a seed:

- `day`: 24 hours. Interactive callers (300 people, a few of them busy) arrive with a diurnal
  rate (night 10% of the 14:30 peak); their requests follow the original WebUI's modes (fast 30%,
  standard 50%, high 20%; 512p mostly, some 768p and 1024p; square, landscape and portrait
  images). Batch callers (6 teams) drop manifests of 500-5,000 rows at `low` or `normal`
  priority about once an hour; all rows of a manifest arrive at once. `hours` < 24 keeps the
  busiest `hours` around the peak.
- `burst`: one hour of light interactive load, a 3,000-row batch at 5 minutes and ten times the
  interactive rate from minute 20 to 30.
- `steady`: a constant interactive rate and a 1,000-row `low` batch every 20 minutes.

A JSONL file has one arrival per line: `{"t": 0.5, "caller": "alice", "priority": "normal",
"preset": "fast", ...}`; optional `kind` (default `interactive`), `image_width` and
`image_height` (default 512), `vram_factor` (default 1.0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InvalidRequest
from pipeline.request import GenerationParams, parse_params

BUILTIN = ("day", "burst", "steady")
KINDS = ("interactive", "batch")
_ARRIVAL_KEYS = ("t", "caller", "kind", "priority", "image_width", "image_height", "vram_factor")

# The original WebUI's modes and how often people pick them (docs/fleet.md).
PRESET_MIX = {"fast": 0.30, "standard": 0.50, "high": 0.20}
RESOLUTION_MIX = {  # per preset: the resolution people ask for
    "fast": {"512p": 0.80, "768p": 0.15, "1024p": 0.05},
    "standard": {"512p": 0.80, "768p": 0.15, "1024p": 0.05},
    "high": {"768p": 0.90, "1024p": 0.10},
}
ASPECT_MIX = {(1024, 1024): 0.40, (1920, 1080): 0.30, (1080, 1920): 0.15, (1024, 768): 0.15}
# What teams render in batches: (preset, resolution, image size), equally likely.
BATCH_KINDS = (
    ("standard", "512p", (1024, 1024)),
    ("fast", "512p", (1920, 1080)),
    ("standard", "768p", (1024, 1024)),
    ("high", "768p", (1920, 1080)),
)
VRAM_SIGMA = 0.03  # spread of the true peak VRAM around the estimate (log-normal)


@dataclass
class Trace:
    """Arrivals in time order (parallel lists; `spec` indexes `specs`, the distinct requests)."""

    name: str
    specs: list[dict[str, Any]] = field(default_factory=list)
    t: list[float] = field(default_factory=list)
    caller: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    priority: list[str] = field(default_factory=list)
    spec: list[int] = field(default_factory=list)
    vram_factor: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.t)

    @property
    def duration(self) -> float:
        return self.t[-1] if self.t else 0.0

    def arrivals(self) -> Iterator[dict[str, Any]]:
        """Each arrival as a JSONL record."""
        for i in range(len(self.t)):
            yield {"t": round(self.t[i], 3), "caller": self.caller[i], "kind": self.kind[i],
                   "priority": self.priority[i], "vram_factor": round(self.vram_factor[i], 4),
                   **self.specs[self.spec[i]]}

    def write_jsonl(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for rec in self.arrivals():
                f.write(json.dumps(rec) + "\n")

    def _sorted(self) -> "Trace":
        order = sorted(range(len(self.t)), key=self.t.__getitem__)  # stable: rows keep their order
        for name in ("t", "caller", "kind", "priority", "spec", "vram_factor"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in order])
        return self


class _Builder:
    def __init__(self, name: str, seed: int):
        self.trace = Trace(name)
        self.rng = np.random.default_rng(seed)
        self._spec_ids: dict[str, int] = {}

    def spec_id(self, fields: dict[str, Any]) -> int:
        key = json.dumps(fields, sort_keys=True)
        if key not in self._spec_ids:
            self._spec_ids[key] = len(self.trace.specs)
            self.trace.specs.append(fields)
        return self._spec_ids[key]

    def add(self, times, caller: str | list[str], kind: str, priority: str | list[str], spec: int | list[int]):
        n = len(times)
        tr = self.trace
        tr.t.extend(float(x) for x in times)
        tr.caller.extend(caller if isinstance(caller, list) else [caller] * n)
        tr.kind.extend([kind] * n)
        tr.priority.extend(priority if isinstance(priority, list) else [priority] * n)
        tr.spec.extend(spec if isinstance(spec, list) else [spec] * n)
        tr.vram_factor.extend(np.exp(self.rng.normal(0.0, VRAM_SIGMA, n)).tolist())

    def interactive(self, rate_fn, start: float, end: float, scale: float) -> None:
        """Poisson arrivals per minute with rate `rate_fn(t)` jobs/s, people picking WebUI modes."""
        rng = self.rng
        combos, weights = [], []
        for preset, p in PRESET_MIX.items():
            for res, q in RESOLUTION_MIX[preset].items():
                for (w, h), r in ASPECT_MIX.items():
                    combos.append(self.spec_id({"preset": preset, "resolution": res,
                                                "image_width": w, "image_height": h}))
                    weights.append(p * q * r)
        weights = np.array(weights) / sum(weights)
        people = 300
        popularity = 1.0 / np.arange(1, people + 1) ** 0.8  # a few busy people, many occasional ones
        popularity /= popularity.sum()
        minute = start
        while minute < end:
            span = min(60.0, end - minute)
            n = int(rng.poisson(max(0.0, rate_fn(minute + span / 2)) * span * scale))
            if n:
                times = np.sort(minute + rng.random(n) * span)
                who = rng.choice(people, n, p=popularity)
                prio = np.where(rng.random(n) < 0.10, "high", "normal")
                specs = rng.choice(len(combos), n, p=weights)
                self.add(times - start, [f"user-{i:03d}" for i in who], "interactive", prio.tolist(),
                         [combos[i] for i in specs])
            minute += span

    def manifest(self, t: float, rows: int, team: str, priority: str, kind: int | None = None) -> None:
        preset, res, (w, h) = BATCH_KINDS[int(self.rng.integers(len(BATCH_KINDS))) if kind is None else kind]
        spec = self.spec_id({"preset": preset, "resolution": res, "image_width": w, "image_height": h})
        self.add([t] * rows, team, "batch", priority, spec)


def _diurnal(peak: float):
    """Jobs/s at second t of the day: 10% of `peak` at night, `peak` at 14:30."""

    def rate(t: float) -> float:
        h = (t / 3600.0) % 24
        bump = math.sin(math.pi * (h - 7.0) / 15.0) ** 2 if 7.0 <= h <= 22.0 else 0.0
        return peak * (0.10 + 0.90 * bump)

    return rate


def day(seed: int = 0, hours: float = 24.0, scale: float = 1.0) -> Trace:
    """The `day` trace (module docstring); `scale` multiplies every rate and manifest size."""
    _check_hours(hours, 24.0)
    b = _Builder("day", seed)
    start = min(max(0.0, 14.5 - hours / 2), 24.0 - hours) * 3600.0
    end = start + hours * 3600.0
    b.interactive(_diurnal(3.0), start, end, scale)
    n_manifests = int(b.rng.poisson(1.5 * hours))
    for _ in range(n_manifests):
        t = float(b.rng.uniform(start, end)) - start
        rows = max(1, int(round(int(b.rng.integers(500, 5001)) * scale)))
        team = f"team-{'abcdef'[int(b.rng.integers(6))]}"
        b.manifest(t, rows, team, "low" if b.rng.random() < 0.5 else "normal")
    return b.trace._sorted()


def burst(seed: int = 0, hours: float = 1.0, scale: float = 1.0) -> Trace:
    """The `burst` trace (module docstring), `hours` long (the burst at minutes 20-30)."""
    _check_hours(hours, 24.0)
    b = _Builder("burst", seed)
    end = hours * 3600.0
    b.interactive(lambda t: 10 * 0.4 if 1200 <= t < 1800 else 0.4, 0.0, end, scale)
    if end > 300:
        b.manifest(300.0, max(1, int(3000 * scale)), "team-a", "normal", kind=0)
    return b.trace._sorted()


def steady(seed: int = 0, hours: float = 1.0, scale: float = 1.0) -> Trace:
    """The `steady` trace (module docstring), `hours` long."""
    _check_hours(hours, 24.0)
    b = _Builder("steady", seed)
    end = hours * 3600.0
    b.interactive(lambda t: 0.8, 0.0, end, scale)
    t = 0.0
    while t < end:
        b.manifest(t, max(1, int(1000 * scale)), "team-a", "low", kind=1)
        t += 1200.0
    return b.trace._sorted()


def _check_hours(hours: float, most: float) -> None:
    if not (0 < hours <= most):
        raise InvalidRequest(f"--hours must be above 0 and at most {most:g}, got {hours:g}", field="hours")


def load_jsonl(path: str | Path) -> Trace:
    """A trace from a JSONL file (module docstring); bad lines raise `InvalidRequest` naming the
    line and the field."""
    b = _Builder(Path(path).name, 0)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequest(f"cannot read trace {path}: {exc.strerror or exc}", field="trace") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{where}: not JSON ({exc.msg})", field="trace") from None
        if not isinstance(rec, dict):
            raise InvalidRequest(f"{where}: each line must be a JSON object", field="trace")
        t = rec.get("t")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InvalidRequest(f"{where}: 't' must be a number of seconds >= 0, got {t!r}", field="t")
        kind = rec.get("kind", "interactive")
        if kind not in KINDS:
            raise InvalidRequest(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}", field="kind")
        caller = rec.get("caller", "anonymous")
        if not isinstance(caller, str) or not caller:
            raise InvalidRequest(f"{where}: 'caller' must be a non-empty string", field="caller")
        factor = rec.get("vram_factor", 1.0)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 10:
            raise InvalidRequest(f"{where}: 'vram_factor' must be above 0 and at most 10, got {factor!r}",
                                 field="vram_factor")
        fields = {k: v for k, v in rec.items() if k not in _ARRIVAL_KEYS}
        size = {}
        for k in ("image_width", "image_height"):
            v = rec.get(k, 512)
            if not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= 16384:
                raise InvalidRequest(f"{where}: '{k}' must be a whole number of pixels (8-16384), got {v!r}",
                                     field=k)
            size[k] = v
        priority = rec.get("priority", "normal")
        try:
            parse_params({"prompt": "trace", **fields, "priority": priority})
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc.message}", field=exc.field) from None
        spec = b.spec_id({**fields, **size})
        tr = b.trace
        tr.t.append(float(t))
        tr.caller.append(caller)
        tr.kind.append(kind)
        tr.priority.append(priority)
        tr.spec.append(spec)
        tr.vram_factor.append(float(factor))
    if not b.trace.t:
        raise InvalidRequest(f"trace {path} has no arrivals", field="trace")
    return b.trace._sorted()


def load(name: str, seed: int = 0, hours: float | None = None) -> Trace:
    """A built-in trace by name (`hours` default: its own length) or a JSONL file."""
    builders = {"day": day, "burst": burst, "steady": steady}
    if name in builders:
        return builders[name](seed=seed, **({"hours": hours} if hours is not None else {}))
    if not Path(name).is_file():
        raise InvalidRequest(f"--trace must be one of {', '.join(BUILTIN)} or a JSONL file; no file {name!r}",
                             field="trace")
    trace = load_jsonl(name)
    if hours is not None:
        cut = hours * 3600.0
        keep = [i for i, t in enumerate(trace.t) if t < cut]
        for attr in ("t", "caller", "kind", "priority", "spec", "vram_factor"):
            values = getattr(trace, attr)
            setattr(trace, attr, [values[i] for i in keep])
    return trace


def request_params(spec: dict[str, Any], priority: str = "normal") -> GenerationParams:
    """The `GenerationParams` of a spec (its request fields, with a placeholder prompt)."""
    fields = {k: v for k, v in spec.items() if k not in ("image_width", "image_height")}
    return parse_params({"prompt": "trace", **fields, "priority": priority})
