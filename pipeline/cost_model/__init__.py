"""Cost model: FLOPs, seconds and peak VRAM of one I2VGen-XL request on one GPU class.

The scheduler calls `estimate(workload, gpu)` for every request: plain arithmetic (microseconds,
no torch) over closed forms fitted once from exact FLOP counts of the real model code
(`cost_coefficients.json`) and constants calibrated to GPU measurements
(`gpu_calibration.json`). Modules: `spec` (GPUs, workloads, `Calibration`), `flops` (the fitted
closed forms), `memory` (the activation formula), `predict` (`estimate`, `table`,
`calibrate_memory`), `counting` (exact counts on the meta device; torch), `__main__` (CLI:
``python -m pipeline.cost_model calibrate | table | estimate``). Why it is built this way:
docs/design/cost-model.md; the numbers: docs/cost-model.md and docs/benchmarks.md.
"""

from __future__ import annotations

from .flops import Coefficients, load_coefficients, stage_flops
from .predict import ADAPTER_LOAD_OVERHEAD_S, MemoryMeasurement, adapter_cost, calibrate_memory, estimate, table
from .spec import (
    CALIBRATION_PATH,
    COEFFICIENTS_PATH,
    COMPONENTS,
    DEFAULT_CALIBRATION,
    DTYPE_BYTES,
    FF_MULT,
    GPUS,
    RESOLUTIONS,
    STAGE_COMPONENT,
    STAGES,
    Calibration,
    Estimate,
    GiB,
    GpuSpec,
    MiB,
    Workload,
    load_calibration,
)


def __getattr__(name: str):
    """The slow path (torch) only when asked for: `count_flops`, `count_parameters`, `calibrate`."""
    if name in ("count_flops", "count_parameters", "calibrate", "_sdpa_is_counted", "main"):
        from . import __main__, counting

        return getattr(__main__ if name == "main" else counting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTER_LOAD_OVERHEAD_S", "adapter_cost",
    "CALIBRATION_PATH", "COEFFICIENTS_PATH", "COMPONENTS", "DEFAULT_CALIBRATION", "DTYPE_BYTES", "FF_MULT",
    "GPUS", "RESOLUTIONS", "STAGE_COMPONENT", "STAGES", "Calibration", "Coefficients", "Estimate", "GiB",
    "GpuSpec", "MemoryMeasurement", "MiB", "Workload", "calibrate_memory", "estimate", "load_calibration",
    "load_coefficients", "stage_flops", "table",
]
