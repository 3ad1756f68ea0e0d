"""Shared fixtures. Tests never touch the user's cache or download anything."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture
def dns():
    """A fake DNS for `serving.egress`: name -> list of answers (one list per lookup, the last
    one repeats); yields (answers, names looked up)."""
    import socket

    from serving import egress

    answers: dict[str, list[list[str]]] = {}
    calls: list[str] = []

    def resolver(host, port):
        calls.append(host)
        queue = answers.get(host.lower())
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return queue.pop(0) if len(queue) > 1 else queue[0]

    old = egress.set_resolver(resolver)
    yield answers, calls
    egress.set_resolver(old)


#: Debian's Chromium, driven by Playwright (never a browser build Playwright would download).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for the web page tests (one per test module)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed: run `make sysdeps` (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()

