"""Generation benchmark on the CPU: our generator against diffusers' stock pipeline, and the levers.

    .venv/bin/python -m bench.generation [--size 256x256] [--frames 8] [--steps 10] [--repeat 3]
                                         [--reference-steps 50] [--solver-steps 10,20,25]
                                         [--parts stock,levers,solvers,preview] [--levers NAME,...] [--compile]
                                         [--threads N] [--json FILE]

Everything runs on the `tiny-random` model, loaded through the farm's own loading path
(`pipeline.loading.load_model("tiny-random")`), on one image, one prompt and one seed, in one
process, and prints three tables (the GPU version, on the full-size architecture, is
`python -m bench.generation_gpu`):

1. **ours vs stock**: `Generator.generate` against diffusers' `I2VGenXLPipeline.__call__` on the
   same components, steps and seed, interleaved `--repeat` times. The stock pipeline is called as
   `tests/unit/test_generator.py` calls it: with penultimate-layer CLIP prompt embeddings computed
   beforehand (its own `clip_skip` path crashes with transformers 5; that time is counted in its
   column) and the global RNG seeded for its VAE posterior sample. The largest pixel difference
   is printed too: the two compute the same video (within one 8-bit level).
2. **levers**, each alone and together, as a worker would run them (`MemoryOptions` of
   `pipeline.generator`), every variant on its own freshly loaded copy of the model (levers
   change the model in place), warmed up once, then timed round-robin (`--repeat` rounds, so a
   noisy neighbour hits every variant alike). Two rows switch a default *off* to show what it is
   worth: `classic attention` (diffusers' `AttnProcessor`, no SDPA) and `CFG split` (the
   guidance batch as two UNet calls instead of one). `x base` > 1 means faster than the
   baseline (the farm's defaults). `max diff` / `PSNR` compare the frames with the baseline's
   (same seed): exact levers stay within float rounding (<= 1 level). `compile` (`torch.compile`
   of the UNet) only runs with `--compile`: on a 2-core CPU its first call compiles for ~2 minutes.
   Each row shows the median and the best run: on a shared machine interference only ever adds
   time, so the best runs are the cleaner comparison; `spread` = (max - min) / median.
3. **solvers and step caching** against the `--reference-steps` (50) step DDIM result, the
   farm's default: seconds, speed-up, and per-frame PSNR/SSIM (mean and worst frame).
   `dpmsolver++` and `unipc` are the farm's (`scheduler=` in a request): built from the model's
   DDIM config, so v-prediction on the zero-terminal-SNR schedule (`rescale_betas_zero_snr`) with
   its `leading` timestep spacing; the `trailing` rows (an experiment, not a farm option) start
   at t=999 as the zero-SNR paper recommends. `attention cache` rows are the 50-step DDIM run
   with Pyramid Attention Broadcast (`MemoryOptions.attention_cache`).
4. **live previews**: the same job without previews, at `--preview-interval` (1 s, the farm's
   default) and after every step, round-robin: seconds per step and their ratio, previews per
   job, milliseconds per preview and its share of the denoise time (`pipeline.preview`); and one
   preview of 512p x 16 latents alone.

On a CPU shared with other work, `--threads 1` gives far steadier numbers: two OpenMP threads on
two oversubscribed cores stall whenever one of them is descheduled (docs/benchmarks.md).

Quality numbers on random weights are a proxy only: they measure how far a faster computation
lands from the reference computation of the *same random network*, not how good a video looks.
On the real weights the gap can be larger or smaller; check with the real model before turning a
lever that changes the output on for users.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a lighthouse on a cliff, waves rolling in"
NEGATIVE = "blurry, static"
SEED = 1234
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "sample.png"


# ------------------------------------------------------------------------------- pure pieces


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy a set of repeated timings is."""
    if len(values) < 2:
        return 0.0
    m = median(values)
    return (max(values) - min(values)) / m if m > 0 else float("nan")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images (inf when identical)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter2d(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2D array with the 1D window `w` (rows, then columns)."""
    from numpy.lib.stride_tricks import sliding_window_view

    rows = sliding_window_view(img, len(w), axis=1) @ w
    return sliding_window_view(rows, len(w), axis=0) @ w


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03) of two HxW or HxWxC images, averaged over the valid window positions and channels."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        return float(np.mean([ssim(a[..., c], b[..., c], peak) for c in range(a.shape[2])]))
    w = _gaussian_window()
    if min(a.shape) < len(w):
        raise ValueError(f"images must be at least {len(w)}x{len(w)} for SSIM, got {a.shape}")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _filter2d(a, w), _filter2d(b, w)
    var_a = _filter2d(a * a, w) - mu_a**2
    var_b = _filter2d(b * b, w) - mu_b**2
    cov = _filter2d(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def frame_quality(frames: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-frame PSNR and SSIM of a video (F, H, W, C) against a reference: mean and worst frame."""
    if frames.shape != reference.shape:
        raise ValueError(f"shapes differ: {frames.shape} vs {reference.shape}")
    p = [psnr(f, r) for f, r in zip(frames, reference)]
    s = [ssim(f, r) for f, r in zip(frames, reference)]
    return {"psnr_mean": float(np.mean(p)), "psnr_min": float(np.min(p)),
            "ssim_mean": float(np.mean(s)), "ssim_min": float(np.min(s)),
            "max_diff": float(np.abs(frames.astype(np.int16) - reference.astype(np.int16)).max())}


def fmt_db(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1f}"


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if w % 8 or h % 8 or w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"size must be multiples of 8, at least 64x64, got {text!r}")
    return w, h


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def machine() -> dict[str, Any]:
    """What ran the numbers: cores, CPU model, load, library versions, torch threads."""
    import diffusers
    import torch

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable,
            "load_average": [round(v, 2) for v in os.getloadavg()], "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}


