"""What the cost model talks about: GPUs, workloads, estimates and the tunable constants
(`Calibration`, read from `pipeline/gpu_calibration.json` when present) (the design: docs/design/cost-model.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..architecture import FULL_SIZE, ArchitectureSpec

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
COEFFICIENTS_PATH = Path(__file__).resolve().parent.parent / "cost_coefficients.json"

#: diffusers `BasicTransformerBlock` feed-forward width multiplier (`FeedForward(mult=4)`), the
#: one architectural number the component configs do not carry.
FF_MULT = 4




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
    vae_slicing: bool = True
    """The worker's default: the VAE decodes one frame at a time whatever `decode_chunk_size`
    says (measured on an H200: chunk 8 peaks and runs exactly as chunk 1)."""

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


#: Fitted to GPU measurements by `python -m pipeline.gpu_fit` (see its docstring); absent: the
#: first-principles defaults above.
CALIBRATION_PATH = Path(__file__).resolve().parent.parent / "gpu_calibration.json"


def load_calibration(path: Path = CALIBRATION_PATH) -> Calibration:
    """The fitted calibration in `path`, or `Calibration()` when there is no file."""
    if not path.is_file():
        return Calibration()
    return replace(Calibration(), **json.loads(path.read_text())["calibration"])


DEFAULT_CALIBRATION = load_calibration()


def _vae_scale_factor(spec: ArchitectureSpec) -> int:
    return 2 ** (len(spec.vae["block_out_channels"]) - 1)
