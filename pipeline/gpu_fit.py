"""Fit the cost model's `Calibration` to measurements of `python -m bench.gpu_suite`.

    python -m pipeline.gpu_fit bench/results/gpu-memory-nvidia-h200.json \\
        bench/results/gpu-speed-nvidia-h200.json [--write]

writes `pipeline/gpu_calibration.json`, which `cost_model` reads as its default calibration. The
fit (docs/benchmarks.md, "GPU: NVIDIA H200"):

* memory: `activation_scale` by least squares on the peak *allocated* bytes of whole jobs
  (512p/768p/1024p x 8-32 frames, fp16, expandable segments); `reserve_bytes` = the measured
  CUDA context; `fragmentation` stays 1.10 (measured under a class's memory cap with expandable
  segments, reserved exceeded allocated activations by 1.05x at the tightest fit);
* seconds: `mfu_unet` and `step_overhead_s` from the UNet step times at 512x512x16 and
  1024x1024x16 (two points, two unknowns; the "overhead" is mostly memory-bound work that FLOPs
  do not count), `mfu_vae` from the decode seconds.

`checks` lists, for every shape run under a class's memory cap, whether the calibrated model
says it fits that class and whether it did: the class table "as measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import cost_model as cm

CALIBRATION_PATH = cm.CALIBRATION_PATH
FRAGMENTATION = 1.10
CLASS_GPU = {"12gb": "rtx3060-12gb", "24gb": "rtx4090-24gb"}


def fit_activation_scale(grid: list[dict[str, Any]]) -> float:
    """`activation_scale` fitted to measured rows' peak *allocated* bytes (rows with an `error` or
    `cpu_offload` are left out): the one fitting procedure of the benches and of `fit`."""
    base = replace(cm.Calibration(), fragmentation=1.0, reserve_bytes=0)
    rows = [cm.MemoryMeasurement(r["width"], r["height"], r["frames"], "float16", r["peak_allocated_bytes"],
                                 decode_chunk_size=r["decode_chunk_size"])
            for r in grid if "error" not in r and not r.get("cpu_offload")]
    return cm.calibrate_memory(rows, base).activation_scale


def calibration_from(grid: list[dict[str, Any]], context_bytes: int) -> cm.Calibration:
    """The memory calibration these measured rows give: `fit_activation_scale`, the measured
    context as `reserve_bytes`, `FRAGMENTATION` (what `pipeline/gpu_calibration.json` holds)."""
    return replace(cm.Calibration(), activation_scale=fit_activation_scale(grid), fragmentation=FRAGMENTATION,
                   reserve_bytes=int(context_bytes))


def _fit_seconds(stock_rows: list[dict[str, Any]], peak_tflops: float) -> dict[str, float]:
    """mfu_unet, step_overhead_s (two shapes) and mfu_vae from our rows of the speed part."""
    co = cm.load_coefficients()
    points = []
    for r in stock_rows:
        w, h, f = (int(v) for v in r["shape"].split("@")[0].split("x"))
        wl = cm.Workload(w, h, f, 1)
        flops = cm.stage_flops(wl, co)
        points.append((flops["unet"], r["ours_step_s"], flops["vae_decode"], r["ours_decode_s"]))
    (f1, t1, *_), (f2, t2, *_) = sorted(points)[:1] + sorted(points)[-1:]
    rate = peak_tflops * 1e12
    mfu_unet = (f2 - f1) / (rate * (t2 - t1))
    overhead = t1 - f1 / (rate * mfu_unet)
    mfu_vae = sum(fd for *_, fd, _ in points) / (rate * sum(td for *_, td in points))
    return {"mfu_unet": round(mfu_unet, 4), "step_overhead_s": round(overhead, 4), "mfu_vae": round(mfu_vae, 4)}


def fit(memory: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    """The calibration file's contents from the suite's memory and speed JSON."""
    expandable = memory["expandable_segments"]
    cal = {"activation_scale": round(fit_activation_scale(expandable["grid"]), 4), "fragmentation": FRAGMENTATION,
           "reserve_bytes": int(memory["context_bytes"]),
           **_fit_seconds(speed["stock_vs_ours_fp16"], speed["peak_tflops"])}
    calibration = replace(cm.Calibration(), **cal)
    checks = []
    for r in expandable["fits"]:
        wl = cm.Workload(r["width"], r["height"], r["frames"], 50)
        est = cm.estimate(wl, cm.GPUS[CLASS_GPU[r["class"]]], calibration)
        memory_bytes = cm.GPUS[CLASS_GPU[r["class"]]].memory_bytes
        checks.append({"class": r["class"], "case": r["case"], "measured_fits": r["fits"],
                       "predicted_bytes": est.vram_bytes, "predicted_fits": est.vram_bytes <= memory_bytes,
                       "margin_gib": round((memory_bytes - est.vram_bytes) / cm.GiB, 2),
                       "measured_peak_allocated_bytes": r.get("peak_allocated_bytes"),
                       "measured_peak_reserved_bytes": r.get("peak_reserved_bytes")})
    return {
        "about": "Cost-model calibration fitted to whole-job measurements of the full-size I2VGen-XL "
                 "(random weights) by `python -m pipeline.gpu_fit`; read by pipeline/cost_model/. "
                 "Memory is per job and holds on any GPU with the same software; seconds are the "
                 "measured GPU's and scale to other GPUs by their peak TFLOP/s (an estimate).",
        "gpu": memory["gpu"], "versions": memory["versions"], "date": memory.get("date", ""),
        "alloc_conf": "expandable_segments:True",
        "sources": ["bench/results/gpu-memory-nvidia-h200.json", "bench/results/gpu-speed-nvidia-h200.json"],
        "calibration": cal, "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.gpu_fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("memory_json", type=Path)
    p.add_argument("speed_json", type=Path)
    p.add_argument("--write", action="store_true", help=f"write {CALIBRATION_PATH.name}")
    args = p.parse_args(argv)
    data = fit(json.loads(args.memory_json.read_text()), json.loads(args.speed_json.read_text()))
    text = json.dumps(data, indent=1) + "\n"
    if args.write:
        CALIBRATION_PATH.write_text(text)
        print(f"wrote {CALIBRATION_PATH}")
    print(json.dumps(data["calibration"], indent=1))
    for c in data["checks"]:
        print(f"{c['class']:>5} {c['case']:>10}: predicted {c['predicted_bytes'] / cm.GiB:5.2f} GiB "
              f"(margin {c['margin_gib']:+.2f}) fits={c['predicted_fits']!s:5} measured={c['measured_fits']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

