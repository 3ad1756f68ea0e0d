"""GPU generation benchmark on the full-size I2VGen-XL architecture with random weights.

    .venv/bin/python -m bench.generation_gpu [--shapes 512x512x16@50,1024x1024x16@10] [--dtypes float16,bfloat16]
                                             [--parts stock,levers,solvers,memory] [--levers NAME,...]
                                             [--solver-steps 10,20,25] [--project-steps 50]
                                             [--peak-tflops X] [--json FILE] [--memory-json FILE]
                                             [--dry-run | --cpu-smoke]

Builds `architecture.FULL_SIZE` directly on the GPU with seeded random weights (the real model's
speed and memory; no download) and measures, in one process:

* **stock** (per dtype and shape; `WxHxF@STEPS`, the steps actually run): our `Generator` (what a
  farm worker runs) and diffusers' stock `I2VGenXLPipeline.__call__` on the same components,
  steps and seed (the stock pipeline gets penultimate-layer prompt embeddings, since its own
  clip_skip path fails on transformers 5; their time is counted), each after a 1-step warm-up:
  seconds per job, seconds per denoising step, decode seconds, the job projected to
  `--project-steps` steps, peak VRAM (`max_memory_allocated`, and `max_memory_reserved` + the
  CUDA context, which is what the card must hold), and the UNet's achieved TFLOP/s against the
  cost model's exact FLOP count, over the GPU's dense fp16/bf16 peak: model FLOP utilisation;
* **levers** (first shape, first dtype), each alone and together, every one on a fresh build:
  xformers (when installed), channels_last, fuse_qkv, torch.compile of the UNet (its warm-up,
  i.e. the compile, reported apart), decode_chunk_size = all frames, the attention cache
  (PAB, changes the output), and the CFG split / classic attention rows that show what the
  defaults are worth; `x base` > 1 is faster than the farm's defaults;
* **solvers** (first shape, first dtype): DDIM/DPM-Solver++/UniPC with fewer steps and the
  attention cache against the 50-step DDIM result: seconds and per-frame PSNR/SSIM. Random
  weights: a proxy only (how far the faster computation lands from the reference computation,
  not how good a video looks);
* **memory** (fp16): peak VRAM of the presets (fast 512p x 8, standard 512p x 16, high 768p x 24)
  and of 512p x 16 at decode_chunk_size 1/2/4/8/16, the cost model's prediction beside each, the
  `activation_scale` that `pipeline.gpu_fit` fits to their allocated peaks, and whether the 12gb class
  holds 512p x 16. `--memory-json FILE` writes the measurements and the fitted calibration for
  the cost model.

Needs a CUDA GPU. `--dry-run` needs none: it checks the arguments, builds the full-size model on
the meta device (no memory) and prints the plan with the cost model's predicted seconds, FLOPs
and peak VRAM of every measurement. `--cpu-smoke` runs every part end to end on the CPU with the
tiny architecture in float32 (it checks the harness, its numbers mean nothing). Prints a JSON line
per measurement and tables at the end; docs/benchmarks.md has the commands and the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GiB = 2**30
PARTS = ("stock", "levers", "solvers", "memory")
LEVERS = ("classic_attention", "cfg_split", "xformers", "channels_last", "fuse_qkv", "compile",
          "group_norm_split", "decode_chunk", "attention_cache", "exact_together", "all_together")
DTYPES = ("float16", "bfloat16", "float32")
#: fast / standard / high at their resolutions (square images), fp16, decode_chunk_size 1.
PRESET_SHAPES = (("fast", 512, 512, 8), ("standard", 512, 512, 16), ("high", 768, 768, 24))
CHUNKS = (1, 2, 4, 8, 16)
#: `torch.cuda.get_device_name()` substrings -> dense fp16/bf16 tensor TFLOP/s (cost_model.GPUS,
#: plus the H100 PCIe card and the H200, which the farm's classes do not name).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("4090", 165.2),
               ("3060", 25.6), ("L4", 121.0), ("A10G", 70.0))


# ------------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    frames: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}@{self.steps}"


def parse_shapes(text: str, default_steps: int = 50) -> list[Shape]:
    """`512x512x16@50,1024x1024x16@10` -> shapes (steps default `default_steps`)."""
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        dims, _, steps = part.partition("@")
        try:
            w, h, f = (int(v) for v in dims.lower().split("x"))
            s = int(steps) if steps else default_steps
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape must be WxHxF[@STEPS], got {part!r}") from None
        if w % 8 or h % 8 or not 64 <= min(w, h) or max(w, h) > 2048 or not 8 <= f <= 32 or s < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r}: W, H multiples of 8 in 64-2048, 8-32 frames, steps >= 1")
        shapes.append(Shape(w, h, f, s))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_choice_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in choices]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"{what}: unknown {unknown or text!r}; choose from {', '.join(choices)}")
    return items


def peak_tflops_for(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def unet_flops_per_step(width: int, height: int, frames: int, guidance: bool = True) -> float:
    """The cost model's exact UNet FLOPs of one denoising step (batch 2 with guidance)."""
    from pipeline import cost_model

    wl = cost_model.Workload(width, height, frames, 1, guidance=guidance)
    return cost_model.stage_flops(wl)["unet"]


