"""Peak activation and I/O bytes per stage, derived from the `FULL_SIZE` channel widths
(the design: docs/design/cost-model.md)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from ..architecture import FULL_SIZE
from .spec import FF_MULT, Calibration, Workload


def _stage_memory(workload: Workload, cal: Calibration) -> dict[str, tuple[float, float]]:
    """(activation bytes, I/O bytes) at the peak of each stage."""
    b = workload.bytes_per_element
    F, N, B = workload.num_frames, workload.latent_tokens, workload.unet_batch
    pixels = workload.width * workload.height
    s = cal.activation_scale
    w = _memory_widths(cal)
    latent_ch = FULL_SIZE.unet["in_channels"]
    video = F * 3 * pixels  # decoded frames, elements
    chunk = 1 if workload.vae_slicing else min(workload.decode_chunk_size, F)
    decode_act = s * chunk * pixels * w["vae_decode_per_pixel"] * b
    return {
        "text_encoder": (s * (2 if workload.guidance else 1) * w["text_encoder_per_prompt"] * b, 0.0),
        "image_encoder": (s * w["image_encoder_per_image"] * b, 0.0),
        "vae_encode": (s * pixels * w["vae_encode_per_pixel"] * b, 3 * pixels * b),
        # latents, the CFG input, noise prediction, image latents: ~4 tensors of B x 4 x F x N.
        "unet": (s * B * F * N * w["unet_per_token"] * b, 4 * B * latent_ch * F * N * b),
        # Decoding: chunk working set + frames decoded so far; or, at the end, the frame list,
        # its concatenation and the float32 copy `decode_latents` returns.
        "vae_decode": max(
            (decode_act, video * b),
            (0.0, video * (2 * b + 4)),
            key=sum,
        ),
    }


@lru_cache(maxsize=32)
def _memory_widths(cal: Calibration) -> dict[str, float]:
    """Activation peaks in tensor elements per unit (token, pixel, prompt...), from FULL_SIZE."""
    spec = FULL_SIZE
    return {
        "unet_per_token": _unet_peak_per_token(spec.unet, cal),
        "vae_decode_per_pixel": _vae_decoder_peak_per_pixel(spec.vae, cal),
        "vae_encode_per_pixel": _vae_encoder_peak_per_pixel(spec.vae, cal),
        "text_encoder_per_prompt": _clip_peak(spec.text_encoder, spec.tokenizer_max_length, cal),
        "image_encoder_per_image": _clip_peak(
            spec.image_encoder,
            (spec.image_encoder["image_size"] // spec.image_encoder["patch_size"]) ** 2 + 1,
            cal,
        ),
    }


def _unet_peak_per_token(unet: Mapping[str, Any], cal: Calibration) -> float:
    """UNet activation peak in elements per (sample, frame, level-0 token).

    Walks the decoder (up) path, where the saved skips of the current and shallower levels are
    still referenced, and takes the largest of: transformer blocks (stream + max(GEGLU,
    attention)), ResNet blocks (input incl. the concatenated skip) and upsamplers (nearest
    interpolation output + conv output), each on top of the live skips. The mid block (all skips
    live) is included; the down path holds a subset of the same skips, so it is never larger.
    """
    C = list(unet["block_out_channels"])
    L, layers = len(C), unet["layers_per_block"]
    attn = ["CrossAttn" in t for t in unet["down_block_types"]]
    transformer = cal.stream_tensors + max(cal.geglu_tensors * FF_MULT, cal.attention_tensors)

    def scale(level: int) -> float:  # tokens at `level` per level-0 token
        return 4.0**-level

    # Skips saved by the down path, in order: (channels, level).
    skips: list[tuple[int, int]] = [(C[0], 0)]
    for level in range(L):
        skips += [(C[level], level)] * layers
        if level < L - 1:
            skips.append((C[level], level + 1))  # the downsampler's output

    def live(level: int) -> float:  # skips still referenced while decoding `level`
        return sum(ch * scale(lv) for ch, lv in skips if lv <= level)

    candidates = [live(L - 1) + C[-1] * scale(L - 1) * transformer]  # mid block
    prev = C[-1]
    for level in reversed(range(L)):
        level_skips = [ch for ch, lv in skips if lv == level]
        for i, skip_ch in enumerate(reversed(level_skips)):
            in_ch = (prev if i == 0 else C[level]) + skip_ch
            candidates.append(live(level) + in_ch * scale(level) * cal.resnet_tensors)
            if attn[level]:
                candidates.append(live(level) + C[level] * scale(level) * transformer)
        if level > 0:  # upsample into level - 1 (this block's skips are still referenced)
            candidates.append(live(level) + C[level] * (scale(level) + 2 * scale(level - 1)))
        prev = C[level]
    return max(candidates)


def _vae_decoder_peak_per_pixel(vae: Mapping[str, Any], cal: Calibration) -> float:
    """VAE decoder activation peak in elements per output pixel (per frame)."""
    R = list(reversed(vae["block_out_channels"]))
    L = len(R)
    candidates = []
    for i in range(L):
        pixels = 4.0 ** -(L - 1 - i)  # pixels at block i per output pixel
        candidates.append((R[i - 1] if i else R[0]) * pixels * cal.resnet_tensors)
        if i < L - 1:
            candidates.append(R[i] * (pixels + 2 * 4 * pixels))
    return max(candidates)


def _vae_encoder_peak_per_pixel(vae: Mapping[str, Any], cal: Calibration) -> float:
    """VAE encoder activation peak in elements per input pixel (one image)."""
    C = list(vae["block_out_channels"])
    return max((C[i - 1] if i else C[0]) * 4.0**-i * cal.resnet_tensors for i in range(len(C)))


def _clip_peak(cfg: Mapping[str, Any], tokens: int, cal: Calibration) -> float:
    """CLIP tower activation peak in elements: residual stream + MLP (fc1 out, gelu out)."""
    return tokens * (cal.stream_tensors * cfg["hidden_size"] + 2 * cfg["intermediate_size"])
