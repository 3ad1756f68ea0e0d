"""FLOPs per stage from the closed forms fitted once on the meta device (`cost_coefficients.json`)
(the design: docs/design/cost-model.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .spec import COEFFICIENTS_PATH, STAGES, Workload

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
