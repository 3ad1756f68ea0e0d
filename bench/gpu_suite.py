"""All GPU measurements of the farm in one command, sized for a short GPU lease.

    python -m bench.gpu_suite [--out DIR] [--budget-s 500] [--parts memory,speed,levers,solvers,bf16,compile,farm]
    python -m bench.gpu_suite --dry-run        # CPU: every part end to end, tiny model, tiny shapes

Writes `gpu-memory-<gpu>.json`, `gpu-speed-<gpu>.json` and `gpu-farm-<gpu>.json` under `--out`
(default `bench/results/`), rewritten after every part so that a run cut short keeps what it
measured. Parts, most valuable first (a part that would not fit the remaining `--budget-s` is
skipped and says so):

* memory: one whole job (encode, denoise, decode; weights resident) of the full-size
  architecture with random weights, fp16, the shipped defaults, for 512p/768p/1024p x 8/16/24/32
  frames, plus decode chunk 8 and `cpu_offload`: peak `max_memory_allocated` and
  `max_memory_reserved` per stage (conditioning, denoise, decode), the CUDA context, the cost
  model's estimate beside each, and the `activation_scale` that `pipeline.gpu_fit`
  fits to their allocated peaks (as `pipeline/gpu_calibration.json` is fitted);
* speed: ours vs stock `I2VGenXLPipeline` (same weights, seed, dtype) at 512x512x16@50 and
  1024x1024x16@10, UNet TFLOP/s and MFU (`bench.generation_gpu.part_stock`);
* levers, solvers, bf16, compile: `bench.generation_gpu`'s parts at 512x512x16;
* farm: class detection from `nvidia-smi` and the class table against the measured memory;
* preview: live previews at 512p x 16 (20 steps): seconds per step without previews, every 1 s
  and after every step, and one preview alone (`bench.generation.measure_preview`);
* lora: LoRA adapters (ranks 8/32/64 on the attention projections) on the full-size UNet: first
  load (a miss), switch to a loaded one (a hit), step time with vs without (`part_lora`).

Also measures the GPU's two ceilings (bf16 matrix product, device-to-device copy) first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bench.generation_gpu as gg

GiB = 2**30
PARTS = ("memory", "speed", "levers", "solvers", "bf16", "compile", "farm", "fits", "profile", "offload", "preview",
         "lora")
#: rough seconds each part needs on an H100/H200 (skip it when less is left).
PART_SECONDS = {"memory": 90, "speed": 60, "levers": 150, "solvers": 70, "bf16": 50, "compile": 150, "farm": 5,
                "fits": 60, "profile": 20, "offload": 30, "preview": 60, "lora": 60}
RESOLUTIONS = (512, 768, 1024)
FRAMES = (8, 16, 24, 32)


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "cuda": str(torch.version.cuda)}
    try:
        import xformers

        out["xformers"] = xformers.__version__
    except ImportError:
        out["xformers"] = "not installed"
    return out


def ceilings() -> dict[str, float]:
    """Measured bf16 matrix rate (TFLOP/s) and copy bandwidth (GB/s, read + write)."""
    import torch

    if not gg._cuda():
        return {}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    out = {}
    for name, fn, work in (("matmul_bf16_tflops", lambda: a @ b, 2 * n**3 / 1e12),
                           ("copy_gb_s", lambda: y.copy_(x), 2 * x.numel() * 2 / 1e9)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        out[name] = work / sorted(times)[len(times) // 2]
    return out


class StagePeaks:
    """Peak allocated/reserved bytes per stage of one `Generator.generate` call.

    The stage ends are the first UNet call (conditioning -> denoise) and the first VAE decode
    (denoise -> decode); the peak counters are read and reset there."""

    def __init__(self, pipe):
        self.pipe, self.peaks, self.stage = pipe, {}, "conditioning"

    def _close(self, next_stage: str) -> None:
        self.peaks[self.stage] = {"allocated": gg._peak("allocated"), "reserved": gg._peak("reserved")}
        self.stage = next_stage
        gg._reset_peak()

    def _wrap(self, module, attr: str, next_stage: str, after: str):
        original, own = getattr(module, attr), vars(module).get(attr)  # `own`: e.g. accelerate's offload hook

        def wrapped(*a, **k):
            if self.stage == after:
                self._close(next_stage)
            return original(*a, **k)

        setattr(module, attr, wrapped)
        return lambda: setattr(module, attr, own) if own is not None else delattr(module, attr)

    def __enter__(self):
        self._undo = [self._wrap(self.pipe.unet, "forward", "denoise", "conditioning"),
                      self._wrap(self.pipe.vae, "decode", "decode", "denoise")]
        return self

    def __exit__(self, *exc):
        self._close("done")
        for undo in self._undo:
            undo()


def _memory_case(model, gen, case: str, w: int, h: int, f: int, *, chunk: int, offload: bool, ctx: int,
                 dtype: str = "float16") -> dict[str, Any]:
    from pipeline import cost_model

    row: dict[str, Any] = {"case": case, "width": w, "height": h, "frames": f, "decode_chunk_size": chunk,
                           "cpu_offload": offload, "dtype": dtype}
    wl = cost_model.Workload(w, h, f, 1, dtype=dtype, decode_chunk_size=chunk, cpu_offload=offload)
    est = cost_model.estimate(wl, cost_model.GPUS["rtx3060-12gb"])
    row.update(predicted_bytes=est.vram_bytes, predicted_stage=est.peak_stage)
    try:
        image = gg._image(w, h)
        params = gg._params(gg.Shape(w, h, f, 2))
        t = time.perf_counter()
        with StagePeaks(model.pipe) as peaks:
            gen.generate(image, params, size=(w, h))  # resets the peak counters first
        gg._sync()
        row["seconds"] = time.perf_counter() - t
        row["stages"] = peaks.peaks
        row["peak_allocated_bytes"] = max(p["allocated"] for p in peaks.peaks.values())
        row["peak_reserved_bytes"] = max(p["reserved"] for p in peaks.peaks.values())
        row["peak_stage"] = max(peaks.peaks, key=lambda s: peaks.peaks[s]["allocated"])
        row["card_bytes"] = row["peak_reserved_bytes"] + ctx
        row["predicted_over_card"] = est.vram_bytes / max(row["card_bytes"], 1)
    except Exception as exc:  # noqa: BLE001 - OOM and friends end this row only
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    gg._free()
    gg.emit(row)
    return row


def part_memory(shapes, ctx: int, offload: bool = True) -> dict[str, Any]:
    from pipeline import cost_model, gpu_fit
    from pipeline.generator import Generator, MemoryOptions

    dtype = "float16" if gg._cuda() else "float32"
    model = gg._build(dtype)
    rows = []
    gen = Generator(model)
    gg._free()  # the build's temporaries must not count as the first case's reserved memory
    if shapes:
        first = shapes[0]
        gen.warm_up(gg._image(first[0], first[0]), gg._params(gg.Shape(first[0], first[0], first[1], 1)),
                    size=(first[0], first[0]))
        for px, f in shapes:
            rows.append(_memory_case(model, gen, f"{px}p x{f}", px, px, f, chunk=1, offload=False, ctx=ctx,
                                     dtype=dtype))
        for chunk_px in sorted({shapes[0][0], shapes[-1][0]}):
            f = 16
            chunked = Generator(model, MemoryOptions(decode_chunk_size=8 if gg._cuda() else 2))
            rows.append(_memory_case(model, chunked, f"{chunk_px}p x{f} chunk {chunked.options.decode_chunk_size}",
                                     chunk_px, chunk_px, f, chunk=chunked.options.decode_chunk_size, offload=False,
                                     ctx=ctx, dtype=dtype))
    if offload and gg._cuda():  # cpu_offload: the same weights, kept in host memory between stages
        model.pipe.to("cpu")
        gg._free()
        model.pipe.enable_model_cpu_offload(device="cuda")
        model = replace(model, cpu_offload=True)
        off = Generator(model)
        for px in (512, 1024):
            rows.append(_memory_case(model, off, f"{px}p x16 cpu_offload", px, px, 16, chunk=1, offload=True,
                                     ctx=ctx, dtype=dtype))
    gg._free(gen, model)
    fitted: dict[str, Any] = {}
    measured = [r for r in rows if "error" not in r and not r["cpu_offload"] and gg._cuda()]
    if measured:
        cal = gpu_fit.calibration_from(measured, ctx)
        fitted = {"activation_scale": cal.activation_scale}
        for r in measured:
            r["calibrated_bytes"] = cost_model.estimate(
                cost_model.Workload(r["width"], r["height"], r["frames"], 1, dtype="float16",
                                    decode_chunk_size=r["decode_chunk_size"]),
                cost_model.GPUS["rtx3060-12gb"], cal).vram_bytes
    return {"rows": rows, "fitted": fitted}


#: Shapes tried under each class's memory cap (`fits`), smallest first.
FIT_SHAPES = {"12gb": [(512, 8), (512, 16), (512, 24), (512, 32), (768, 8), (768, 16)],
              "24gb": [(768, 24), (768, 32), (1024, 16), (1024, 24), (1024, 32)]}


def part_fits(ctx: int) -> list[dict[str, Any]]:
    """Run whole jobs with PyTorch capped at a class's memory minus the CUDA context
    (`torch.cuda.set_per_process_memory_fraction`): which shapes a card of that size holds, as
    measured, with the caching allocator freeing and retrying as it would on a real card."""
    import torch

    from cluster.vram_classes import default_classes
    from pipeline.errors import OutOfMemory
    from pipeline.generator import Generator

    classes = default_classes()
    model = gg._build("float16" if gg._cuda() else "float32")
    gen = Generator(model)
    rows = []
    total = torch.cuda.get_device_properties(0).total_memory if gg._cuda() else 0
    for cname, shapes in FIT_SHAPES.items():
        cap = classes[cname].memory_bytes - ctx
        if gg._cuda():
            torch.cuda.set_per_process_memory_fraction(cap / total)
        for px, f in shapes if gg._cuda() else [(64, 8)]:
            gg._free()
            row: dict[str, Any] = {"class": cname, "cap_bytes": cap, "case": f"{px}p x{f}", "width": px,
                                   "height": px, "frames": f}
            try:
                m = gg.measure_ours(gen, gg.Shape(px, px, f, 2))
                row.update(fits=True, peak_allocated_bytes=m["peak_allocated_bytes"],
                           peak_reserved_bytes=m["peak_reserved_bytes"])
            except OutOfMemory as exc:
                row.update(fits=False, error=str(exc)[:200])
            gg.emit(row)
            rows.append(row)
    if gg._cuda():
        torch.cuda.set_per_process_memory_fraction(1.0)
    gg._free(gen, model)
    return rows


def part_profile() -> dict[str, Any]:
    """Where a UNet step's time goes at 512x512x16 (fp16, defaults): CUDA kernel time by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.generator import Generator

    px, f = (512, 16) if gg._cuda() else (64, 8)
    model = gg._build("float16" if gg._cuda() else "float32")
    gen = Generator(model)
    shape = gg.Shape(px, px, f, 3)
    gen.warm_up(gg._image(px, px), gg._params(shape), size=(px, px))
    activities = [ProfilerActivity.CUDA] if gg._cuda() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        gen.generate(gg._image(px, px), gg._params(shape), size=(px, px))
        gg._sync()
    kinds = {"attention": ("flash", "fmha", "attention", "sdpa", "efficient"), "gemm": ("gemm", "cutlass", "sm90_xmma",
             "nvjet", "matmul", "cublas"), "conv": ("conv", "implicit", "winograd", "cudnn"), "norm": ("norm",),
             "softmax": ("softmax",)}
    by_kind: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0.0) if gg._cuda() else ev.self_cpu_time_total
        if t <= 0 or (gg._cuda() and ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        name = ev.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "elementwise/other")
        by_kind[kind] = by_kind.get(kind, 0.0) + t / 1e6
        top.append((t / 1e6, ev.key[:120], ev.count))
    top.sort(reverse=True)
    gg._free(gen, model)
    total = sum(by_kind.values())
    out = {"shape": f"{px}x{px}x{f}", "steps": 3, "kernel_s_by_kind": by_kind, "kernel_s_total": total,
           "top_kernels": [{"s": s, "kernel": k, "calls": c} for s, k, c in top[:25]]}
    print(json.dumps({"part": "profile", **{k: round(v, 3) for k, v in by_kind.items()}}), flush=True)
    return out


