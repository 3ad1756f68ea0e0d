"""`i2v-farm generate` and `i2v-farm estimate`: the one-GPU commands (no Ray, no servers).

`serving.cli` builds the full `i2v-farm` command and adds these two to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from .errors import I2VError
from .request import PRESETS, PROMPT_EXAMPLES, PROMPT_TIPS, RESOLUTION_PIXELS, parse_params

SAMPLE_PROMPT = "Clouds drifting slowly across the sky, gentle ripples on the lake"


def sample_image_path() -> Path:
    """The bundled sample picture (a lake with a house), for demos and smoke tests."""
    return Path(str(resources.files("pipeline") / "assets" / "sample.png"))


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Request fields as flags (shared by `generate`, `estimate` and, later, `submit`)."""
    group = parser.add_argument_group("request")
    group.add_argument("--preset", choices=sorted(PRESETS), help="fast | standard | high (default: standard)")
    group.add_argument("--resolution", choices=sorted(RESOLUTION_PIXELS), help="pixel budget, aspect kept")
    group.add_argument("--frames", dest="num_frames", type=int, help="frames to generate, 8-32")
    group.add_argument("--fps", type=int, help="frames per second of the MP4")
    group.add_argument("--target-fps", dest="target_fps", type=int, help="fps micro-condition (default 16)")
    group.add_argument("--steps", dest="num_inference_steps", type=int, help="denoising steps")
    group.add_argument("--guidance", dest="guidance_scale", type=float, help="guidance scale (1: off)")
    group.add_argument("--seed", type=int, help="random seed (default: a random one, recorded)")
    group.add_argument("--scheduler", choices=("ddim", "dpmsolver++", "unipc"), help="sampler (default ddim)")
    group.add_argument("--lora", action="append", metavar="NAME[:SCALE]",
                       help="a registered LoRA adapter and its scale (default 1); up to 3 (repeat the flag)")


def request_fields(args: argparse.Namespace, names=None) -> dict:
    names = names or ("prompt", "negative_prompt", "preset", "resolution", "num_frames", "fps", "target_fps",
                      "num_inference_steps", "guidance_scale", "seed", "scheduler")
    fields = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "lora", None) and "lora" not in fields:
        fields["lora"] = ",".join(args.lora)  # NAME:SCALE,... (pipeline.request parses it)
    return fields


def add_commands(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="render one image to an MP4 on this machine",
        description="Render an image and a prompt to an MP4 on this machine's GPU (or CPU).\n\n"
        f"Prompt tips: {PROMPT_TIPS}\nExamples: " + "; ".join(PROMPT_EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="input image (JPG, PNG or WEBP)")
    source.add_argument("--sample", action="store_true", help="use the bundled sample image (and a sample prompt)")
    gen.add_argument("--prompt", help="what should move, and how")
    gen.add_argument("--negative-prompt", dest="negative_prompt", help="what to avoid")
    add_request_arguments(gen)
    gen.add_argument("--model", default=os.environ.get("I2V_MODEL") or "tiny-random",
                     help="tiny-random (default), a diffusers directory, or a cached hub id [$I2V_MODEL]")
    gen.add_argument("--out", default="outputs", help="output directory (default: ./outputs)")
    gen.add_argument("--device", default="auto", help="auto (GPU if present), cuda, cuda:1, cpu")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                     help="weights precision on GPU (auto: float16); always float32 on CPU")
    gen.add_argument("--cpu-offload", action="store_true", help="keep idle components in CPU memory (GPU only)")
    gen.add_argument("--decode-chunk-size", type=int, default=1, help="frames the VAE decodes at once")
    gen.add_argument("--json", action="store_true", help="print the parameter record as JSON")
    gen.add_argument("--adapters", default=os.environ.get("I2V_ADAPTERS_URL"),
                     help="registry directory the --lora names are read from [$I2V_ADAPTERS_URL]")
    gen.set_defaults(func=cmd_generate)

    est = subparsers.add_parser(
        "estimate",
        help="predict peak GPU memory and time of a request (cost model)",
        description="Predict peak GPU memory and seconds for a request on a GPU, from the cost model.",
    )
    add_request_arguments(est)
    est.add_argument("--width", type=int, help="exact width (instead of the resolution's square size)")
    est.add_argument("--height", type=int, help="exact height")
    est.add_argument("--gpu", default="rtx4090-24gb", help="a known GPU (see --list-gpus)")
    est.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    est.add_argument("--cpu-offload", action="store_true")
    est.add_argument("--decode-chunk-size", type=int, default=1)
    est.add_argument("--table", action="store_true", help="print the table for 512p/768p/1024p x 8-32 frames")
    est.add_argument("--list-gpus", action="store_true", help="list the known GPUs")
    est.add_argument("--json", action="store_true")
    est.set_defaults(func=cmd_estimate)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .generator import Generator, MemoryOptions
    from .images import load_image_file
    from .loading import load_model
    from .render import TINY_RANDOM_NOTE, render

    image_path = sample_image_path() if args.sample else Path(args.image)
    if args.sample and not args.prompt:
        args.prompt = SAMPLE_PROMPT
    if not args.prompt:
        raise I2VError("--prompt is required (what should move, and how)", field="prompt")
    params = parse_params(request_fields(args))
    image = load_image_file(image_path)

    print(f"loading model '{args.model}' ...", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload)
    if model.is_tiny_random:
        print(f"note: {TINY_RANDOM_NOTE}", file=sys.stderr)
    generator = Generator(model, MemoryOptions(decode_chunk_size=args.decode_chunk_size))

    bar = tqdm(total=params.num_inference_steps, desc="denoising", unit="step", file=sys.stderr,
               disable=False, dynamic_ncols=True)

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    params, adapters = _local_adapters(args.adapters, params, generator)
    try:
        with adapters:
            output = render(generator, image, params, args.out, image_bytes=image_path.read_bytes(),
                            progress=progress)
    finally:
        bar.close()
    record = output.record
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        t = record["timings"]
        print(
            f"{record['width']}x{record['height']}, {record['output']['frames']} frames at "
            f"{record['output']['fps']} fps, seed {record['params']['seed']}; "
            f"denoise {t['denoise']:.1f}s, total {t['total']:.1f}s; "
            f"peak memory {record['peak_memory_bytes'] / 2**30:.2f} GiB ({record['peak_memory_kind']})",
            file=sys.stderr,
        )
        print(f"parameters: {output.params_path.resolve()}", file=sys.stderr)
        print(output.video_path.resolve())
    return 0


