"""Cost model: FLOPs, seconds and peak VRAM of one I2VGen-XL request on one GPU class.

The scheduler calls `estimate(workload, gpu)` for every request, so it is plain arithmetic
(microseconds, no torch): closed forms whose coefficients were fitted once, from exact FLOP
counts of the real model code, and are stored in `cost_coefficients.json`.

Three parts:

**FLOPs (exact, then fitted).** `count_flops` runs the real diffusers/transformers forward passes
of the `FULL_SIZE` components on the meta device (no memory, no arithmetic) under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention
(2 FLOPs per multiply-add; element-wise ops, norms and activations are not counted, as usual).
Attention: on the meta device `scaled_dot_product_attention` runs its math path, i.e. the two
batched matmuls the counter counts (4·L·S·d FLOPs per head); `count_flops` forces that path and
`calibrate` checks the fitted quadratic terms against the attention FLOPs derived from the
architecture (`checks` in the JSON). Shapes follow `I2VGenXLPipeline.__call__`:

=============  ============================================================================
stage          forward pass counted
=============  ============================================================================
text_encoder   CLIPTextModel on (prompts, 77) token ids; 2 prompts with CFG (the negative)
image_encoder  CLIPVisionModelWithProjection on 1 image at 224x224 (negative = zeros)
vae_encode     AutoencoderKL.encode on 1 image at HxW
unet           I2VGenXLUNet per step: sample and image_latents (B,4,F,H/8,W/8),
               encoder_hidden_states (B,77,1024), fps (B,), image_embeddings (B,1,1024);
               B = 2 with CFG
vae_decode     AutoencoderKL.decode of the F latent frames (chunking changes memory only)
=============  ============================================================================

With F frames and N = (H/8)(W/8) latent tokens per frame the fitted closed forms are

* unet, per sample and step: a·F·N + b·F·N² + c·N·F² + d·F + e·N + f
  (convs/linears; spatial self-attention over N tokens in each frame; temporal attention over F
  frames at each position; per-frame time-embedding projections; the first-frame context conv;
  the embeddings);
* vae_encode per image and vae_decode per frame: a·N + b·N² (convs; the mid-block attention);
* text_encoder per prompt and image_encoder per image: constants.

They are exact polynomials for W and H multiples of 64 (the UNet halves the latent 3 times). For
other multiples of 8 (aspect-kept sizes such as 680x384) the UNet's lower levels round their
sizes up and the closed form undercounts the UNet by up to ~2.5% (1.4% at 680x384).

**Peak VRAM (a formula).** ::

    vram = max over stages s of [ W_s + fragmentation · (A_s + IO_s) ] + reserve

* ``W_s`` weights resident in stage s: every component's parameters x bytes per element, or with
  ``cpu_offload`` (diffusers' `enable_model_cpu_offload`: one model on the GPU at a time) only the
  component running in that stage, so the UNet stage holds the UNet only.
* ``A_s`` the stage's activation peak, derived from the `FULL_SIZE` channel widths by reading the
  diffusers code paths that run at inference (`torch.no_grad`, so a tensor lives only while
  referenced):

  - UNet (batch B = 2 with CFG, every frame at once): at a decoder level l with C_l channels and
    N/4^l tokens per frame, a transformer block holds its residual stream (`stream` tensors of
    C_l: block input, normed input, the Transformer2D residual) plus the larger of the GEGLU
    feed-forward working set (projection to 2·ff_mult·C, gelu(gate) and the product, i.e.
    `geglu` x ff_mult x C) and the attention working set (q, k, v, output, out-projection:
    `attention` x C; SDPA flash / memory-efficient kernels keep it linear in tokens; the
    diffusers head size here is 64, which those kernels accept). On top, the skip connections
    saved by the down path that are still referenced (all those of levels <= l). ResNet blocks
    (input, norm, activation: `resnet` x input channels incl. the concatenated skip) and
    upsamplers are candidates too; the maximum is taken. For FULL_SIZE the level-0 transformer
    wins: 3 skips + 3 stream + 16 GEGLU = 22 x 320 channels per token.
  - VAE decode of `decode_chunk_size` frames: the widest full-resolution point of the decoder
    (the first ResNet of the last up block: 256 input channels x `resnet`), plus the frames
    already decoded (F x 3 x H x W); at the end `decode_latents` holds the list, its `cat` and the
    float32 copy, F x 3 x H x W x (2 x bytes + 4).
  - VAE encode (1 image), text and image encoders: the same rules; small.
* ``IO_s`` latents and other stage inputs/outputs (small except the decoded video).
* ``fragmentation`` the caching allocator's reserved/allocated ratio for activations
  (default 1.10); ``reserve`` the CUDA context, cuBLAS/cuDNN workspaces and kernels not seen by
  the allocator (default 600 MiB). Both in `Calibration`.

Sources: the diffusers 0.42 code (`I2VGenXLPipeline`, `I2VGenXLUNet`, `BasicTransformerBlock`,
`GEGLU`, `ResnetBlock2D`, `Upsample2D`, `AutoencoderKL`), PyTorch's SDPA backend rules and the
caching-allocator behaviour. Public reports are *leads only*, not fitted: I2VGen-XL in fp16 at
512x512x16 is often said to need ~12-14 GB with the stock pipeline, 768p x 16+ frames ~16+ GB,
the published default 1280x704x16 ~18-20 GB. This formula predicts less for fp16 weights
(7.6 GB, 10.2 GB and 12.6 GB). Those figures are usually `nvidia-smi` readings, and they match
this formula with fp32 *weights* and fp16 activations (the original VGen code runs fp32 weights
under autocast: ~12.6, ~15.2, ~17.6 GB), so they are not evidence against it; only measurements
can settle it. Feed real peaks (`torch.cuda.max_memory_reserved()` + the context) to
`calibrate_memory` to rescale the activation terms.

**Seconds.** Per stage FLOPs / (peak_tflops x MFU_stage x dtype factor), plus a fixed per-job
overhead, a per-step overhead (kernel launches, scheduler step, CFG combine) and, with CPU
offload, the weight transfers over PCIe. MFU defaults: UNet 0.40, VAE 0.25, encoders 0.30.
float32 runs at half the fp16 tensor rate (TF32 tensor cores, `allow_tf32=True`; without TF32
it is far slower). All constants are in `Calibration`.

CLI: ``python -m pipeline.cost_model calibrate`` recounts and rewrites the JSON (~15 s);
``python -m pipeline.cost_model table [--gpu NAME]`` prints the estimate table;
``python -m pipeline.cost_model estimate --width W --height H --frames F [...]`` prints one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .architecture import FULL_SIZE, ArchitectureSpec

GiB = 2**30
MiB = 2**20

#: Stages in pipeline order; keys of `Estimate.flops_by_stage`.
STAGES: tuple[str, ...] = ("text_encoder", "image_encoder", "vae_encode", "unet", "vae_decode")
#: The component each stage runs.
STAGE_COMPONENT: dict[str, str] = {
    "text_encoder": "text_encoder",
    "image_encoder": "image_encoder",
    "vae_encode": "vae",
    "unet": "unet",
    "vae_decode": "vae",
}
COMPONENTS: tuple[str, ...] = ("text_encoder", "image_encoder", "vae", "unet")
DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
#: Square sizes behind the request field `resolution`.
RESOLUTIONS: dict[str, tuple[int, int]] = {"512p": (512, 512), "768p": (768, 768), "1024p": (1024, 1024)}
COEFFICIENTS_PATH = Path(__file__).with_name("cost_coefficients.json")

#: diffusers `BasicTransformerBlock` feed-forward width multiplier (`FeedForward(mult=4)`), the
#: one architectural number the component configs do not carry.
FF_MULT = 4


# --------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """One GPU class.

    `memory_bytes` is the datasheet capacity; `peak_tflops` the dense (no sparsity) fp16/bf16
    tensor-core rate with fp32 accumulation, which is what PyTorch's cuBLAS/cuDNN calls use.
    """

    name: str
    memory_bytes: int
    peak_tflops: float


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        # GA106, 12 GB GDDR6. GeForce tensor cores run fp16 with fp32 accumulate at half the
        # fp16-accumulate rate (~51 TFLOPS dense) -> ~25.6.
        GpuSpec("rtx3060-12gb", 12 * GiB, 25.6),
        # AD102, 24 GB GDDR6X. Ada whitepaper: 330.3 dense fp16-accumulate, 165.2 fp32-accumulate.
        GpuSpec("rtx4090-24gb", 24 * GiB, 165.2),
        # A100 datasheet: 312 TFLOPS dense fp16/bf16 tensor (624 with sparsity), SXM and PCIe.
        GpuSpec("a100-40gb", 40 * GiB, 312.0),
        GpuSpec("a100-80gb", 80 * GiB, 312.0),
        # H100 SXM5 datasheet: 989 TFLOPS dense fp16/bf16 (1979 with sparsity); PCIe card: 756.
        GpuSpec("h100-80gb", 80 * GiB, 989.0),
        # L4 datasheet: 242 TFLOPS fp16 tensor with sparsity -> 121 dense. ~22.5 GiB visible.
        GpuSpec("l4-24gb", 24 * GiB, 121.0),
        # AWS A10G (g5): NVIDIA publishes no sheet; commonly cited 70 TFLOPS dense fp16 tensor
        # (the A10 datasheet says 125). ~22.5 GiB visible with ECC.
        GpuSpec("a10g-24gb", 24 * GiB, 70.0),
    )
}


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What a request costs depends on: its shape, steps, dtype and memory options."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance: bool = True
    """Classifier-free guidance (guidance_scale > 1): the UNet runs on a batch of 2."""
    dtype: str = "float16"
    """"float16" | "bfloat16" (2 bytes) | "float32" (4 bytes)."""
    decode_chunk_size: int = 1
    """Frames the VAE decodes at once (the pipeline's `decode_chunk_size`)."""
    cpu_offload: bool = False
    """diffusers' `enable_model_cpu_offload`: one component on the GPU at a time."""

    def __post_init__(self) -> None:
        for name in ("width", "height", "num_frames", "num_inference_steps", "decode_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.width % 8 or self.height % 8:
            raise ValueError(f"width and height must be multiples of 8, got {self.width}x{self.height}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def bytes_per_element(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def unet_batch(self) -> int:
        return 2 if self.guidance else 1

    @property
    def latent_tokens(self) -> int:
        """N: latent positions per frame, (H/8)(W/8)."""
        f = _vae_scale_factor(FULL_SIZE)
        return (self.height // f) * (self.width // f)


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one workload on one GPU."""

    flops: float
    flops_by_stage: dict[str, float]
    """`STAGES` -> FLOPs (unet: all steps)."""
    vram_bytes: int
    vram_by_part: dict[str, int]
    """weights, activations, io, fragmentation, reserve (they sum to `vram_bytes`)."""
    seconds: float
    seconds_by_stage: dict[str, float]
    """`STAGES` plus "overhead" (per job and per step) and "offload" (PCIe transfers)."""
    peak_stage: str = "unet"
    """The stage where the VRAM peak happens."""

    def fits(self, gpu: GpuSpec) -> bool:
        return self.vram_bytes <= gpu.memory_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """Every tunable constant of the model, with defaults from first principles.

    Measured GPU numbers land here: `calibrate_memory` fits `activation_scale`; MFUs and
    overheads can be set from measured step times.
    """

    # --- seconds -----------------------------------------------------------------------------
    mfu_unet: float = 0.40
    mfu_vae: float = 0.25
    mfu_encoders: float = 0.30
    fp32_rate_factor: float = 0.5
    """float32 throughput relative to fp16/bf16 (TF32 tensor cores: 1/2)."""
    job_overhead_s: float = 1.0
    """Per job: preprocessing, scheduler set-up, MP4 hand-off, Python."""
    step_overhead_s: float = 0.010
    """Per denoising step: kernel launches, scheduler step, CFG combine."""
    offload_bandwidth_bytes_per_s: float = 8e9
    """Host<->GPU copy rate for `cpu_offload` (PCIe 4.0 x16, pageable memory)."""

    # --- memory ------------------------------------------------------------------------------
    reserve_bytes: int = 600 * MiB
    """CUDA context, cuBLAS/cuDNN workspaces, kernels: outside the caching allocator."""
    fragmentation: float = 1.10
    """Caching-allocator reserved/allocated ratio applied to activations and I/O tensors."""
    activation_scale: float = 1.0
    """Multiplies every activation term; fitted from measurements by `calibrate_memory`."""
    stream_tensors: float = 3.0
    """Residual stream of a transformer block, in tensors of C: input, normed, block residual."""
    geglu_tensors: float = 4.0
    """GEGLU working set in units of ff_mult x C: projection (2), gelu(gate) (1), product (1)."""
    attention_tensors: float = 5.0
    """Attention working set in C: q, k, v, SDPA output, out-projection (kernels: linear)."""
    resnet_tensors: float = 3.0
    """ResNet block in input channels: input, group-norm output, activation output."""


DEFAULT_CALIBRATION = Calibration()


# --------------------------------------------------------------------------------------------
# Coefficients file
# --------------------------------------------------------------------------------------------

# Closed-form terms, as named in the JSON: F frames, N latent tokens per frame.
_TERMS = {
    "1": lambda F, N: 1.0,
    "N": lambda F, N: float(N),
    "N^2": lambda F, N: float(N) * N,
    "F": lambda F, N: float(F),
    "F*N": lambda F, N: float(F) * N,
    "F*N^2": lambda F, N: float(F) * N * N,
    "N*F^2": lambda F, N: float(N) * F * F,
}
_STAGE_TERMS: dict[str, tuple[str, ...]] = {
    "text_encoder": ("1",),
    "image_encoder": ("1",),
    "vae_encode": ("N", "N^2"),
    "unet": ("F*N", "F*N^2", "N*F^2", "F", "N", "1"),
    "vae_decode": ("N", "N^2"),
}
_STAGE_UNIT = {
    "text_encoder": "prompt (77 tokens)",
    "image_encoder": "image (224x224)",
    "vae_encode": "image (HxW)",
    "unet": "sample (x2 with CFG) and denoising step",
    "vae_decode": "frame",
}
# Shapes (frames, height, width) the closed forms are fitted at. Spread in F and N, non-square
# included, all multiples of 64. The held-out shape in the tests is not among them.
_FIT_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "text_encoder": ((1, 512, 512),),
    "image_encoder": ((1, 512, 512),),
    "vae_encode": ((1, 256, 256), (1, 512, 768), (1, 1024, 1024), (1, 320, 576)),
    "vae_decode": ((1, 256, 256), (1, 512, 768), (1, 1024, 1024), (1, 320, 576)),
    "unet": (
        (2, 256, 256),
        (4, 512, 512),
        (8, 256, 512),
        (8, 768, 768),
        (16, 128, 128),
        (16, 512, 512),
        (16, 1024, 1024),
        (24, 384, 640),
        (32, 256, 256),
        (32, 768, 512),
    ),
}


@dataclass(frozen=True)
class Coefficients:
    """The contents of `cost_coefficients.json` that `estimate` needs."""

    terms: dict[str, tuple[str, ...]]
    coefficients: dict[str, tuple[float, ...]]
    parameters: dict[str, int]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Coefficients:
        flops = data["flops"]
        return cls(
            terms={s: tuple(flops[s]["terms"]) for s in STAGES},
            coefficients={s: tuple(float(c) for c in flops[s]["coefficients"]) for s in STAGES},
            parameters={c: int(n) for c, n in data["parameters"].items()},
        )

    def per_unit(self, stage: str, frames: int, tokens: int) -> float:
        """FLOPs of one unit of `stage` (see `_STAGE_UNIT`) at F frames and N tokens."""
        return sum(
            c * _TERMS[t](frames, tokens) for t, c in zip(self.terms[stage], self.coefficients[stage])
        )


@lru_cache(maxsize=4)
def load_coefficients(path: str | Path = COEFFICIENTS_PATH) -> Coefficients:
    """Read the fitted closed forms (cached: the file is read once per process)."""
    return Coefficients.from_json(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def stage_flops(workload: Workload, coefficients: Coefficients | None = None) -> dict[str, float]:
    """FLOPs per stage from the closed forms (unet: all steps, CFG batch included)."""
    co = coefficients or load_coefficients()
    F, N = workload.num_frames, workload.latent_tokens
    return {
        "text_encoder": (2 if workload.guidance else 1) * co.per_unit("text_encoder", 1, N),
        "image_encoder": co.per_unit("image_encoder", 1, N),
        "vae_encode": co.per_unit("vae_encode", 1, N),
        "unet": workload.num_inference_steps * workload.unet_batch * co.per_unit("unet", F, N),
        "vae_decode": F * co.per_unit("vae_decode", 1, N),
    }


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


def _stage_memory(workload: Workload, cal: Calibration) -> dict[str, tuple[float, float]]:
    """(activation bytes, I/O bytes) at the peak of each stage."""
    b = workload.bytes_per_element
    F, N, B = workload.num_frames, workload.latent_tokens, workload.unet_batch
    pixels = workload.width * workload.height
    s = cal.activation_scale
    w = _memory_widths(cal)
    latent_ch = FULL_SIZE.unet["in_channels"]
    video = F * 3 * pixels  # decoded frames, elements
    chunk = min(workload.decode_chunk_size, F)
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


def _vae_scale_factor(spec: ArchitectureSpec) -> int:
    return 2 ** (len(spec.vae["block_out_channels"]) - 1)


# --------------------------------------------------------------------------------------------
# Memory calibration from measurements
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Exact counts on the meta device (slow path)
# --------------------------------------------------------------------------------------------


_META_COMPONENTS: dict[str, dict[str, Any]] = {}


def _meta_components(spec: ArchitectureSpec = FULL_SIZE) -> dict[str, Any]:
    """`spec`'s components built on the meta device (cached per spec)."""
    key = spec.fingerprint()
    if key not in _META_COMPONENTS:
        import torch

        from .architecture import build_components

        with torch.device("meta"):
            _META_COMPONENTS[key] = build_components(spec)
    return _META_COMPONENTS[key]


def count_flops(
    stage: str,
    width: int = 512,
    height: int = 512,
    num_frames: int = 1,
    *,
    batch: int = 1,
    spec: ArchitectureSpec = FULL_SIZE,
) -> float:
    """Exact FLOPs of one forward pass of `stage`'s component, counted on the meta device.

    `batch` is prompts (text_encoder), images (image_encoder, vae_encode), the UNet batch (2 with
    CFG; one denoising step) or, for vae_decode, ignored: `num_frames` frames are decoded at once.
    Takes about a second per call after the first (which builds the model, a few seconds).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    comps = _meta_components(spec)
    f = _vae_scale_factor(spec)
    h, w = height // f, width // f
    cross = spec.unet["cross_attention_dim"]
    with torch.device("meta"), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            if stage == "text_encoder":
                ids = torch.zeros(batch, spec.tokenizer_max_length, dtype=torch.long)
                comps["text_encoder"](ids)
            elif stage == "image_encoder":
                size = spec.image_encoder["image_size"]
                comps["image_encoder"](torch.empty(batch, 3, size, size))
            elif stage == "vae_encode":
                comps["vae"].encode(torch.empty(batch, 3, height, width))
            elif stage == "vae_decode":
                latent = spec.vae["latent_channels"]
                comps["vae"].decode(torch.empty(num_frames, latent, h, w))
            else:
                ch = spec.unet["in_channels"]
                comps["unet"](
                    torch.empty(batch, ch, num_frames, h, w),
                    torch.tensor(999),
                    encoder_hidden_states=torch.empty(batch, spec.tokenizer_max_length, cross),
                    fps=torch.full((batch,), 16),
                    image_latents=torch.empty(batch, ch, num_frames, h, w),
                    image_embeddings=torch.empty(batch, 1, spec.image_encoder["projection_dim"]),
                    return_dict=False,
                )
    return float(counter.get_total_flops())


def count_parameters(spec: ArchitectureSpec = FULL_SIZE) -> dict[str, int]:
    """Parameters per component of `spec` (from the meta model)."""
    comps = _meta_components(spec)
    return {c: int(sum(p.numel() for p in comps[c].parameters())) for c in COMPONENTS}


def _sdpa_is_counted() -> bool:
    """Whether the counter sees SDPA (4*L*S*d FLOPs per head) under the forced math path."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), sdpa_kernel(SDPBackend.MATH):
        q = torch.empty(2, 3, 64, 32)
        k = torch.empty(2, 3, 48, 32)
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
    return counter.get_total_flops() == 4 * 2 * 3 * 64 * 48 * 32


def _analytic_attention_coefficients(spec: ArchitectureSpec) -> dict[str, float]:
    """Quadratic attention FLOPs expected from the architecture (self-attention, 4·L²·C).

    unet F·N²: every spatial transformer (down: layers_per_block, up: +1, mid: 1) at level l
    attends over N/4^l tokens with C_l channels. vae N²: the one mid-block attention, 512 ch.
    """
    C = spec.unet["block_out_channels"]
    layers = spec.unet["layers_per_block"]
    unet = 0.0
    for level, kind in enumerate(spec.unet["down_block_types"]):
        if "CrossAttn" in kind:
            unet += (2 * layers + 1) * 4 * C[level] / 16.0**level
    unet += 4 * C[-1] / 16.0 ** (len(C) - 1)  # mid block
    return {"unet F*N^2": unet, "vae N^2": 4.0 * spec.vae["block_out_channels"][-1]}


def _fit(stage: str, spec: ArchitectureSpec) -> dict[str, Any]:
    """Count `stage` at its fit shapes and solve for the closed-form coefficients."""
    import numpy as np

    terms = _STAGE_TERMS[stage]
    shapes = _FIT_SHAPES[stage]
    f = _vae_scale_factor(spec)
    rows, counts = [], []
    for frames, height, width in shapes:
        tokens = (height // f) * (width // f)
        rows.append([_TERMS[t](frames, tokens) for t in terms])
        counts.append(count_flops(stage, width, height, frames, spec=spec))
    A, y = np.asarray(rows, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    norm = np.abs(A).max(axis=0)
    coef = np.linalg.lstsq(A / norm, y, rcond=None)[0] / norm
    coef = [float(f"{c:.12g}") for c in coef]
    residual = max(abs(float(np.dot(r, coef)) - c) / c for r, c in zip(rows, counts))
    return {
        "per": _STAGE_UNIT[stage],
        "terms": list(terms),
        "coefficients": coef,
        "fitted_at": [list(s) for s in shapes],
        "max_relative_residual": float(f"{residual:.3g}"),
    }


def calibrate(
    path: str | Path = COEFFICIENTS_PATH, spec: ArchitectureSpec = FULL_SIZE
) -> dict[str, Any]:
    """Recount everything on the meta device, refit, check and write `path`."""
    import diffusers
    import torch
    import transformers

    if not _sdpa_is_counted():
        raise RuntimeError(
            "FlopCounterMode does not count scaled_dot_product_attention on this torch build; "
            "attention FLOPs would be missing from the fit"
        )
    flops = {stage: _fit(stage, spec) for stage in STAGES}
    expected = _analytic_attention_coefficients(spec)
    fitted = {
        "unet F*N^2": flops["unet"]["coefficients"][flops["unet"]["terms"].index("F*N^2")],
        "vae N^2": flops["vae_decode"]["coefficients"][flops["vae_decode"]["terms"].index("N^2")],
    }
    checks = {k: {"fitted": fitted[k], "analytic": expected[k]} for k in expected}
    for name, pair in checks.items():
        if not math.isclose(pair["fitted"], pair["analytic"], rel_tol=1e-3):
            raise RuntimeError(
                f"attention term {name}: fitted {pair['fitted']} != analytic {pair['analytic']}"
            )
    data = {
        "about": (
            "I2VGen-XL cost-model coefficients: exact FLOP counts (torch FlopCounterMode on the "
            "meta device; 2 FLOPs per multiply-add, matmuls/convs/attention) fitted to closed "
            "forms, exact for W and H multiples of 64. F = frames, N = latent tokens per frame = "
            "(H/8)*(W/8); fitted_at lists [frames, height, width]. Regenerate with "
            "`python -m pipeline.cost_model calibrate`."
        ),
        "architecture": spec.name,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "parameters": count_parameters(spec),
        "flops": flops,
        "checks": {"attention_quadratic_terms": checks},
    }
    Path(path).write_text(_dump_json(data) + "\n")
    load_coefficients.cache_clear()
    return data


def _dump_json(obj: Any, indent: int = 0) -> str:
    """JSON with objects indented and lists of numbers (or of short lists) on one line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {_dump_json(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + _dump_json(v, indent + 2) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cost_model", description=(__doc__ or "").split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="recount FLOPs on the meta device and rewrite the JSON")
    cal.add_argument("--output", default=str(COEFFICIENTS_PATH))
    tab = sub.add_parser("table", help="print the estimate table for one GPU (or all)")
    tab.add_argument("--gpu", choices=sorted(GPUS), help="default: every GPU")
    tab.add_argument("--steps", type=int, default=50)
    tab.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float16")
    est = sub.add_parser("estimate", help="print one estimate as JSON")
    est.add_argument("--gpu", choices=sorted(GPUS), default="rtx4090-24gb")
    est.add_argument("--width", type=int, default=512)
    est.add_argument("--height", type=int, default=512)
    est.add_argument("--frames", type=int, default=16)
    est.add_argument("--steps", type=int, default=50)
    est.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float16")
    est.add_argument("--no-guidance", action="store_true")
    est.add_argument("--decode-chunk-size", type=int, default=1)
    est.add_argument("--cpu-offload", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "calibrate":
        data = calibrate(args.output)
        for stage, fit in data["flops"].items():
            terms = dict(zip(fit["terms"], fit["coefficients"]))
            print(f"{stage:<14} residual {fit['max_relative_residual']:.2g}  {terms}")
        print(f"parameters: {data['parameters']}")
        print(f"wrote {args.output}")
    elif args.command == "table":
        gpus = [GPUS[args.gpu]] if args.gpu else list(GPUS.values())
        print("\n\n".join(table(g, steps=args.steps, dtype=args.dtype) for g in gpus))
    else:
        wl = Workload(
            args.width,
            args.height,
            args.frames,
            args.steps,
            guidance=not args.no_guidance,
            dtype=args.dtype,
            decode_chunk_size=args.decode_chunk_size,
            cpu_offload=args.cpu_offload,
        )
        print(json.dumps(estimate(wl, GPUS[args.gpu]).to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
