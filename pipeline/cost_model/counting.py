"""Exact FLOP and parameter counts of the real model code on the meta device (slow path: torch),
and `calibrate`, which refits `cost_coefficients.json` (the design: docs/design/cost-model.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..architecture import FULL_SIZE, ArchitectureSpec
from .flops import _FIT_SHAPES, _STAGE_TERMS, _STAGE_UNIT, _TERMS, load_coefficients  # noqa: F401
from .spec import COEFFICIENTS_PATH, COMPONENTS, STAGES, _vae_scale_factor

_META_COMPONENTS: dict[str, dict[str, Any]] = {}


def _meta_components(spec: ArchitectureSpec = FULL_SIZE) -> dict[str, Any]:
    """`spec`'s components built on the meta device (cached per spec)."""
    key = spec.fingerprint()
    if key not in _META_COMPONENTS:
        import torch

        from ..architecture import build_components

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
