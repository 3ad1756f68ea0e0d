"""I2VGen-XL built from configuration: the full-size architecture and the tiny-random one.

Both are the same diffusers/transformers classes as the published `ali-vilab/i2vgen-xl` weights
(`I2VGenXLUNet`, `AutoencoderKL`, `CLIPTextModel`, `CLIPVisionModelWithProjection`,
`DDIMScheduler`); only the sizes differ.

* `FULL_SIZE` mirrors the published model's component configs (UNet 320/640/1280/1280 with
  64-dim heads and 1024-dim cross attention, the SD 8x VAE, OpenCLIP ViT-H/14 text tower with
  24 layers of width 1024, ViT-H/14 image tower with 32 layers of width 1280). Built on the meta
  device it costs no memory and gives exact FLOP and parameter counts (see `cost_model`); built
  on a GPU with random weights it has the real model's speed and memory.
* `TINY` keeps every block type but with a handful of channels, so it runs on a CPU in seconds.
  Its VAE keeps the real 8x downscale (four blocks): with one block the latents stay at image size
  and spatial attention over them explodes on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The scheduler the published model ships with: v-prediction on a zero-terminal-SNR schedule.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """Component configs of one I2VGen-XL variant (keyword arguments of each class)."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    feature_extractor: dict[str, Any]
    tokenizer_max_length: int = 77
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))

    def fingerprint(self) -> str:
        """A stable text of the whole spec (used to version saved tiny-random weights)."""
        return json.dumps(self.__dict__, sort_keys=True, default=str)


FULL_SIZE = ArchitectureSpec(
    name="i2vgen-xl",
    unet=dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=1024,
        attention_head_dim=64,
        num_attention_heads=None,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1024,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    image_encoder=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        projection_dim=1024,
    ),
    feature_extractor=dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
)

TINY = ArchitectureSpec(
    name="tiny-random",
    unet=dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=4,
        num_attention_heads=None,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=514,  # the byte-level vocabulary of `tiny_tokenizer` plus two specials
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=16,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    ),
    image_encoder=dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
        projection_dim=16,
    ),
    feature_extractor=dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
)


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: one printable character per byte value (GPT-2's table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer(max_length: int = 77):
    """A real `CLIPTokenizer` with a byte-level vocabulary and no merges: 514 tokens.

    Every text tokenizes (one token per byte), so prompts behave as with the real tokenizer,
    including truncation at 77 tokens, without any download.
    """
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_components(spec: ArchitectureSpec, *, tokenizer=None) -> dict[str, Any]:
    """Instantiate every component of `spec` with fresh (random) weights.

    Call it under `torch.device("meta")` to build without allocating weights, or after
    `torch.manual_seed` for reproducible random weights. `tokenizer` defaults to the tiny one.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers.models.unets.unet_i2vgen_xl import I2VGenXLUNet
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    return {
        "unet": I2VGenXLUNet(**spec.unet),
        "vae": AutoencoderKL(**spec.vae),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**spec.text_encoder)),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**spec.image_encoder)),
        "feature_extractor": CLIPImageProcessor(**spec.feature_extractor),
        "tokenizer": tokenizer if tokenizer is not None else tiny_tokenizer(spec.tokenizer_max_length),
        "scheduler": DDIMScheduler(**spec.scheduler),
    }
