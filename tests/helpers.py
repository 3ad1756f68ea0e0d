"""Helpers shared by tests (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest


def make_image(width: int = 96, height: int = 80, seed: int = 0) -> PIL.Image.Image:
    """A small deterministic test picture with structure (not flat noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return PIL.Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def require_tool(name: str) -> str:
    """Path of a system tool the tests use; fails (never skips) with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"'{name}' is not installed: run `make sysdeps` (Debian package ffmpeg)")
    return path


def ffprobe(path) -> dict:
    """Stream facts of the first video stream, with an exact frame count."""
    exe = require_tool("ffprobe")
    out = subprocess.run(
        [exe, "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=codec_name,pix_fmt,width,height,r_frame_rate,nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)["streams"][0]
