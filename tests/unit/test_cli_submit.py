"""`i2v-farm submit` as a user types it, against a loopback HTTP server standing in for the farm:
what the command line puts in the `POST /v1/jobs` request."""

from __future__ import annotations

import json

import pytest

from serving import cli
from tests.helpers import webhook_receiver

JOB = {"id": "ab" * 16, "status": "queued", "vram_class": "12gb", "estimate": {"vram_bytes": 3 * 2**30, "seconds": 12},
       "links": {"self": "/v1/jobs/" + "ab" * 16}}


@pytest.fixture
def farm():
    """Answers `POST /v1/jobs` with a queued job; `seen` holds each request."""
    server, seen, url = webhook_receiver(lambda seen: (202 if seen[-1]["path"] == "/v1/jobs" else 404, JOB))
    yield url, seen
    server.shutdown()
    server.server_close()


def test_no_preview_sends_preview_false_and_the_default_leaves_it_to_the_farm(farm, capsys, monkeypatch):
    url, seen = farm
    monkeypatch.delenv("I2V_TOKEN", raising=False)
    assert cli.main(["submit", "--sample", "--url", url, "--no-preview", "--steps", "2"]) == 0
    assert f"job {JOB['id']} queued on class 12gb" in capsys.readouterr().out
    assert cli.main(["submit", "--sample", "--url", url]) == 0
    off, default = (json.loads(r["body"]) for r in seen)
    assert off["preview"] is False and off["num_inference_steps"] == 2 and off["prompt"] and off["image"]
    assert "preview" not in default  # previews on: the farm's default
    assert {k: v for k, v in off.items() if k not in ("preview", "num_inference_steps")} == default