def mfu(flops_per_step: float, step_s: float, peak_tflops: float | None) -> tuple[float, float]:
    """(achieved TFLOP/s, model FLOP utilisation) of a step."""
    achieved = flops_per_step / step_s / 1e12
    return achieved, (achieved / peak_tflops if peak_tflops else float("nan"))


# ------------------------------------------------------------------------------- GPU helpers

#: Where the harness runs: "cuda" (the benchmark) or "cpu" (`--cpu-smoke`: every code path on the
#: tiny architecture, to check the harness itself without a GPU; its numbers mean nothing).
DEVICE = "cuda"


def _cuda() -> bool:
    return DEVICE == "cuda"


def _build(dtype_name: str):
    import torch
    from diffusers import I2VGenXLPipeline

    from pipeline.architecture import FULL_SIZE, TINY, build_components
    from pipeline.loading import LoadedModel

    torch.manual_seed(0)
    with torch.device(DEVICE):
        components = build_components(FULL_SIZE if _cuda() else TINY)
    pipe = I2VGenXLPipeline(**components).to(DEVICE, getattr(torch, dtype_name))
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, name="full-size-random" if _cuda() else "tiny-random-smoke", source="random",
                       device=DEVICE, dtype=dtype_name, cpu_offload=False, load_seconds=0.0)


def _free(*objs) -> None:
    import gc

    import torch

    del objs
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _sync() -> None:
    if _cuda():
        import torch

        torch.cuda.synchronize()


def _reset_peak() -> None:
    if _cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak(kind: str) -> int:
    """`allocated` or `reserved` peak bytes since the last reset (0 on the CPU)."""
    if not _cuda():
        return 0
    import torch

    return int(torch.cuda.max_memory_allocated() if kind == "allocated" else torch.cuda.max_memory_reserved())


def _image(width: int, height: int):
    from bench.generation import bench_image

    return bench_image().resize((width, height))


def _params(shape: Shape, scheduler: str = "ddim", steps: int | None = None):
    from bench.generation import job_params

    return job_params(shape.frames, steps or shape.steps, scheduler)


def context_bytes() -> int:
    """Device memory in use outside PyTorch's caching allocator (CUDA context, cuBLAS, kernels)."""
    if not _cuda():
        return 0
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(total - free - torch.cuda.memory_reserved())


def measure_ours(gen, shape: Shape, steps: int | None = None, scheduler: str = "ddim") -> dict[str, Any]:
    image = _image(shape.width, shape.height)
    size = (shape.width, shape.height)
    gen.generate(image, _params(shape, scheduler, 1), size=size)  # warm-up
    _sync()
    started = time.perf_counter()
    result = gen.generate(image, _params(shape, scheduler, steps), size=size)  # resets the peak stats first
    _sync()
    total = time.perf_counter() - started
    n = steps or shape.steps
    return {"total_s": total, "conditioning_s": result.timings["conditioning"], "denoise_s": result.timings["denoise"],
            "decode_s": result.timings["decode"], "step_s": result.timings["denoise"] / n,
            "peak_allocated_bytes": _peak("allocated"), "peak_reserved_bytes": _peak("reserved"),
            "frames": result.frames}