def describe_machine(info: dict[str, Any]) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
            f"load average {'/'.join(str(v) for v in info['load_average'])}; torch {info['torch']} "
            f"({info['torch_threads']} threads), diffusers {info['diffusers']}, Python {info['python']}")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """Plain-text table; columns in `left` (default: the first) left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ------------------------------------------------------------------------------- running jobs


@dataclass
class Job:
    """One measured run."""

    seconds: float
    timings: dict[str, float]
    frames: np.ndarray


def bench_image():
    import PIL.Image

    from pipeline.images import load_image

    if SAMPLE_IMAGE.is_file():
        return load_image(SAMPLE_IMAGE.read_bytes())
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, size=(512, 640, 3), dtype=np.uint8))


def job_params(frames: int, steps: int, scheduler: str = "ddim"):
    from pipeline.request import parse_params

    return parse_params({"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_frames": frames,
                         "num_inference_steps": steps, "seed": SEED, "scheduler": scheduler,
                         "guidance_scale": 9.0, "target_fps": 16})


def fresh_model():
    from pipeline.loading import load_model

    return load_model("tiny-random", device="cpu")


def run_ours(gen, image, params, size) -> Job:
    started = time.perf_counter()
    result = gen.generate(image, params, size=size)
    return Job(time.perf_counter() - started, dict(result.timings), result.frames)


def penultimate_embedding(pipe, text: str):
    """CLIP text features of the second-to-last layer through the final layer norm, straight from
    transformers (what the stock pipeline's clip_skip=1 means; as in tests/unit/test_generator.py)."""
    ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device), output_hidden_states=True).hidden_states
    return pipe.text_encoder.final_layer_norm(hidden[-2])


