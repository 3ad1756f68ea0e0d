"""GPU generation benchmark on the full-size I2VGen-XL architecture with random weights.

    python -m bench.generation_gpu [--shapes 512x512x16,1024x1024x16] [--steps 4] [--dtypes float16,bfloat16]

Builds `architecture.FULL_SIZE` directly on the GPU with seeded random weights (same cost as the
real model; no download), then for each shape and dtype runs, side by side in one process:

* our `Generator` (what the farm runs), and
* diffusers' stock `I2VGenXLPipeline.__call__` on the same components (given the same
  penultimate-layer prompt embeddings, since its own clip_skip path fails on transformers 5),

each after a warm-up, and prints seconds per denoising step, decode seconds, the projected
seconds of a job with `--project-steps` steps, peak VRAM (`torch.cuda.max_memory_allocated`), and
the UNet's achieved TFLOP/s against the cost model's FLOP count. Needs a CUDA GPU; prints a JSON
line per measurement (for `docs/benchmarks.md` and the cost model's calibration) and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import PIL.Image


def _build(dtype):
    import torch
    from diffusers import I2VGenXLPipeline

    from pipeline.architecture import FULL_SIZE, build_components
    from pipeline.loading import LoadedModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        components = build_components(FULL_SIZE)
    pipe = I2VGenXLPipeline(**components).to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, name="full-size-random", source="random", device="cuda",
                       dtype=str(dtype).removeprefix("torch."), cpu_offload=False, load_seconds=0.0)


def _image(width, height):
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))


def _unet_flops_per_step(width, height, frames):
    try:
        from pipeline import cost_model

        est = cost_model.estimate(cost_model.Workload(width=width, height=height, num_frames=frames,
                                                      num_inference_steps=1), next(iter(cost_model.GPUS.values())))
        return est.flops_by_stage["unet"]
    except Exception:  # noqa: BLE001 - the cost model is optional for the timing itself
        return float("nan")


def measure_ours(model, width, height, frames, steps, chunk):
    import torch

    from pipeline.generator import Generator, MemoryOptions
    from pipeline.request import parse_params

    gen = Generator(model, MemoryOptions(decode_chunk_size=chunk))
    image = _image(width, height)
    warm = parse_params({"prompt": "a cat", "num_frames": frames, "num_inference_steps": 1, "seed": 1})
    gen.generate(image, warm, size=(width, height))
    params = parse_params({"prompt": "a cat turning its head", "num_frames": frames,
                           "num_inference_steps": steps, "seed": 1})
    torch.cuda.synchronize()
    result = gen.generate(image, params, size=(width, height))
    return {"step_s": result.timings["denoise"] / steps, "decode_s": result.timings["decode"],
            "conditioning_s": result.timings["conditioning"], "peak_vram_bytes": result.peak_memory_bytes}


def measure_stock(model, width, height, frames, steps, chunk):
    import torch

    from pipeline.generator import Generator

    pipe = model.pipe
    gen = Generator(model)  # only for its text encoder helper
    image = _image(width, height)
    with torch.inference_mode():
        pe, ne = gen.encode_text("a cat turning its head"), gen.encode_text("")
    kwargs = dict(image=image, prompt_embeds=pe, negative_prompt_embeds=ne, width=width, height=height,
                  num_frames=frames, decode_chunk_size=chunk, output_type="np")
    pipe(num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipe(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    torch.cuda.synchronize()
    total = time.perf_counter() - started
    return {"total_s": total, "peak_vram_bytes": int(torch.cuda.max_memory_allocated())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="512x512x16,768x768x16,1024x1024x16,512x512x32")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--project-steps", type=int, default=50)
    parser.add_argument("--decode-chunk-size", type=int, default=1)
    parser.add_argument("--stock", action="store_true", help="also time the stock diffusers pipeline")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one (see docs/benchmarks.md)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = _build(dtype)
        for shape in args.shapes.split(","):
            width, height, frames = (int(v) for v in shape.split("x"))
            row = {"gpu": gpu, "dtype": dtype_name, "width": width, "height": height, "frames": frames,
                   "steps": args.steps, "decode_chunk_size": args.decode_chunk_size}
            try:
                row.update(measure_ours(model, width, height, frames, args.steps, args.decode_chunk_size))
                row["job_s"] = row["conditioning_s"] + args.project_steps * row["step_s"] + row["decode_s"]
                flops = _unet_flops_per_step(width, height, frames)
                row["unet_tflops"] = flops / row["step_s"] / 1e12
                if args.stock:
                    stock = measure_stock(model, width, height, frames, args.steps, args.decode_chunk_size)
                    row["stock_total_s"] = stock["total_s"]
                    row["stock_peak_vram_bytes"] = stock["peak_vram_bytes"]
                    row["ours_total_s"] = row["conditioning_s"] + args.steps * row["step_s"] + row["decode_s"]
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
        torch.cuda.empty_cache()

    print(f"\nfull-size I2VGen-XL, random weights, {gpu}; decode_chunk_size={args.decode_chunk_size}")
    print(f"{'dtype':9} {'shape':>14} {'s/step':>7} {'decode s':>8} {f'job s@{args.project_steps}':>9} "
          f"{'peak GiB':>8} {'UNet TF/s':>9} {'stock/ours':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['dtype']:9} {r['width']}x{r['height']}x{r['frames']:>3}  {r['error']}")
            continue
        ratio = r["stock_total_s"] / r["ours_total_s"] if "stock_total_s" in r else float("nan")
        print(f"{r['dtype']:9} {r['width']:>5}x{r['height']}x{r['frames']:<3} {r['step_s']:7.3f} {r['decode_s']:8.2f} "
              f"{r['job_s']:9.1f} {r['peak_vram_bytes'] / 2**30:8.2f} {r['unet_tflops']:9.1f} {ratio:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