def measure_stock(model, shape: Shape, chunk: int) -> dict[str, Any]:
    from bench.generation import run_stock

    image = _image(shape.width, shape.height)
    size = (shape.width, shape.height)
    run_stock(model.pipe, image, _params(shape, steps=1), size, chunk)
    _sync()
    _reset_peak()
    job = run_stock(model.pipe, image, _params(shape), size, chunk)
    _sync()
    return {"total_s": job.seconds, "peak_allocated_bytes": _peak("allocated"),
            "peak_reserved_bytes": _peak("reserved"), "frames": job.frames}


def emit(row: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in row.items() if k != "frames"}, default=float), flush=True)


# ------------------------------------------------------------------------------- parts


def part_stock(args, ctx: int, peak: float | None) -> list[dict[str, Any]]:
    from pipeline.generator import Generator

    rows = []
    for dtype in args.dtypes:
        model = _build(dtype)
        gen = Generator(model)
        for shape in args.shapes:
            row: dict[str, Any] = {"part": "stock", "dtype": dtype, "shape": shape.label}
            try:
                ours = measure_ours(gen, shape)
                row.update({f"ours_{k}": v for k, v in ours.items() if k != "frames"})
                row["ours_projected_s"] = (ours["conditioning_s"] + args.project_steps * ours["step_s"]
                                           + ours["decode_s"])
                row["ours_card_bytes"] = ours["peak_reserved_bytes"] + ctx
                row["unet_tflops"], row["mfu"] = mfu(unet_flops_per_step(shape.width, shape.height, shape.frames),
                                                     ours["step_s"], peak)
                if not args.no_stock:
                    stock = measure_stock(model, shape, gen.options.decode_chunk_size)
                    row.update({f"stock_{k}": v for k, v in stock.items() if k != "frames"})
                    row["stock_over_ours"] = stock["total_s"] / ours["total_s"]
                    diff = stock["frames"].astype(np.int16) - ours["frames"].astype(np.int16)
                    row["max_diff"] = int(np.abs(diff).max())
            except Exception as exc:  # noqa: BLE001 - OOM and friends end this row only
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            _free()
            emit(row)
            rows.append(row)
        _free(gen, model)
    return rows


def _lever_options(name: str, frames: int) -> tuple[dict[str, Any], str | None]:
    """(`MemoryOptions` fields, bench-only patch) of a lever row."""
    exact = {"channels_last": True, "fuse_qkv": True, "decode_chunk_size": frames}
    return {
        "baseline": ({}, None),
        "classic_attention": ({}, "classic_attention"),
        "cfg_split": ({}, "split_cfg"),
        "xformers": ({"attention": "xformers"}, None),
        "channels_last": ({"channels_last": True}, None),
        "fuse_qkv": ({"fuse_qkv": True}, None),
        "compile": ({"compile": True}, None),
        "group_norm_split": ({"group_norm": "split"}, None),
        "decode_chunk": ({"decode_chunk_size": frames}, None),
        "attention_cache": ({"attention_cache": 2}, None),
        "exact_together": (exact, None),
        "all_together": ({**exact, "attention_cache": 2}, None),
    }[name]


def part_levers(args, peak: float | None) -> list[dict[str, Any]]:
    import bench.generation as cpu
    from pipeline.generator import Generator, MemoryOptions

    shape, dtype = args.shapes[0], args.dtypes[0]
    rows, base_frames, base_s = [], None, None
    for name in ("baseline", *args.levers):
        row: dict[str, Any] = {"part": "levers", "lever": name, "dtype": dtype, "shape": shape.label}
        if name == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                row["error"] = "xformers is not installed"
                emit(row)
                rows.append(row)
                continue
        options, patch = _lever_options(name, shape.frames)
        model = _build(dtype)
        try:
            gen = Generator(model, MemoryOptions(**options))
            if patch:
                getattr(cpu, patch)(gen)
            t = time.perf_counter()
            gen.warm_up(_image(shape.width, shape.height), _params(shape), size=(shape.width, shape.height))
            row["warmup_s"] = time.perf_counter() - t
            m = measure_ours(gen, shape)
            row.update({k: v for k, v in m.items() if k != "frames"})
            row["unet_tflops"], row["mfu"] = mfu(unet_flops_per_step(shape.width, shape.height, shape.frames),
                                                 m["step_s"], peak)
            if base_frames is None:
                base_frames, base_s = m["frames"], m["total_s"]
            row["x_base"] = base_s / m["total_s"]
            row.update(cpu.frame_quality(m["frames"], base_frames))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        _free(model)
        emit(row)
        rows.append(row)
    return rows


