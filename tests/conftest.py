"""Shared fixtures. Tests never touch the user's cache or download anything."""

from __future__ import annotations

import os
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in models are saved under a per-run cache directory, not ~/.cache."""
    path = tmp_path_factory.mktemp("i2v-cache")
    old = os.environ.get("I2V_CACHE_DIR")
    os.environ["I2V_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("I2V_CACHE_DIR", None)
    else:
        os.environ["I2V_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model(_isolated_cache):
    """The tiny-random model, built, saved and loaded through the normal path, once per run."""
    from pipeline.loading import load_model

    return load_model("tiny-random", device="cpu")
