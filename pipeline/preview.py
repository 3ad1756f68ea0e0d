"""Live previews: what the denoising loop currently predicts the video to be, as a small image.

No extra model and no VAE decode. At a step, the scheduler's prediction of the clean latents
(x0: DDIM gives it as `pred_original_sample`; for any scheduler it follows from the model output,
the noisy sample and `alphas_cumprod`, `predict_x0`) goes through a fixed linear map of the Stable
Diffusion VAE's 4-channel latent space to RGB (the 4x3 coefficients ComfyUI's and A1111's
"latent2rgb" previews use for SD 1.x latents, bias 0; I2VGen-XL's VAE is that VAE, scaling factor
0.18215, and the map reads the scaled latents the UNet sees). Up to `MAX_FRAMES` frames, evenly
spread over the clip, are scaled so that each frame's longest side is `max_side` pixels and put
side by side in one JPEG strip (`preview_strip`). `frame_count(num_frames)` says how many frames a
strip of a clip holds (clients cut the strip into frames with it).

`LivePreview` decides when the next one is due (every `interval_s` seconds of denoising) and
times what it costs; `Generator.generate(preview=...)` drives it. What one preview costs is
measured by `python -m bench.generation --preview` (see docs/generation.md).
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable

import numpy as np
import PIL.Image

#: (step, total, image bytes, seconds it took to make): called with each preview.
PreviewFn = Callable[[int, int, bytes, float], None]

#: Latent channel -> (R, G, B) weights of the SD 1.x VAE (ComfyUI `latent_formats.SD15`).
LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
#: Added after the map (SD 1.x: none; SDXL's map has one).
LATENT_RGB_BIAS: tuple[float, float, float] = (0.0, 0.0, 0.0)
#: Most frames one preview strip holds (evenly spread over the clip).
MAX_FRAMES = 8
MEDIA_TYPE = "image/jpeg"
JPEG_QUALITY = 75


def frame_count(num_frames: int, max_frames: int = MAX_FRAMES) -> int:
    """How many frames the preview strip of a clip of `num_frames` holds."""
    return max(1, min(int(num_frames), int(max_frames)))


def pick_frames(num_frames: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """Indices of the frames a strip shows: `frame_count` of them, evenly spread, first and last included."""
    n = frame_count(num_frames, max_frames)
    if n == 1:
        return [0]
    return [round(i * (num_frames - 1) / (n - 1)) for i in range(n)]


def frame_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) of one preview frame: the latent's aspect, longest side `max_side`."""
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def predict_x0(scheduler: Any, sample, model_output, timestep):
    """The clean latents the model predicts at `timestep` from the noisy `sample` and its output
    (`epsilon`, `v_prediction` or `sample`, as the scheduler's `prediction_type` says)."""
    import torch

    alphas = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    a = alphas[int(timestep)]
    sample, model_output = sample.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if kind == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {kind!r}")


def latents_to_rgb(latents, max_side: int | None = None):
    """Latents (F, 4, h, w) (torch, any device) -> uint8 frames (F, H, W, 3) (numpy): the fixed
    linear map, then (x + 1) / 2 clipped to [0, 1]; with `max_side`, scaled (bilinear, on the
    latents' device) so that the longest side is `max_side`."""
    import torch

    x = latents.float()
    factors = torch.tensor(LATENT_RGB_FACTORS, device=x.device)
    bias = torch.tensor(LATENT_RGB_BIAS, device=x.device)
    rgb = torch.einsum("fchw,cr->frhw", x, factors) + bias[None, :, None, None]
    if max_side is not None:
        size = frame_size(rgb.shape[2], rgb.shape[3], max_side)
        if size != tuple(rgb.shape[2:]):
            rgb = torch.nn.functional.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).cpu().numpy()


def encode_strip(frames: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Frames (N, H, W, 3) uint8 side by side in one JPEG (N*W x H)."""
    strip = np.concatenate(list(frames), axis=1)
    buf = io.BytesIO()
    PIL.Image.fromarray(strip).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def preview_strip(x0, max_side: int = 160, max_frames: int = MAX_FRAMES) -> bytes:
    """The preview JPEG of predicted clean latents `x0`, (F, 4, h, w) or (1, 4, F, h, w)."""
    if x0.dim() == 5:  # (1, C, F, h, w), as the UNet sees a clip
        x0 = x0[0].permute(1, 0, 2, 3)
    idx = pick_frames(x0.shape[0], max_frames)
    return encode_strip(latents_to_rgb(x0[idx], max_side))


class LivePreview:
    """When a job's next preview is due, and what the previews cost.

    `due()` is true once `interval_s` seconds have passed since `start()` or the last preview;
    `emit(step, total, x0)` makes one (x0 may be a callable, so nothing is computed unless a
    preview is due) and hands it to `callback(step, total, jpeg, seconds)`. `seconds` and `count` add up what was made.
    """

    def __init__(self, callback: PreviewFn, interval_s: float = 1.0, max_side: int = 160,
                 max_frames: int = MAX_FRAMES, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0 (0 means no previews: pass no LivePreview)")
        self.callback, self.interval_s, self.max_side, self.max_frames = callback, interval_s, max_side, max_frames
        self.clock = clock
        self._last = clock()
        self.seconds = 0.0
        self.count = 0

    def start(self) -> None:
        """The denoising loop begins: the first preview is due `interval_s` from now."""
        self._last = self.clock()

    def due(self) -> bool:
        return self.clock() - self._last >= self.interval_s

    def emit(self, step: int, total: int, x0) -> bytes:
        started = time.perf_counter()
        image = preview_strip(x0() if callable(x0) else x0, self.max_side, self.max_frames)
        took = time.perf_counter() - started
        self.seconds += took
        self.count += 1
        self._last = self.clock()
        self.callback(step, total, image, took)
        return image
