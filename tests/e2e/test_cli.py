"""`i2v-farm generate` / `estimate` run as a user runs them: a process, files, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ffprobe, make_image

CLI = [sys.executable, "-m", "serving.cli"]


def run(args, tmp_path, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(CLI + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "input.png"
    make_image(120, 100, seed=11).save(path)
    return path


def test_generate_writes_a_playable_mp4_and_its_record(tmp_path, image_file):
    proc = run(
        ["generate", "--image", str(image_file), "--prompt", "Camera slowly zooming in on the face",
         "--preset", "fast", "--steps", "2", "--fps", "6", "--seed", "77", "--out", "renders"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    video = Path(proc.stdout.strip().splitlines()[-1])
    assert video.is_file() and video.parent == tmp_path / "renders"
    assert re.fullmatch(r"video_\d{8}_\d{6}_[0-9a-f]{8}\.mp4", video.name)
    assert "tiny-random" in proc.stderr and "noise" in proc.stderr  # the user is told
    assert "denoising" in proc.stderr  # progress bar

    stream = ffprobe(video)
    # 512p of a 6:5 image: aspect kept, <= 512^2 pixels, multiples of 8
    assert (stream["width"], stream["height"]) == (560, 464)
    assert stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p"
    assert int(stream["nb_read_frames"]) == 8
    assert stream["r_frame_rate"] == "6/1"

    record = json.loads(video.with_name(video.stem + ".params.json").read_text())
    assert record["params"]["seed"] == 77 and record["params"]["preset"] == "fast"
    assert record["params"]["num_inference_steps"] == 2 and record["params"]["num_frames"] == 8
    assert record["model"]["name"] == "tiny-random" and "noise" in record["model"]["note"]
    assert record["output"]["file"] == video.name and record["output"]["frames"] == 8
    assert {"load", "conditioning", "denoise", "decode", "encode", "total"} <= set(record["timings"])
    assert record["peak_memory_bytes"] > 0 and record["peak_memory_kind"] == "process_peak_rss"
    assert record["device"].startswith("cpu")


@pytest.mark.slow  # the file-name rule itself: tests/unit/test_video.py (uniqueness)
def test_two_runs_never_overwrite(tmp_path, image_file):
    args = ["generate", "--image", str(image_file), "--prompt", "waves", "--preset", "fast", "--steps", "1",
            "--out", "o"]
    first, second = run(args, tmp_path), run(args, tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert len(list((tmp_path / "o").glob("*.mp4"))) == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["--frames", "64"], "'num_frames' must be between 8 and 32"),
        (["--guidance", "0.5"], "'guidance_scale' must be between"),
        (["--model", "/no/such/model"], "does not exist"),
    ],
)
def test_bad_settings_fail_clearly_and_write_nothing(tmp_path, image_file, args, words):
    proc = run(["generate", "--image", str(image_file), "--prompt", "x", "--out", "o", *args], tmp_path)
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("o/*"))


def test_bad_image_fails_clearly(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    proc = run(["generate", "--image", str(bad), "--prompt", "x", "--out", "o"], tmp_path)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_estimate_prints_memory_and_time(tmp_path):
    proc = run(["estimate", "--preset", "standard", "--gpu", "rtx3060-12gb", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["workload"]["width"] == 512 and est["workload"]["num_frames"] == 16
    assert est["vram_bytes"] > 4 * 2**30 and est["seconds"] > 1
    table = run(["estimate", "--table", "--gpu", "rtx4090-24gb"], tmp_path)
    assert table.returncode == 0, table.stderr
    for res in ("512p", "768p", "1024p"):
        assert res in table.stdout