def part_solvers(args) -> list[dict[str, Any]]:
    import bench.generation as cpu
    from pipeline.generator import Generator, MemoryOptions

    shape, dtype = args.shapes[0], args.dtypes[0]
    reference = Shape(shape.width, shape.height, shape.frames, 50)
    model = _build(dtype)
    rows, ref = [], None
    variants = [("ddim", 50, {})]
    variants += [(s, n, {}) for n in args.solver_steps for s in ("ddim", "dpmsolver++", "unipc") if n < 50]
    variants += [("ddim", 50, {"attention_cache": 2}), ("ddim", 50, {"attention_cache": 3})]
    plain = Generator(model)
    for scheduler, steps, options in variants:
        row: dict[str, Any] = {"part": "solvers", "scheduler": scheduler, "steps": steps, "options": options,
                               "dtype": dtype, "shape": shape.label}
        try:
            if options:  # hooks change the model in place: a fresh one
                _free(plain, model)
                model = _build(dtype)
                plain = Generator(model, MemoryOptions(**options))
            m = measure_ours(plain, reference, steps=steps, scheduler=scheduler)
            row["total_s"] = m["total_s"]
            if ref is None:
                ref = m
            row["x_ref"] = ref["total_s"] / m["total_s"]
            row.update(cpu.frame_quality(m["frames"], ref["frames"]))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        emit(row)
        rows.append(row)
    _free(plain, model)
    return rows