def part_preview(p: Plan) -> dict[str, Any]:
    """Live previews on the full-size model at 512p x 16 (the issue's target: under 2% of the step
    time): the same 20-step job without previews, every 1 s (the farm's default) and after every
    step, round-robin twice (`bench.generation.measure_preview`); and one preview alone."""
    from bench.generation import measure_preview, preview_alone, print_preview
    from pipeline.generator import Generator

    px, f, steps = (512, 16, 20) if gg._cuda() else (64, 8, 2)
    model = gg._build(p.dtype)
    gen = Generator(model)
    shape = gg.Shape(px, px, f, steps)
    rows = measure_preview(gen, gg._image(px, px), gg._params(shape), (px, px), repeat=2 if gg._cuda() else 1,
                           sync=gg._sync)
    print_preview(rows)
    alone = preview_alone((f, 4, px // 8, px // 8), device=gg.DEVICE)
    gg._free(gen, model)
    out = {"shape": f"{px}x{px}x{f}@{steps}", "rows": rows, "alone_s": alone}
    print(json.dumps({"part": "preview", "alone_ms": round(alone * 1000, 2),
                      **{r["variant"]: {"x_off": round(r["ratio"], 4), "share": round(r["preview_share"], 4)}
                         for r in rows}}), flush=True)
    return out


def part_lora(p: Plan) -> dict[str, Any]:
    """LoRA adapters on the full-size UNet (`pipeline.adapters`, PEFT): per rank, the first load of
    an adapter (parse, check against the UNet, inject, copy in: a cache miss), the switch to an
    adapter already loaded (a hit: activate + deactivate), and seconds per denoising step with the
    adapter active vs the base (LoRA stays unmerged); and whether the base is restored exactly."""
    import torch

    from pipeline.adapters import AdapterCache, lora_bytes, random_lora
    from pipeline.generator import Generator

    px, f, steps = (512, 16, 4) if gg._cuda() else (64, 8, 2)
    model = gg._build(p.dtype)
    gen = Generator(model)
    unet = gen.pipe.unet
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    files = {f"r{r}": lora_bytes(random_lora(unet, rank=r, seed=r, targets=targets)) for r in (8, 32, 64)}
    cache = AdapterCache(unet, lambda name, _sha: files[name], 64 * GiB)
    shape = gg.Shape(px, px, f, steps)
    image, params = gg._image(px, px), gg._params(shape)

    def step_s() -> tuple[float, Any]:
        gg._sync()
        t = time.perf_counter()
        frames = gen.generate(image, params, size=(px, px)).frames
        gg._sync()
        return (time.perf_counter() - t) / steps, frames

    gen.generate(image, params.model_copy(update={"num_inference_steps": 1}), size=(px, px))  # warm up
    base_s, base_frames = step_s()
    rows = []
    for name, data in files.items():
        spec = [{"name": name, "scale": 1.0}]
        gg._sync()
        t = time.perf_counter()
        with cache.applied(spec) as stats:
            gg._sync()
            load_s = time.perf_counter() - t
            lora_step_s, lora_frames = step_s()
        t = time.perf_counter()
        for _ in range(5):
            with cache.applied(spec):
                pass
        gg._sync()
        switch_s = (time.perf_counter() - t) / 5
        rows.append({"adapter": name, "bytes": len(data), "miss_load_s": load_s, "misses": stats.misses,
                     "hit_switch_s": switch_s, "step_s": lora_step_s, "base_step_s": base_s,
                     "step_overhead": lora_step_s / base_s - 1, "differs_from_base": bool(
                         (lora_frames != base_frames).any())})
        print(json.dumps({"part": "lora", **{k: (round(v, 4) if isinstance(v, float) else v)
                                             for k, v in rows[-1].items()}}), flush=True)
    _, after = step_s()
    restored = bool((after == base_frames).all())
    gg._free(gen, model, cache)
    if gg._cuda():
        torch.cuda.empty_cache()
    return {"shape": f"{px}x{px}x{f}@{steps}", "rows": rows, "base_restored_exactly": restored}


def part_farm(memory_rows) -> dict[str, Any]:
    from cluster.gpus import detect_gpus
    from cluster.join import classify
    from cluster.vram_classes import default_classes

    classes = default_classes()
    out: dict[str, Any] = {}
    try:
        gpus = detect_gpus()
        out["detected"] = [{"gpu": asdict(g), "class": c.name} for g, c in classify(gpus, classes)]
    except Exception as exc:  # noqa: BLE001
        out["detected_error"] = f"{type(exc).__name__}: {exc}"
    holds = {}
    for c in classes:
        holds[c.name] = [{"case": r["case"], "card_gib": round(r["card_bytes"] / GiB, 2),
                          "margin_gib": round((c.memory_bytes - r["card_bytes"]) / GiB, 2)}
                         for r in memory_rows if "card_bytes" in r and not r["cpu_offload"]
                         and r["card_bytes"] <= c.memory_bytes]
    out["class_holds_as_measured"] = holds
    out["note"] = ("Ray Serve, FastAPI and MinIO are not installed on the lent GPU machine and Ray's wheel "
                   "exceeds what can be carried there: the farm itself (HTTP -> Serve -> worker) did not run "
                   "on the GPU; the worker's generator did (memory/speed parts).")
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON files go")
    p.add_argument("--budget-s", type=float, default=500.0, help="skip parts that would not end within this")
    p.add_argument("--parts", type=lambda s: gg.parse_choice_list(s, PARTS, "--parts"), default=list(PARTS))
    p.add_argument("--tag", default="", help="suffix of the JSON file names (e.g. the allocator setting)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every part on the CPU with the tiny architecture and tiny shapes (checks the "
                        "suite itself; its numbers mean nothing)")
    return p.parse_args(argv)


@dataclass
class Plan:
    """Where the suite runs and at which sizes."""

    gpu: str
    peak: float | None
    ctx: int
    big: str  # shapes of ours vs stock
    small: str  # the shape of levers and solvers
    dtype: str
    mem_shapes: list[tuple[int, int]]


def plan(dry_run: bool) -> Plan | None:
    """The GPU (or, for a dry run, the CPU with tiny shapes); None without a GPU."""
    import torch

    if dry_run:
        gg.DEVICE = "cpu"
        return Plan("dry-run-cpu", None, 0, "64x64x8@2", "64x64x8@2", "float32", [(64, 8), (64, 16)])
    if not torch.cuda.is_available():
        return None
    gg.DEVICE = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    torch.empty(1, device="cuda") @ torch.empty(1, 1, device="cuda")  # cuBLAS into the context
    return Plan(gpu, gg.peak_tflops_for(gpu), gg.context_bytes(), "512x512x16@50,1024x1024x16@10",
                "512x512x16@20", "float16", [(px, f) for px in RESOLUTIONS for f in FRAMES])


def part_steps(p: Plan, results: dict[str, Any]) -> tuple[dict[str, Any], SimpleNamespace]:
    """Each part: a function that runs it and files its rows under `results`; and the
    arguments the summary table is printed with."""
    def ns(shapes: str, dtypes=(p.dtype,), **kw) -> SimpleNamespace:
        return SimpleNamespace(**{"shapes": gg.parse_shapes(shapes), "dtypes": list(dtypes), "project_steps": 50,
                                  "no_stock": False, "levers": [], "solver_steps": [10, 20, 25], **kw})

    levers = [lv for lv in gg.LEVERS if lv != "compile"]
    mem, speed = results["memory"], results["speed"]
    return {
        "memory": lambda: mem.update(part_memory(p.mem_shapes, p.ctx, offload=False)),
        "speed": lambda: speed.update(stock=gg.part_stock(ns(p.big), p.ctx, p.peak)),
        "levers": lambda: speed.update(levers=gg.part_levers(ns(p.small, levers=levers), p.peak)),
        "solvers": lambda: speed.update(solvers=gg.part_solvers(ns(p.small))),
        "bf16": lambda: speed.update(stock_bf16=gg.part_stock(ns(p.big, ("bfloat16",)), p.ctx, p.peak)),
        "compile": lambda: speed.update(compile=gg.part_levers(ns(p.small, levers=["compile"]), p.peak)),
        "farm": lambda: results["farm"].update(part_farm(mem.get("rows", []))),
        "fits": lambda: mem.update(fits=part_fits(p.ctx)),
        "profile": lambda: speed.update(profile=part_profile()),
        "offload": lambda: mem.update(offload=part_memory([], p.ctx)["rows"]),
        "preview": lambda: speed.update(preview=part_preview(p)),
        "lora": lambda: speed.update(lora=part_lora(p)),
    }, ns(p.big)


def print_summary(p: Plan, results: dict[str, Any], report_ns) -> None:
    sp = results["speed"]
    gg.report(report_ns, p.gpu, p.peak, sp.get("stock", []) + sp.get("stock_bf16", []),
              sp.get("levers", []) + sp.get("compile", []), sp.get("solvers", []), [], {})
    for r in results["memory"].get("rows", []):
        if "error" in r:
            print(f"{r['case']:>28}: {r['error']}")
        else:
            print(f"{r['case']:>28}: alloc {r['peak_allocated_bytes'] / GiB:6.2f} card {r['card_bytes'] / GiB:6.2f} "
                  f"predicted {r['predicted_bytes'] / GiB:6.2f} GiB  peak in {r['peak_stage']} "
                  f"(model: {r['predicted_stage']})")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from pipeline.loading import _quiet_libraries

    _quiet_libraries()
    p = plan(args.dry_run)
    if p is None:
        print("no CUDA GPU: run with --dry-run on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    slug = _slug(p.gpu) + (f"-{args.tag}" if args.tag else "")
    head = {"gpu": p.gpu, "peak_tflops": p.peak, "context_bytes": p.ctx, "versions": versions(),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "command": "python -m bench.gpu_suite " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(head), flush=True)
    head["ceilings"] = ceilings()
    print(json.dumps(head["ceilings"]), flush=True)
    results: dict[str, Any] = {"memory": {}, "speed": {}, "farm": {}}
    steps, report_ns = part_steps(p, results)
    head["skipped"] = []
    for part in args.parts:
        left = args.budget_s - (time.perf_counter() - started)
        if not args.dry_run and left < PART_SECONDS[part]:
            head["skipped"].append(part)
            print(f"skip {part}: {left:.0f} s left of the budget, it needs ~{PART_SECONDS[part]} s", flush=True)
            continue
        t = time.perf_counter()
        try:
            steps[part]()
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            where = part if part in ("memory", "farm") else "speed"
            results[where][f"{part}_error"] = f"{type(exc).__name__}: {exc}"
            print(f"part {part} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"part {part}: {time.perf_counter() - t:.1f} s", flush=True)
        for name, body in results.items():  # after every part: a run cut short keeps what it measured
            (args.out / f"gpu-{name}-{slug}.json").write_text(
                json.dumps({**head, **body}, indent=1, default=float) + "\n")
    print_summary(p, results, report_ns)
    print(f"done in {time.perf_counter() - started:.0f} s; files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