def _local_adapters(directory: str | None, params, generator):
    """(params with each adapter's SHA-256, a context applying them) for `generate --lora`: the
    weights come from a registry directory (`NAME/adapter.safetensors`, see docs/adapters.md)."""
    import contextlib

    from .adapters import WEIGHTS_NAME, AdapterCache, sha256_hex

    if not params.lora:
        return params, contextlib.nullcontext()
    if not directory or directory.startswith("s3://"):
        raise I2VError("--lora needs --adapters DIR (a registry directory; `i2v-farm adapters add` fills one)",
                       field="lora")
    root = Path(directory.removeprefix("file://")).expanduser()
    refs = []
    for ref in params.lora:
        path = root / ref.name / WEIGHTS_NAME
        if not path.is_file():
            raise I2VError(f"adapter {ref.name!r} is not in {root}", field="lora")
        refs.append({**ref.model_dump(), "sha256": sha256_hex(path.read_bytes())})
    params = params.model_copy(update={"lora": parse_params({"prompt": "x", "lora": refs}).lora})
    cache = AdapterCache(generator.pipe.unet, lambda name, _sha: (root / name / WEIGHTS_NAME).read_bytes(), 2**40)
    return params, cache.applied(refs)


def cmd_estimate(args: argparse.Namespace) -> int:
    from . import cost_model

    if args.list_gpus:
        for name, gpu in cost_model.GPUS.items():
            print(f"{name:16s} {gpu.memory_bytes / 2**30:6.1f} GiB  {gpu.peak_tflops:7.1f} TFLOP/s")
        return 0
    if args.gpu not in cost_model.GPUS:
        raise I2VError(f"unknown GPU '{args.gpu}' (known: {', '.join(cost_model.GPUS)})", field="gpu")
    gpu = cost_model.GPUS[args.gpu]
    if args.table:
        print(cost_model.table(gpu, dtype=args.dtype))
        return 0
    params = parse_params({"prompt": "-", **request_fields(args)})
    n = RESOLUTION_PIXELS[params.resolution]
    width, height = args.width or n, args.height or n
    workload = cost_model.Workload(
        width=width, height=height, num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps, guidance=params.guidance_scale > 1.0,
        dtype=args.dtype, decode_chunk_size=args.decode_chunk_size, cpu_offload=args.cpu_offload,
    )
    est = cost_model.estimate(workload, gpu)
    fits = est.vram_bytes <= gpu.memory_bytes
    if args.json:
        print(json.dumps({"workload": workload.__dict__, "gpu": gpu.__dict__, "flops": est.flops,
                          "vram_bytes": est.vram_bytes, "seconds": est.seconds, "fits": fits,
                          "flops_by_stage": est.flops_by_stage, "vram_by_part": est.vram_by_part,
                          "seconds_by_stage": est.seconds_by_stage}, indent=2))
        return 0
    print(f"{width}x{height} x {params.num_frames} frames x {params.num_inference_steps} steps, "
          f"{args.dtype} on {gpu.name}:")
    print(f"  peak VRAM  {est.vram_bytes / 2**30:6.2f} GiB of {gpu.memory_bytes / 2**30:.0f} GiB "
          f"({'fits' if fits else 'does NOT fit'})")
    print(f"  time       {est.seconds:6.1f} s")
    print(f"  compute    {est.flops / 1e15:6.2f} PFLOP")
    return 0