def part_memory(args, ctx: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from dataclasses import asdict

    from pipeline import cost_model, gpu_fit
    from pipeline.generator import Generator, MemoryOptions

    model = _build("float16" if _cuda() else "float32")
    rows = []
    cases = [(name, w, h, f, 1) for name, w, h, f in PRESET_SHAPES]
    cases += [(f"512p x16 chunk {c}", 512, 512, 16, c) for c in CHUNKS if c != 1]
    if not _cuda():  # smoke run: the first shape, two chunk sizes
        first = args.shapes[0]
        cases = [(f"smoke chunk {c}", first.width, first.height, first.frames, c) for c in (1, 2)]
    for name, w, h, f, chunk in cases:
        row: dict[str, Any] = {"part": "memory", "case": name, "width": w, "height": h, "frames": f,
                               "decode_chunk_size": chunk}
        gen = Generator(model, MemoryOptions(decode_chunk_size=chunk))
        try:
            m = measure_ours(gen, Shape(w, h, f, 2))
            row.update({k: m[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes")})
            row["card_bytes"] = m["peak_reserved_bytes"] + ctx
            row["predicted_bytes"] = cost_model.estimate(
                cost_model.Workload(w, h, f, 1, dtype="float16", decode_chunk_size=chunk),
                cost_model.GPUS["rtx3060-12gb"]).vram_bytes
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        _free()
        emit(row)
        rows.append(row)
    _free(model)
    fitted: dict[str, Any] = {}
    measured = [r for r in rows if "error" not in r]
    if measured:
        cal = gpu_fit.calibration_from(measured, ctx)
        fitted = {"calibration": asdict(cal), "measurements": measured}
        for row in rows:
            if "error" not in row:
                row["calibrated_bytes"] = cost_model.estimate(
                    cost_model.Workload(row["width"], row["height"], row["frames"], 1, dtype="float16",
                                        decode_chunk_size=row["decode_chunk_size"]),
                    cost_model.GPUS["rtx3060-12gb"], cal).vram_bytes
    return rows, fitted


# ------------------------------------------------------------------------------- report


def _table(headers, rows):
    from bench.generation import table

    return table(headers, rows)


def _rows(records, label, cells, ncols: int) -> tuple[list[list[str]], list[str]]:
    """Table rows (error rows as dashes) and the error lines to print under the table."""
    out, errors = [], []
    for r in records:
        if "error" in r:
            out.append([*label(r), *(["-"] * ncols)])
            errors.append(f"  {' '.join(label(r))}: {r['error']}")
        else:
            out.append([*label(r), *cells(r)])
    return out, errors


def _print_table(headers, records, label, cells) -> None:
    rows, errors = _rows(records, label, cells, len(headers) - len(label(records[0])))
    print(_table(headers, rows))
    for line in errors:
        print(line)


def report(args, gpu: str, peak: float | None, stock, levers, solvers, memory, fitted) -> None:
    print(f"\nfull-size I2VGen-XL, random weights, {gpu} (peak {peak or 'unknown'} TFLOP/s dense fp16/bf16)")
    if stock:
        print(f"\n1. ours vs stock (job s at the steps run; 'proj' = projected to {args.project_steps} steps)")
        _print_table(
            ["dtype", "shape", "ours s", "stock s", "stock/ours", "s/step", "decode s", "proj s", "peak alloc GiB",
             "card GiB", "UNet TF/s", "MFU", "max diff"], stock, lambda r: [r["dtype"], r["shape"]],
            lambda r: [f"{r['ours_total_s']:.2f}", f"{r.get('stock_total_s', float('nan')):.2f}",
                       f"{r.get('stock_over_ours', float('nan')):.3f}", f"{r['ours_step_s']:.3f}",
                       f"{r['ours_decode_s']:.2f}", f"{r['ours_projected_s']:.1f}",
                       f"{r['ours_peak_allocated_bytes'] / GiB:.2f}", f"{r['ours_card_bytes'] / GiB:.2f}",
                       f"{r['unet_tflops']:.0f}", f"{r['mfu']:.0%}", str(r.get("max_diff", "-"))])
    if levers:
        print(f"\n2. levers at {args.shapes[0].label}, {args.dtypes[0]} (each on a fresh build, after its warm-up)")
        _print_table(
            ["lever", "job s", "x base", "s/step", "decode s", "peak alloc GiB", "MFU", "warm-up s", "max diff",
             "PSNR dB"], levers, lambda r: [r["lever"]],
            lambda r: [f"{r['total_s']:.2f}", f"{r['x_base']:.2f}", f"{r['step_s']:.3f}", f"{r['decode_s']:.2f}",
                       f"{r['peak_allocated_bytes'] / GiB:.2f}", f"{r['mfu']:.0%}", f"{r['warmup_s']:.1f}",
                       f"{r['max_diff']:.0f}", f"{r['psnr_mean']:.1f}"])
    if solvers:
        print("\n3. fewer steps / attention cache against 50-step DDIM (random weights: a proxy only)")
        _print_table(
            ["variant", "job s", "x ref", "PSNR mean", "PSNR worst", "SSIM mean", "SSIM worst"], solvers,
            lambda r: [f"{r['scheduler']} {r['steps']}"
                       + (f" cache {r['options']['attention_cache']}" if r["options"] else "")],
            lambda r: [f"{r['total_s']:.2f}", f"{r['x_ref']:.2f}", f"{r['psnr_mean']:.1f}", f"{r['psnr_min']:.1f}",
                       f"{r['ssim_mean']:.4f}", f"{r['ssim_min']:.4f}"])
    if memory:
        print("\n4. peak VRAM, fp16 (card = max_memory_reserved + CUDA context; the cost model before/after "
              "calibration)")
        _print_table(
            ["case", "peak alloc GiB", "card GiB", "predicted GiB", "calibrated GiB", "fits 12gb"], memory,
            lambda r: [r["case"]],
            lambda r: [f"{r['peak_allocated_bytes'] / GiB:.2f}", f"{r['card_bytes'] / GiB:.2f}",
                       f"{r['predicted_bytes'] / GiB:.2f}", f"{r.get('calibrated_bytes', 0) / GiB:.2f}",
                       _fits_12gb(r["card_bytes"])])
        if fitted:
            print(f"fitted activation_scale = {fitted['calibration']['activation_scale']:.3f} "
                  "(pipeline.gpu_fit on allocated peaks; 1.0 = the formula as written)")


def _fits_12gb(card_bytes: int) -> str:
    from cluster.vram_classes import default_classes

    c = default_classes()["12gb"]
    return "yes" if card_bytes <= c.memory_bytes else f"NO (> {c.memory_bytes / GiB:.1f} GiB)"


def dry_run(args) -> int:
    """Check the plan without a GPU: the model on the meta device, the cost model's predictions."""
    from pipeline import cost_model

    gpu = cost_model.GPUS[args.gpu]
    params = cost_model.count_parameters()  # builds FULL_SIZE on the meta device
    print(f"dry run: FULL_SIZE on the meta device: {sum(params.values()) / 1e9:.2f} B parameters "
          f"({', '.join(f'{k} {v / 1e6:.0f} M' for k, v in params.items())})")
    print(f"plan on {gpu.name} ({gpu.peak_tflops:g} TFLOP/s): parts {', '.join(args.parts)}; "
          f"dtypes {', '.join(args.dtypes)}; levers {', '.join(args.levers)}")
    rows = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            wl = cost_model.Workload(shape.width, shape.height, shape.frames, shape.steps, dtype=dtype)
            est = cost_model.estimate(wl, gpu)
            step_flops = unet_flops_per_step(shape.width, shape.height, shape.frames)
            rows.append([dtype, shape.label, f"{step_flops / 1e12:.1f}",
                         f"{est.seconds:.1f}", f"{est.vram_bytes / GiB:.2f}", _fits_12gb(est.vram_bytes)])
    print(_table(["dtype", "shape", "UNet TFLOP/step", "predicted s", "predicted GiB", "fits 12gb"], rows))
    print("ok: the configuration is valid; run without --dry-run on a CUDA GPU")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pipeline import cost_model

    p = argparse.ArgumentParser(prog="python -m bench.generation_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("512x512x16@50,1024x1024x16@10"),
                   help="WxHxF@STEPS,... (default 512x512x16@50,1024x1024x16@10); levers and solvers use the first")
    p.add_argument("--dtypes", type=lambda s: parse_choice_list(s, DTYPES, "--dtypes"),
                   default=["float16", "bfloat16"], help="default float16,bfloat16")
    p.add_argument("--parts", type=lambda s: parse_choice_list(s, PARTS, "--parts"), default=list(PARTS),
                   help=f"default {','.join(PARTS)}")
    p.add_argument("--levers", type=lambda s: parse_choice_list(s, LEVERS, "--levers"), default=list(LEVERS),
                   help=f"default: all of {','.join(LEVERS)}")
    p.add_argument("--solver-steps", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 25])
    p.add_argument("--project-steps", type=int, default=50, help="project job seconds to this many steps")
    p.add_argument("--no-stock", action="store_true", help="part stock: time ours only")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU's dense fp16 peak (default: by name)")
    p.add_argument("--gpu", choices=sorted(cost_model.GPUS), default="h100-80gb",
                   help="--dry-run: the cost model's GPU to predict for (default h100-80gb)")
    p.add_argument("--json", type=Path, default=None, help="write every measurement to this file")
    p.add_argument("--memory-json", type=Path, default=None,
                   help="write the memory measurements and the fitted cost-model calibration to this file")
    p.add_argument("--dry-run", action="store_true", help="validate the plan on the meta device (no GPU)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every part on the CPU with the tiny architecture in float32 (checks the harness "
                        "itself; its numbers mean nothing); use small --shapes, e.g. 64x64x2@2")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    global DEVICE
    if args.dry_run:
        return dry_run(args)
    import torch

    from pipeline.loading import _quiet_libraries

    _quiet_libraries()
    if args.cpu_smoke:
        DEVICE = "cpu"
        args.dtypes = ["float32"]
        gpu, peak, ctx = "CPU smoke run (tiny architecture; numbers meaningless)", args.peak_tflops, 0
    elif not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one (see docs/benchmarks.md); --dry-run checks the plan on CPU",
              file=sys.stderr)
        return 2
    else:
        DEVICE = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.cuda.get_device_name()
        peak = args.peak_tflops or peak_tflops_for(gpu)
        torch.cuda.init()
        torch.empty(1, device="cuda") @ torch.empty(1, 1, device="cuda")  # cuBLAS handle into the context
        ctx = context_bytes()
        print(f"{gpu}: CUDA context and libraries {ctx / GiB:.2f} GiB outside the allocator", flush=True)
    stock = part_stock(args, ctx, peak) if "stock" in args.parts else []
    levers = part_levers(args, peak) if "levers" in args.parts else []
    solvers = part_solvers(args) if "solvers" in args.parts else []
    memory, fitted = part_memory(args, ctx) if "memory" in args.parts else ([], {})
    report(args, gpu, peak, stock, levers, solvers, memory, fitted)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "peak_tflops": peak, "context_bytes": ctx, "stock": stock,
                                         "levers": levers, "solvers": solvers, "memory": memory},
                                        indent=1, default=float) + "\n")
    if args.memory_json and fitted:
        args.memory_json.write_text(json.dumps({"gpu": gpu, **fitted}, indent=1) + "\n")
        print(f"memory calibration: {args.memory_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
