"""Loading I2VGen-XL: from a local diffusers directory, a hub id already in the local cache, or
the built-in `tiny-random` model.

All three go through the same `I2VGenXLPipeline.from_pretrained` call. `tiny-random` is first
built from `architecture.TINY` with seeded random weights and saved with `save_pretrained`
(once, into the cache directory), so the loading code tested on it is the code that loads real
weights. Nothing is ever downloaded: hub ids are loaded with `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0
DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class LoadedModel:
    """A loaded pipeline plus what `params.json` records about it."""

    pipe: Any  # diffusers.I2VGenXLPipeline
    name: str  # what the user asked for: "tiny-random", a directory, or a hub id
    source: str  # the directory the weights were read from
    device: str
    dtype: str
    cpu_offload: bool
    load_seconds: float

    @property
    def is_tiny_random(self) -> bool:
        return self.name == TINY_RANDOM


def cache_dir() -> Path:
    """Where built-in models are saved: `$I2V_CACHE_DIR`, else `~/.cache/i2v-farm`."""
    return Path(os.environ.get("I2V_CACHE_DIR") or Path.home() / ".cache" / "i2v-farm")


def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device '{device}' was asked for but no CUDA GPU is visible", field="device")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    """fp16 on GPUs (the published weights' variant), bf16 on request, always fp32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'", field="dtype")
    if not device.startswith("cuda"):
        return torch.float32
    return {"auto": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}[dtype]


def tiny_random_dir(root: Path | None = None) -> Path:
    """Directory of the saved tiny-random model, named by a hash of its architecture so a change
    of `architecture.TINY` builds a fresh one instead of loading stale weights."""
    from .architecture import TINY

    digest = hashlib.sha256(f"{TINY.fingerprint()}|seed={TINY_RANDOM_SEED}".encode()).hexdigest()[:12]
    return (root or cache_dir()) / f"tiny-random-i2vgen-xl-{digest}"


def ensure_tiny_random(root: Path | None = None) -> Path:
    """Build and save the tiny-random model unless it is saved already; return its directory.

    Deterministic (fixed seed) and safe when several processes race: each builds into a
    temporary directory and renames it into place; the loser's copy is dropped.
    """
    target = tiny_random_dir(root)
    if (target / "model_index.json").is_file():
        return target
    import torch
    from diffusers import I2VGenXLPipeline

    from .architecture import TINY, build_components

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_RANDOM_SEED)
            components = build_components(TINY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            I2VGenXLPipeline(**components).save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the tiny-random I2VGen-XL in %s", target)
    return target


def resolve_source(model: str) -> tuple[str, dict[str, Any]]:
    """Map what the user named to a `from_pretrained` argument and its extra keyword arguments."""
    if model == TINY_RANDOM:
        return str(ensure_tiny_random()), {}
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        if not path.is_dir():
            raise ModelLoadError(f"model directory '{model}' does not exist", field="model")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"'{model}' is not a diffusers model directory (no model_index.json); "
                "point --model at the folder that holds model_index.json, unet/, vae/ ...",
                field="model",
            )
        return str(path), _variant(path)
    if model.count("/") == 1 and all(model.split("/")):
        return model, {"local_files_only": True}
    raise ModelLoadError(
        f"unknown model '{model}': use 'tiny-random', a local diffusers directory, "
        "or a hub id (org/name) already downloaded into the local cache",
        field="model",
    )


def _variant(path: Path) -> dict[str, Any]:
    """`{"variant": "fp16"}` when the UNet is saved only as the fp16 variant (a partial download)."""
    unet = path / "unet"
    if list(unet.glob("*.fp16.safetensors")) and not list(unet.glob("diffusion_pytorch_model.safetensors")):
        return {"variant": "fp16"}
    return {}


def load_model(
    model: str = TINY_RANDOM,
    *,
    device: str | None = None,
    dtype: str = "auto",
    cpu_offload: bool = False,
) -> LoadedModel:
    """Load I2VGen-XL for generation. Any failure is a `ModelLoadError` with a clear message."""
    _quiet_libraries()
    from diffusers import I2VGenXLPipeline

    started = time.perf_counter()
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    source, kwargs = resolve_source(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = I2VGenXLPipeline.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear error
        if kwargs.get("local_files_only"):
            message = (
                f"model '{model}' is not in the local Hugging Face cache and nothing is downloaded "
                f"at run time (and there is no local directory of that name); fetch it ahead of "
                f"time (e.g. `hf download {model}`) or pass a local directory "
                f"({type(exc).__name__}: {_first_line(exc)})"
            )
        else:
            message = (
                f"could not load the model from '{source}': {type(exc).__name__}: {_first_line(exc)}. "
                "The weights may be incomplete or corrupt: check their integrity (SHA256) or download again"
            )
        raise ModelLoadError(message, field="model") from exc
    if type(pipe).__name__ != "I2VGenXLPipeline":
        raise ModelLoadError(f"'{model}' holds a {type(pipe).__name__}, not an I2VGen-XL pipeline", field="model")
    if cpu_offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        cpu_offload = False
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe=pipe,
        name=model,
        source=source,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
        cpu_offload=cpu_offload,
        load_seconds=time.perf_counter() - started,
    )


def _quiet_libraries() -> None:
    """No per-file loading bars or deprecation banners from diffusers/transformers: our own
    progress output is what the user reads, and failures surface as `ModelLoadError`."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
