"""`estimate` (seconds, FLOPs, peak VRAM of a workload on a GPU: pure arithmetic), the table, and
`calibrate_memory` (fit `activation_scale` to measured peaks) (the design: docs/design/cost-model.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .flops import _STAGE_TERMS, _TERMS, Coefficients, load_coefficients, stage_flops  # noqa: F401
from .memory import _stage_memory
from .spec import (
    COMPONENTS,
    DEFAULT_CALIBRATION,
    RESOLUTIONS,
    STAGE_COMPONENT,
    STAGES,
    Calibration,
    Estimate,
    GiB,
    GpuSpec,
    Workload,
)


def estimate(
    workload: Workload,
    gpu: GpuSpec,
    calibration: Calibration = DEFAULT_CALIBRATION,
    coefficients: Coefficients | None = None,
) -> Estimate:
    """Predicted FLOPs, peak VRAM and seconds of `workload` on `gpu` (pure arithmetic)."""
    co = coefficients or load_coefficients()
    cal = calibration
    flops = stage_flops(workload, co)

    # Seconds.
    rate = gpu.peak_tflops * 1e12 * (cal.fp32_rate_factor if workload.dtype == "float32" else 1.0)
    mfu = {
        "text_encoder": cal.mfu_encoders,
        "image_encoder": cal.mfu_encoders,
        "vae_encode": cal.mfu_vae,
        "unet": cal.mfu_unet,
        "vae_decode": cal.mfu_vae,
    }
    seconds = {s: flops[s] / (rate * mfu[s]) for s in STAGES}
    seconds["overhead"] = cal.job_overhead_s + workload.num_inference_steps * cal.step_overhead_s
    weight_bytes = {c: co.parameters[c] * workload.bytes_per_element for c in COMPONENTS}
    # Model offload moves each component to the GPU and back once per call.
    seconds["offload"] = (
        2 * sum(weight_bytes.values()) / cal.offload_bandwidth_bytes_per_s if workload.cpu_offload else 0.0
    )

    # Peak VRAM: the stage with the largest resident weights + activations + I/O.
    best: tuple[float, str, int, int, int] | None = None
    for stage, (act, io) in _stage_memory(workload, cal).items():
        weights = (
            weight_bytes[STAGE_COMPONENT[stage]] if workload.cpu_offload else sum(weight_bytes.values())
        )
        total = weights + cal.fragmentation * (act + io)
        if best is None or total > best[0]:
            best = (total, stage, weights, act, io)
    assert best is not None
    _, peak_stage, weights, act, io = best
    parts = {
        "weights": int(weights),
        "activations": int(act),
        "io": int(io),
        "fragmentation": int(round((cal.fragmentation - 1.0) * (act + io))),
        "reserve": int(cal.reserve_bytes),
    }
    return Estimate(
        flops=sum(flops.values()),
        flops_by_stage=flops,
        vram_bytes=sum(parts.values()),
        vram_by_part=parts,
        seconds=sum(seconds.values()),
        seconds_by_stage=seconds,
        peak_stage=peak_stage,
    )


@dataclass(frozen=True)
class MemoryMeasurement:
    """One measured peak (e.g. `torch.cuda.max_memory_reserved()` + the context, per job)."""

    width: int
    height: int
    num_frames: int
    dtype: str
    peak_bytes: int
    guidance: bool = True
    decode_chunk_size: int = 1
    cpu_offload: bool = False

    def workload(self) -> Workload:
        return Workload(
            self.width,
            self.height,
            self.num_frames,
            1,
            guidance=self.guidance,
            dtype=self.dtype,
            decode_chunk_size=self.decode_chunk_size,
            cpu_offload=self.cpu_offload,
        )


def calibrate_memory(
    measurements: Iterable[MemoryMeasurement | Sequence[Any]],
    calibration: Calibration = DEFAULT_CALIBRATION,
    coefficients: Coefficients | None = None,
) -> Calibration:
    """Fit `activation_scale` to measured peaks by least squares; return the new Calibration.

    Each measurement is a `MemoryMeasurement` or a tuple (width, height, frames, dtype, bytes).
    Model: measured = fixed + scale x variable, where, at the measurement's peak stage, `fixed` is
    weights + reserve + fragmentation x I/O and `variable` is fragmentation x activations at
    scale 1. The peak stage is re-chosen with the fitted scale until it is stable.
    """
    rows = [m if isinstance(m, MemoryMeasurement) else MemoryMeasurement(*m) for m in measurements]
    if not rows:
        raise ValueError("calibrate_memory needs at least one measurement")
    co = coefficients or load_coefficients()
    gpu = GpuSpec("calibration", 0, 1.0)
    cal = calibration
    for _ in range(10):
        unit = replace(cal, activation_scale=1.0)
        num = den = 0.0
        for m in rows:
            wl = m.workload()
            peak_stage = estimate(wl, gpu, cal, co).peak_stage
            act, io = _stage_memory(wl, unit)[peak_stage]
            weights = (
                co.parameters[STAGE_COMPONENT[peak_stage]] * wl.bytes_per_element
                if wl.cpu_offload
                else sum(co.parameters.values()) * wl.bytes_per_element
            )
            fixed = weights + unit.fragmentation * io + unit.reserve_bytes
            variable = unit.fragmentation * act
            num += variable * (m.peak_bytes - fixed)
            den += variable * variable
        if den == 0.0:
            raise ValueError("the measurements carry no activation term to fit")
        scale = num / den
        if math.isclose(scale, cal.activation_scale, rel_tol=1e-9):
            break
        cal = replace(cal, activation_scale=scale)
    return cal




def table(
    gpu: GpuSpec,
    resolutions: Sequence[str] = ("512p", "768p", "1024p"),
    frames: Sequence[int] = (8, 16, 24, 32),
    steps: int = 50,
    *,
    dtype: str = "float16",
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> str:
    """A text table of peak VRAM, fit and seconds for every resolution x frames on `gpu`."""
    lines = [
        f"I2VGen-XL on {gpu.name} ({gpu.memory_bytes / GiB:.1f} GiB, {gpu.peak_tflops:g} TFLOP/s): "
        f"{dtype}, CFG, {steps} steps, decode_chunk_size=1",
        f"{'resolution':<11}{'frames':>6}{'peak VRAM':>12}{'fits':>6}{'offload':>10}"
        f"{'seconds':>10}{'PFLOP':>8}",
    ]
    for res in resolutions:
        width, height = RESOLUTIONS[res]
        for f in frames:
            wl = Workload(width, height, f, steps, dtype=dtype)
            est = estimate(wl, gpu, calibration)
            off = estimate(replace(wl, cpu_offload=True), gpu, calibration)
            lines.append(
                f"{res:<11}{f:>6}{est.vram_bytes / GiB:>8.1f} GiB{'yes' if est.fits(gpu) else 'NO':>6}"
                f"{off.vram_bytes / GiB:>6.1f} GiB{est.seconds:>10.1f}{est.flops / 1e15:>8.2f}"
            )
    lines.append("offload: peak VRAM with cpu_offload (seconds then add PCIe transfers).")
    return "\n".join(lines)


#: Fixed cost of one LoRA load besides moving its bytes: PEFT wraps the targeted layers and copies
#: the state dict in (measured: see docs/adapters.md).
ADAPTER_LOAD_OVERHEAD_S = 0.25


def adapter_cost(adapter_bytes: list[int] | tuple[int, ...], calibration: Calibration = DEFAULT_CALIBRATION
                 ) -> tuple[int, float]:
    """(extra peak VRAM, seconds on a cache miss) of a job's LoRA adapters (their file sizes):
    the weights stay on the GPU beside the base model (unmerged), and a miss reads them, wraps the
    layers and copies them to the device (`offload_bandwidth_bytes_per_s`)."""
    total = int(sum(adapter_bytes))
    seconds = len(adapter_bytes) * ADAPTER_LOAD_OVERHEAD_S + total / calibration.offload_bandwidth_bytes_per_s
    return total, seconds