def run_stock(pipe, image, params, size, decode_chunk_size: int) -> Job:
    """diffusers' `I2VGenXLPipeline.__call__` on the same job (embeddings counted in the time)."""
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        prompt_embeds = penultimate_embedding(pipe, params.prompt)
        negative_embeds = penultimate_embedding(pipe, params.negative_prompt)
        torch.manual_seed(params.seed)  # the stock pipeline samples the image posterior from the global RNG
        frames = pipe(
            image=image, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
            width=size[0], height=size[1], target_fps=params.target_fps, num_frames=params.num_frames,
            num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(params.seed), decode_chunk_size=decode_chunk_size,
            output_type="np",
        ).frames[0]
    seconds = time.perf_counter() - started
    return Job(seconds, {}, (frames * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------- levers


def classic_attention(gen) -> None:
    """Bench-only: diffusers' plain `AttnProcessor` (explicit softmax(QK^T)V, no SDPA)."""
    from diffusers.models.attention_processor import AttnProcessor

    gen.pipe.unet.set_attn_processor(AttnProcessor())


def split_cfg(gen) -> None:
    """Bench-only: run the guidance batch [uncond, cond] as two UNet calls of batch 1."""
    import torch

    unet = gen.pipe.unet
    forward = unet.forward

    def two_calls(sample, timestep, encoder_hidden_states, fps, image_latents, image_embeddings, **kwargs):
        if sample.shape[0] == 1:
            return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, fps=fps,
                           image_latents=image_latents, image_embeddings=image_embeddings, **kwargs)
        outs = [forward(sample[i : i + 1], timestep, encoder_hidden_states=encoder_hidden_states[i : i + 1],
                        fps=fps[i : i + 1], image_latents=image_latents[i : i + 1],
                        image_embeddings=image_embeddings[i : i + 1], **kwargs)[0]
                for i in range(sample.shape[0])]
        return (torch.cat(outs),)

    unet.forward = two_calls


@dataclass(frozen=True)
class Lever:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    """`MemoryOptions` fields (what a worker would set)."""
    patch: Callable[[Any], None] | None = None
    """Bench-only change to the Generator's model (turns a default off)."""
    exact: bool = True
    """Expected to give the baseline's frames (float rounding aside)."""
    note: str = ""


def levers(frames: int, with_compile: bool) -> list[Lever]:
    exact_all = {"channels_last": True, "fuse_qkv": True, "decode_chunk_size": frames}
    out = [
        Lever("baseline", note="farm defaults: SDPA, CFG in one UNet call, decode_chunk_size=1"),
        Lever("classic attention", patch=classic_attention, note="SDPA off (diffusers AttnProcessor)"),
        Lever("CFG split", patch=split_cfg, note="guidance batch as 2 UNet calls"),
        Lever("channels_last", {"channels_last": True}),
        Lever("fuse_qkv", {"fuse_qkv": True}),
        Lever(f"decode_chunk_size={frames}", {"decode_chunk_size": frames}, note="all frames at once"),
        Lever("attention_cache=2", {"attention_cache": 2}, exact=False, note="PAB, spatial, t in (100, 800)"),
    ]
    if with_compile:
        out.append(Lever("compile", {"compile": True}))
    out.append(Lever("exact levers together", exact_all, note="channels_last + fuse_qkv + decode chunk"))
    together = {**exact_all, "attention_cache": 2, **({"compile": True} if with_compile else {})}
    out.append(Lever("all together", together, exact=False,
                     note="+ attention_cache=2" + (" + compile" if with_compile else "")))
    return out


def make_generator(lever: Lever):
    from pipeline.generator import Generator, MemoryOptions

    gen = Generator(fresh_model(), MemoryOptions(**lever.options))
    if lever.patch is not None:
        lever.patch(gen)
    return gen


# ------------------------------------------------------------------------------- the three parts


def ours_vs_stock(image, size, frames, steps, repeat) -> dict[str, Any]:
    from pipeline.generator import Generator

    gen = Generator(fresh_model())  # SDPA + VAE slicing on the shared components: stock uses them too
    params = job_params(frames, steps)
    warm = job_params(frames, 1)
    run_ours(gen, image, warm, size)
    run_stock(gen.pipe, image, warm, size, gen.options.decode_chunk_size)
    ours, stock = [], []
    for i in range(repeat):
        order = (("ours", "stock") if i % 2 == 0 else ("stock", "ours"))
        for who in order:
            if who == "ours":
                ours.append(run_ours(gen, image, params, size))
            else:
                stock.append(run_stock(gen.pipe, image, params, size, gen.options.decode_chunk_size))
    diff = np.abs(ours[-1].frames.astype(np.int16) - stock[-1].frames.astype(np.int16))
    return {"ours_s": [j.seconds for j in ours], "stock_s": [j.seconds for j in stock],
            "max_diff": int(diff.max()), "mean_diff": float(diff.mean())}


def print_ours_vs_stock(res: dict[str, Any], repeat: int) -> None:
    o, s = median(res["ours_s"]), median(res["stock_s"])
    print(table(
        ["", "median s/job", "best s/job", "spread", "runs"],
        [["ours (pipeline.generator)", f"{o:.3f}", f"{min(res['ours_s']):.3f}", f"{spread(res['ours_s']):.0%}",
          str(repeat)],
         ["stock I2VGenXLPipeline", f"{s:.3f}", f"{min(res['stock_s']):.3f}", f"{spread(res['stock_s']):.0%}",
          str(repeat)]]))
    print(f"stock/ours = {s / o:.3f} by median, {min(res['stock_s']) / min(res['ours_s']):.3f} by best run "
          f"(> 1: ours faster); frames differ by at most {res['max_diff']} 8-bit level(s) "
          f"(mean {res['mean_diff']:.4f})")


def run_levers(image, size, frames, steps, repeat, chosen: list[Lever]) -> list[dict[str, Any]]:
    params = job_params(frames, steps)
    gens, warmup = [], []
    for lever in chosen:
        gen = make_generator(lever)
        t = time.perf_counter()
        run_ours(gen, image, job_params(frames, 1), size)  # warm-up (compiles with `compile`)
        warmup.append(time.perf_counter() - t)
        gens.append(gen)
        print(f"  ready: {lever.name} (warm-up {warmup[-1]:.1f} s)", file=sys.stderr, flush=True)
    runs: list[list[Job]] = [[] for _ in chosen]
    for r in range(repeat):
        order = range(len(chosen)) if r % 2 == 0 else reversed(range(len(chosen)))
        for i in order:
            runs[i].append(run_ours(gens[i], image, params, size))
    base = runs[0]
    rows = []
    for lever, jobs, w in zip(chosen, runs, warmup):
        q = frame_quality(jobs[-1].frames, base[-1].frames)
        rows.append({
            "lever": lever.name, "note": lever.note, "options": lever.options, "exact": lever.exact,
            "seconds": [j.seconds for j in jobs], "denoise_s": median([j.timings["denoise"] for j in jobs]),
            "decode_s": median([j.timings["decode"] for j in jobs]), "warmup_s": w, **q,
        })
    return rows


def print_levers(rows: list[dict[str, Any]]) -> None:
    base, base_best = median(rows[0]["seconds"]), min(rows[0]["seconds"])
    out = []
    for r in rows:
        s, best = median(r["seconds"]), min(r["seconds"])
        out.append([r["lever"], f"{s:.3f}", f"{best:.3f}", f"{spread(r['seconds']):.0%}", f"{r['denoise_s']:.3f}",
                    f"{r['decode_s']:.3f}", f"{base / s:.2f}", f"{base_best / best:.2f}", f"{r['max_diff']:.0f}",
                    fmt_db(r["psnr_mean"]), r["note"]])
    print(table(["lever", "median s/job", "best s/job", "spread", "denoise s", "decode s", "x base", "x base (best)",
                 "max diff", "PSNR dB", "what"], out, left=(0, 10)))
    print("x base: the baseline's time over the lever's (> 1: faster), by median and by best run (interference "
          "only ever adds time, so the best runs are the cleaner comparison on a shared machine)")


def solver_variants(reference_steps: int, solver_steps: list[int]) -> list[tuple[str, str, int, dict[str, Any], str]]:
    """(label, scheduler, steps, MemoryOptions fields, timestep spacing) rows of part 3."""
    rows = [(f"ddim {reference_steps} (reference)", "ddim", reference_steps, {}, "leading")]
    for steps in solver_steps:
        if steps >= reference_steps:
            continue
        rows.append((f"ddim {steps}", "ddim", steps, {}, "leading"))
        rows.append((f"dpmsolver++ {steps}", "dpmsolver++", steps, {}, "leading"))
        rows.append((f"unipc {steps}", "unipc", steps, {}, "leading"))
        rows.append((f"dpmsolver++ {steps} trailing", "dpmsolver++", steps, {}, "trailing"))
    for skip in (2, 3):
        rows.append((f"ddim {reference_steps} + attention cache {skip}", "ddim", reference_steps,
                     {"attention_cache": skip}, "leading"))
    return rows


def run_solvers(image, size, frames, reference_steps, solver_steps) -> list[dict[str, Any]]:
    from pipeline.generator import Generator, MemoryOptions

    plain = Generator(fresh_model())
    run_ours(plain, image, job_params(frames, 1), size)
    trailing = Generator(fresh_model())
    trailing.pipe.scheduler = trailing.pipe.scheduler.__class__.from_config(
        trailing.pipe.scheduler.config, timestep_spacing="trailing")
    cached: dict[tuple, Any] = {}
    rows, reference = [], None
    for label, scheduler, steps, options, spacing in solver_variants(reference_steps, solver_steps):
        if options:
            key = tuple(sorted(options.items()))
            if key not in cached:
                cached[key] = Generator(fresh_model(), MemoryOptions(**options))
                run_ours(cached[key], image, job_params(frames, 1), size)
            gen = cached[key]
        else:
            gen = trailing if spacing == "trailing" else plain
        job = run_ours(gen, image, job_params(frames, steps, scheduler), size)
        if reference is None:
            reference = job
        rows.append({"variant": label, "scheduler": scheduler, "steps": steps, "options": options,
                     "timestep_spacing": spacing, "seconds": job.seconds,
                     **frame_quality(job.frames, reference.frames)})
        print(f"  done: {label} ({job.seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------- live previews


#: The variants of the preview part: previews off, at the farm's default interval, after every step.
EVERY_STEP = 1e-9


def preview_variants(interval_s: float) -> list[tuple[str, float | None]]:
    return [("off", None), (f"every {interval_s:g} s", interval_s), ("every step", EVERY_STEP)]


def summarize_preview(rows: dict[str, list[dict[str, float]]], steps: int) -> list[dict[str, Any]]:
    """Per variant (the first is "off"): median seconds per denoising step, its ratio to "off",
    previews per job, seconds per preview and their share of the denoise time (measured inside the
    loop: steadier than the ratio on a shared machine), and the preview's size."""
    base = median([r["denoise_s"] / steps for r in rows["off"]])
    out = []
    for name, runs in rows.items():
        step = median([r["denoise_s"] / steps for r in runs])
        count = sum(r["previews"] for r in runs)
        made = sum(r["preview_s"] for r in runs)
        out.append({
            "variant": name, "step_s": step, "step_s_runs": [r["denoise_s"] / steps for r in runs],
            "ratio": step / base if base else float("nan"),
            "previews_per_job": count / len(runs), "s_per_preview": made / count if count else 0.0,
            "preview_share": made / sum(r["denoise_s"] for r in runs),
            "bytes_per_preview": sum(r["bytes"] for r in runs) / count if count else 0,
        })
    return out


def measure_preview(gen, image, params, size, repeat: int, interval_s: float = 1.0, max_side: int = 160,
                    sync: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """The same job on one generator with previews off, every `interval_s` and after every step,
    round-robin `repeat` times (after a warm-up); `summarize_preview` of the runs."""
    steps = params.num_inference_steps
    gen.generate(image, params.model_copy(update={"num_inference_steps": 1}), size=size)  # warm-up
    variants = preview_variants(interval_s)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    for r in range(repeat):
        for name, interval in (variants if r % 2 == 0 else variants[::-1]):
            got: list[tuple] = []
            kwargs = {} if interval is None else {"preview": lambda *a, got=got: got.append(a),
                                                  "preview_interval_s": interval, "preview_max_side": max_side}
            sync()
            result = gen.generate(image, params, size=size, **kwargs)
            sync()
            rows[name].append({"denoise_s": result.timings["denoise"], "previews": len(got),
                               "preview_s": sum(g[3] for g in got), "bytes": sum(len(g[2]) for g in got)})
    return summarize_preview(rows, steps)


def preview_alone(latent_shape: tuple[int, ...], max_side: int = 160, repeat: int = 20, device: str = "cpu") -> float:
    """Median seconds of one preview (latent -> RGB strip -> JPEG) of random latents of this shape."""
    import torch

    from pipeline.preview import preview_strip

    x0 = torch.randn(*latent_shape, device=device)
    preview_strip(x0, max_side)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        preview_strip(x0, max_side)
        times.append(time.perf_counter() - t)
    return median(times)


def print_preview(rows: list[dict[str, Any]]) -> None:
    print(table(["previews", "median s/step", "x off", "previews/job", "ms/preview", "share of denoise", "kB"],
                [[r["variant"], f"{r['step_s']:.4f}", f"{r['ratio']:.3f}", f"{r['previews_per_job']:.1f}",
                  f"{r['s_per_preview'] * 1000:.1f}", f"{r['preview_share']:.2%}",
                  f"{r['bytes_per_preview'] / 1024:.1f}"] for r in rows]))
    print("x off: seconds per step over the no-preview run's (1.000 = free); share of denoise: the time spent "
          "making previews inside the loop over the denoise time (the steadier measure on a shared machine)")


def print_solvers(rows: list[dict[str, Any]]) -> None:
    ref = rows[0]["seconds"]
    out = [[r["variant"], f"{r['seconds']:.2f}", f"{ref / r['seconds']:.2f}", fmt_db(r["psnr_mean"]),
            fmt_db(r["psnr_min"]), f"{r['ssim_mean']:.4f}", f"{r['ssim_min']:.4f}", f"{r['max_diff']:.0f}"]
           for r in rows]
    print(table(["variant", "s/job", "x ref", "PSNR mean", "PSNR worst", "SSIM mean", "SSIM worst", "max diff"],
                out))


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=(256, 256), help="output WIDTHxHEIGHT (default 256x256)")
    p.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps for parts 1 and 2 (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per variant in parts 1 and 2 (default 3)")
    p.add_argument("--reference-steps", type=int, default=50, help="DDIM steps of the reference (default 50)")
    p.add_argument("--solver-steps", type=parse_ints, default=[10, 20, 25],
                   help="steps of the faster solvers in part 3 (default 10,20,25)")
    p.add_argument("--levers", default="", help="comma-separated subset of part 2's rows (default: all)")
    p.add_argument("--parts", default="stock,levers,solvers,preview",
                   help="which parts to run: stock, levers, solvers, preview (default: all)")
    p.add_argument("--preview-interval", type=float, default=1.0,
                   help="seconds between live previews in the preview part (default 1.0, the farm's)")
    p.add_argument("--preview-max-side", type=int, default=160, help="preview frame size (default 160)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (minutes on a small CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = p.parse_args(argv)
    if args.frames < 2 or args.steps < 1 or args.repeat < 1:
        p.error("--frames must be >= 2, --steps and --repeat >= 1")
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts or parts - {"stock", "levers", "solvers", "preview"}:
        p.error("--parts: choose from stock, levers, solvers, preview")
    args.parts = parts
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from pipeline.loading import _quiet_libraries

    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.monotonic()
    info = machine()
    w, h = args.size
    print("i2v-farm generation benchmark (CPU, tiny-random)")
    print(describe_machine(info))
    print(f"job: {w}x{h} x {args.frames} frames, guidance 9.0, seed {SEED}; parts 1-2 at {args.steps} DDIM steps, "
          f"{args.repeat} timed runs each (medians; spread = (max-min)/median)")
    print("quality numbers below are on random weights: a proxy for how far a faster computation lands from "
          "the reference computation, not a verdict on how the real model's video looks")
    print(flush=True)
    image = bench_image()
    out: dict[str, Any] = {"machine": info, "parameters": {k: (sorted(v) if isinstance(v, set) else
                                                                str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(args).items()}}

    if "stock" in args.parts:
        print("1. ours vs stock diffusers I2VGenXLPipeline (same components, steps, seed)")
        res = ours_vs_stock(image, args.size, args.frames, args.steps, args.repeat)
        print_ours_vs_stock(res, args.repeat)
        out["ours_vs_stock"] = res
        print(flush=True)

    if "levers" in args.parts:
        chosen = levers(args.frames, args.compile)
        if args.levers:
            wanted = {s.strip() for s in args.levers.split(",") if s.strip()}
            unknown = wanted - {lv.name for lv in chosen}
            if unknown:
                raise SystemExit(f"--levers: unknown {sorted(unknown)}; choose from {[lv.name for lv in chosen]}")
            chosen = [chosen[0], *(lv for lv in chosen[1:] if lv.name in wanted)]
        print(f"2. levers, each alone and together ({args.steps} DDIM steps; baseline = the farm's defaults)")
        if not args.compile:
            print("   compile: skipped (compiling the tiny UNet takes 1-2 min on a 2-core CPU; run with --compile "
                  "to measure it)")
        with contextlib.suppress(ImportError):
            import xformers  # noqa: F401

            print("   xformers: installed, but its kernels are CUDA-only; measured by bench.generation_gpu")
        if "xformers" not in sys.modules:
            print("   xformers: not installed (its kernels are CUDA-only); measured by bench.generation_gpu")
        rows = run_levers(image, args.size, args.frames, args.steps, args.repeat, chosen)
        print_levers(rows)
        out["levers"] = rows
        print(flush=True)

    if "solvers" in args.parts:
        print(f"3. fewer steps / step caching against the {args.reference_steps}-step DDIM result "
              "(per-frame PSNR/SSIM; random weights: a proxy only)")
        rows = run_solvers(image, args.size, args.frames, args.reference_steps, args.solver_steps)
        print_solvers(rows)
        out["solvers"] = rows
        print(flush=True)

    if "preview" in args.parts:
        from pipeline.generator import Generator

        print(f"4. live previews: the same {args.steps}-step job without and with previews (round-robin)")
        rows = measure_preview(Generator(fresh_model()), image, job_params(args.frames, args.steps), args.size,
                               args.repeat, args.preview_interval, args.preview_max_side)
        print_preview(rows)
        alone = preview_alone((16, 4, 64, 64), args.preview_max_side)
        print(f"one preview of 512p x 16 frames (latents 16x4x64x64) on this CPU: {alone * 1000:.1f} ms")
        out["preview"] = {"rows": rows, "alone_512p_16_s": alone}
        print(flush=True)

    info_end = machine()
    print(f"load average at the end: {'/'.join(str(v) for v in info_end['load_average'])}; "
          f"total {time.monotonic() - wall0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(f"measurements: {args.json}")
    return out


if __name__ == "__main__":
    main()
