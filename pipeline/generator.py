"""The I2VGen-XL generation loop, written out so the farm can watch and stop it.

It computes what diffusers' `I2VGenXLPipeline.__call__` computes, on the same components, and
reads top to bottom as the model's algorithm:

1. condition on text: CLIP text tower, **penultimate layer** + final layer norm (the model was
   trained on OpenCLIP's penultimate features; diffusers' own `clip_skip=1` path for this crashes
   with transformers 5, whose `CLIPTextModel` has no `.text_model`, so we do it here);
2. condition on the image: CLIP image embedding of a centre crop, and VAE latents of the image
   plus a per-frame position ramp;
3. denoise: classifier-free guidance batched into one UNet call per step, with the fps
   micro-condition; progress reported and cancellation honoured between steps;
4. decode the latents with the VAE, `decode_chunk_size` frames at a time.

Differences from the stock pipeline, on purpose: each job gets a fresh scheduler instance (the
stock one mutates shared state), the VAE's posterior sample is seeded from the job's seed (the
stock pipeline draws it from the global RNG, so the same seed could give different videos), and
the initial noise always comes from a CPU generator (same seed, same video on CPU and GPU).
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import PIL.Image

from .errors import GenerationCanceled, OutOfMemory
from .loading import LoadedModel
from .preview import LivePreview, PreviewFn, predict_x0
from .request import GenerationParams, output_size

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class MemoryOptions:
    """Memory/speed settings of a worker (fixed per replica, not per request).

    The speed levers below the first three are off by default: each is measured alone and
    together by `python -m bench.generation` (CPU) and `python -m bench.generation_gpu` (GPU),
    see docs/benchmarks.md; turn one on for a worker class only once it has paid there. They
    change the loaded model in place (one `Generator` per loaded model). `params.json` records
    all of them (`memory_options`).
    """

    decode_chunk_size: int = 1  # frames decoded by the VAE at once: more is faster, needs more memory
    vae_slicing: bool = True  # encode/decode batch items one at a time
    attention: str = "sdpa"  # "sdpa" (torch scaled_dot_product_attention) or "xformers"
    channels_last: bool = False  # 2D convolution weights of the UNet and VAE in NHWC (same result)
    fuse_qkv: bool = False  # one projection for q, k, v (k, v in cross-attention); sdpa only (same result)
    compile: bool = False  # torch.compile the UNet; each new shape compiles on first use (`warm_up`)
    # "split": the UNet's and VAE's GroupNorms compute their statistics with a split reduction
    # (`pipeline.group_norm`; same result up to summation order), for GPUs where the native
    # kernel's one-block-per-group statistics leave most of the chip idle.
    group_norm: str = "native"
    # Pyramid Attention Broadcast (diffusers' hook): inside the timestep range below, a spatial
    # self-attention layer computes on 1 step in `attention_cache` and reuses its output on the
    # others. 0 = off. CHANGES THE OUTPUT (a quality/speed trade; see docs/benchmarks.md).
    attention_cache: int = 0
    attention_cache_timesteps: tuple[int, int] = (100, 800)


@dataclass
class GenerationResult:
    frames: np.ndarray  # (num_frames, height, width, 3) uint8
    width: int
    height: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # conditioning, denoise, decode (seconds)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""  # "cuda_max_allocated" or "process_peak_rss"


def _schedulers() -> dict[str, Any]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    return {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def center_crop_wide(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """Scale so the image covers `size` (box filter), then crop the centre (as the stock pipeline)."""
    width, height = size
    scale = min(image.width / width, image.height / height)
    image = image.resize((round(image.width // scale), round(image.height // scale)), resample=PIL.Image.BOX)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


class Generator:
    """Runs jobs on one loaded model, one at a time."""

    def __init__(self, model: LoadedModel, options: MemoryOptions | None = None):
        self.model = model
        self.pipe = model.pipe
        self.options = options or MemoryOptions()
        self._check_options(self.options)
        self._lock = threading.Lock()
        if self.options.attention == "xformers":
            self.pipe.enable_xformers_memory_efficient_attention()
        elif self.options.attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.pipe.unet.set_attn_processor(AttnProcessor2_0())
        else:
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.options.attention!r}")
        if self.options.vae_slicing:
            self.pipe.vae.enable_slicing()
        self._timestep: int | None = None  # the denoising step's timestep (read by the attention cache)
        self._apply_speed_options()

    @staticmethod
    def _check_options(o: MemoryOptions) -> None:
        """Refuse contradictory options before anything touches the model."""
        if o.fuse_qkv and o.attention != "sdpa":
            raise ValueError("fuse_qkv needs attention='sdpa' (diffusers' fused processor is SDPA)")
        if o.attention_cache and o.attention_cache < 2:
            raise ValueError("attention_cache must be 0 (off) or a skip range >= 2")
        if o.group_norm not in ("native", "split"):
            raise ValueError(f"group_norm must be 'native' or 'split', got {o.group_norm!r}")

    def _apply_speed_options(self) -> None:
        import torch

        o, unet = self.options, self.pipe.unet
        if o.group_norm == "split":
            from .group_norm import use_split_group_norm

            use_split_group_norm(unet, self.pipe.vae)
        if o.fuse_qkv:
            unet.fuse_qkv_projections()
        if o.channels_last:
            # Module.to(memory_format=...) refuses the UNet's 5D temporal convolutions; only the
            # 2D convolutions (the bulk of the FLOPs outside attention) take NHWC weights.
            for module in (*unet.modules(), *self.pipe.vae.modules()):
                if isinstance(module, torch.nn.Conv2d):
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        if o.attention_cache:
            from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

            apply_pyramid_attention_broadcast(unet, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=o.attention_cache,
                spatial_attention_timestep_skip_range=tuple(o.attention_cache_timesteps),
                # the UNet's spatial transformers (not `temp_attentions`, not `transformer_in`)
                spatial_attention_block_identifiers=(r"(^|\.)attentions\.\d+\.transformer_blocks",),
                current_timestep_callback=lambda: -1 if self._timestep is None else self._timestep,
            ))
        if o.compile:
            unet.compile()

    def _reset_attention_cache(self) -> None:
        """Forget the attention cache's step count and cached outputs (per job: a stale output
        of another job, or of another shape, must never be reused)."""
        if self.options.attention_cache:
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(self.pipe.unet).reset_stateful_hooks(recurse=True)

    def warm_up(self, image: PIL.Image.Image, params: GenerationParams, size: tuple[int, int] | None = None) -> float:
        """Run one 1-step job of this shape (compiles it when `compile` is on); returns seconds.

        Call on replica start for the shapes the class serves, so no user's job pays for it."""
        started = time.perf_counter()
        self.generate(image, params.model_copy(update={"num_inference_steps": 1}), size=size)
        return time.perf_counter() - started

    @property
    def device(self):
        return self.pipe._execution_device

    def generate(
        self,
        image: PIL.Image.Image,
        params: GenerationParams,
        *,
        size: tuple[int, int] | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        preview: PreviewFn | None = None,
        preview_interval_s: float = 1.0,
        preview_max_side: int = 160,
    ) -> GenerationResult:
        """Render `params` for `image`. `size` overrides the resolution preset's (width, height).

        `progress(step, total)` is called after each denoising step; `cancel()` is polled before
        each step and each decode chunk, and a True answer raises `GenerationCanceled`.
        `preview(step, total, jpeg, seconds)` (optional) gets a live preview (`pipeline.preview`) after the
        first step that ends `preview_interval_s` seconds or more after the previous one (or the
        loop's start); None or an interval of 0: no previews, nothing computed for them. Previews
        only read the latents: the video is the same with or without them.
        Out-of-memory on the accelerator raises `OutOfMemory`.
        """
        import torch

        params = params.with_seed()
        width, height = size or output_size(params.resolution, image.width, image.height)
        with self._lock, torch.inference_mode():
            self._reset_peak_memory()
            try:
                live = (LivePreview(preview, preview_interval_s, preview_max_side)
                        if preview is not None and preview_interval_s > 0 else None)
                result = self._run(image, params, width, height, progress, cancel, live)
            except torch.OutOfMemoryError as exc:
                del exc
                self._free_memory()
                raise OutOfMemory(
                    f"out of GPU memory at {width}x{height} x {params.num_frames} frames; "
                    "use a lower resolution or fewer frames, or a GPU with more memory"
                ) from None
            result.peak_memory_bytes, result.peak_memory_kind = self._peak_memory()
            return result

    # -- the algorithm -------------------------------------------------------------------------

    def _run(self, image, params: GenerationParams, width, height, progress, cancel,
             live: LivePreview | None = None) -> GenerationResult:
        import torch

        pipe, device = self.pipe, self.device
        guidance = params.guidance_scale > 1.0
        timings: dict[str, float] = {}
        started = time.perf_counter()

        # 1. text conditioning (negative first, as the UNet batch is [uncond, cond])
        prompt_embeds = self.encode_text(params.prompt)
        if guidance:
            negative_embeds = self.encode_text(params.negative_prompt, max_length=prompt_embeds.shape[1])
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])

        # 2. image conditioning: CLIP embedding of a square centre crop, VAE latents of the frame
        image_embeds = self.encode_image_clip(center_crop_wide(image, (width, width)))
        if guidance:
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        pixels = pipe.video_processor.preprocess(center_crop_wide(image, (width, height)))
        pixels = pixels.to(device=device, dtype=image_embeds.dtype)
        image_latents = self.encode_image_latents(pixels, params.num_frames, params.seed)
        if guidance:
            image_latents = torch.cat([image_latents] * 2)
        fps = torch.tensor([params.target_fps] * (2 if guidance else 1), device=device)
        timings["conditioning"] = time.perf_counter() - started

        # 3. denoising loop
        scheduler = _schedulers()[params.scheduler].from_config(pipe.scheduler.config)
        scheduler.set_timesteps(params.num_inference_steps, device=device)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        shape = (1, pipe.unet.config.in_channels, params.num_frames,
                 height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=prompt_embeds.dtype).to(device)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(scheduler, generator)

        started = time.perf_counter()
        total = len(scheduler.timesteps)
        self._reset_attention_cache()
        if live is not None:
            live.start()
        for i, t in enumerate(scheduler.timesteps):
            self._check_cancel(cancel)
            self._timestep = int(t)
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = pipe.unet(
                model_input,
                t,
                encoder_hidden_states=prompt_embeds,
                fps=fps,
                image_latents=image_latents,
                image_embeddings=image_embeds,
                return_dict=False,
            )[0]
            if guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + params.guidance_scale * (cond - uncond)
            # the scheduler steps frames as a batch of images
            b, c, f, h, w = latents.shape
            latents = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            noise_pred = noise_pred.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            sample = latents
            stepped = scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = stepped.prev_sample[None, :].reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
            if progress is not None:
                progress(i + 1, total)
            if live is not None and live.due():  # x0: DDIM's own, else from the model output
                x0 = getattr(stepped, "pred_original_sample", None)
                live.emit(i + 1, total, x0 if x0 is not None else partial(predict_x0, scheduler, sample, noise_pred, t))
        self._timestep = None
        self._reset_attention_cache()  # drop the cached attention outputs before the decode
        self._synchronize()
        timings["denoise"] = time.perf_counter() - started
        if live is not None:
            timings["preview"] = live.seconds  # within denoise: making the previews

        # 4. decode
        started = time.perf_counter()
        video = self.decode(latents, cancel)
        frames = pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
        frames = (frames * 255).round().astype(np.uint8)
        timings["decode"] = time.perf_counter() - started
        return GenerationResult(frames=frames, width=width, height=height, seed=params.seed, timings=timings)

    def encode_text(self, text: str, max_length: int | None = None):
        """CLIP text features from the penultimate layer, through the final layer norm."""
        pipe = self.pipe
        tokens = pipe.tokenizer(
            [text],
            padding="max_length",
            max_length=max_length or pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(pipe.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        out = pipe.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True)
        embeds = pipe.text_encoder.final_layer_norm(out.hidden_states[-2])
        return embeds.to(dtype=pipe.text_encoder.dtype, device=self.device)

    def encode_image_clip(self, image: PIL.Image.Image):
        """CLIP image embedding (1, 1, dim) of the image resized to the encoder's input size."""
        pipe = self.pipe
        crop = pipe.feature_extractor.crop_size
        image = image.resize((crop["width"], crop["height"]), PIL.Image.BILINEAR)
        pixels = pipe.video_processor.numpy_to_pt(pipe.video_processor.pil_to_numpy(image))
        pixels = pipe.feature_extractor(
            images=pixels, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
            return_tensors="pt",
        ).pixel_values
        dtype = next(pipe.image_encoder.parameters()).dtype
        embeds = pipe.image_encoder(pixels.to(device=self.device, dtype=dtype)).image_embeds
        return embeds.unsqueeze(1)

    def encode_image_latents(self, pixels, num_frames: int, seed: int):
        """VAE latents of the first frame, followed by a ramp 1/(F-1) ... 1 for the other frames."""
        import torch

        pipe = self.pipe
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            latents = pipe.vae.encode(pixels).latent_dist.sample()
        latents = (latents * pipe.vae.config.scaling_factor).unsqueeze(2)
        ramp = [torch.ones_like(latents[:, :, :1]) * (i + 1) / (num_frames - 1) for i in range(num_frames - 1)]
        return torch.cat([latents, *ramp], dim=2) if ramp else latents

    def decode(self, latents, cancel: CancelFn | None = None):
        """Latents (1, C, F, h, w) -> video (1, 3, F, H, W) in [-1, 1], float32."""
        import torch

        vae = self.pipe.vae
        b, c, f, h, w = latents.shape
        latents = (latents / vae.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        chunk = max(1, self.options.decode_chunk_size)
        parts = []
        for start in range(0, latents.shape[0], chunk):
            self._check_cancel(cancel)
            parts.append(vae.decode(latents[start : start + chunk]).sample)
        image = torch.cat(parts)
        video = image[None, :].reshape((b, f, -1) + image.shape[2:]).permute(0, 2, 1, 3, 4)
        return video.float()

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _step_kwargs(scheduler, generator) -> dict[str, Any]:
        import inspect

        accepted = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    @staticmethod
    def _check_cancel(cancel: CancelFn | None) -> None:
        if cancel is not None and cancel():
            raise GenerationCanceled("canceled")

    def _is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _synchronize(self) -> None:
        if self._is_cuda():
            import torch

            torch.cuda.synchronize(self.device)

    def _reset_peak_memory(self) -> None:
        if self._is_cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_memory(self) -> tuple[int, str]:
        if self._is_cuda():
            import torch

            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        # Linux reports ru_maxrss in KiB: the whole process's peak since it started.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"

    def _free_memory(self) -> None:
        import gc

        gc.collect()
        if self._is_cuda():
            import torch

            torch.cuda.empty_cache()
