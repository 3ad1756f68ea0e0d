"""`i2v-farm up` as a user runs it: a foreground process, HTTP on loopback, Ctrl-C to stop."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import ffprobe, make_image

CLI = [sys.executable, "-m", "serving.cli"]


class Proc:
    """A running `i2v-farm` process whose output is collected as it comes."""

    def __init__(self, args, cwd, env=None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for var in [v for v in env if v.startswith("I2V_") and v != "I2V_CACHE_DIR"]:
            env.pop(var)
        self.p = subprocess.Popen(CLI + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.p.poll() is not None:
                self._t.join(5)
                raise AssertionError(f"exited {self.p.returncode} before {text!r}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout}s:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def stop(self, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._t.join(5)
        return self.p.returncode


# `farm_up`: the package's one `i2v-farm up` (tests/e2e/conftest.py), shared with test_web.py.


def test_up_serves_jobs_over_http_and_writes_an_mp4(farm_up, tmp_path):
    proc, url, cwd, _ = farm_up
    assert f"ready at {url}" in proc.output and "tiny-random" in proc.output

    image = tmp_path / "in.png"
    make_image(128, 96, seed=5).save(image)
    with image.open("rb") as f:
        r = requests.post(url + "/v1/jobs", files={"image": ("in.png", f, "image/png")},
                          data={"prompt": "A cat turning its head to the left", "preset": "fast",
                                "num_inference_steps": "2", "seed": "3"}, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["vram_class"] and job["estimate"]["vram_bytes"] > 0

    deadline = time.monotonic() + 180
    while (job := requests.get(url + job["links"]["self"], timeout=30).json())["status"] not in (
            "succeeded", "failed", "canceled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"step": 2, "total": 2}

    video = requests.get(url + job["result"]["url"], timeout=60)
    assert video.status_code == 200
    out = tmp_path / "got.mp4"
    out.write_bytes(video.content)
    stream = ffprobe(out)
    assert (stream["width"], stream["height"]) == (job["result"]["width"], job["result"]["height"]) == (584, 440)
    assert int(stream["nb_read_frames"]) == 8 and stream["codec_name"] == "h264"
    # results land under ./outputs of the directory the farm was started in
    stored = cwd / "outputs" / job["prefix"]
    assert (stored / "video.mp4").read_bytes() == video.content
    assert (stored / "params.json").is_file() and (stored / "input.png").is_file()
    assert (stored / "poster.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_submit_client_waits_with_a_progress_bar_and_downloads(farm_up, tmp_path):
    _, url, _, _ = farm_up
    proc = subprocess.run(CLI + ["submit", "--url", url, "--sample", "--preset", "fast", "--steps", "2",
                                 "--wait", "--out", str(tmp_path / "dl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path / "dl" and path.suffix == ".mp4"
    assert int(ffprobe(path)["nb_read_frames"]) == 8
    assert "step" in proc.stderr and "succeeded" in proc.stderr  # the bar

    bad = subprocess.run(CLI + ["submit", "--url", url, "--sample", "--frames", "99"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "num_frames" in bad.stderr


def test_up_runs_ray_with_token_auth_and_no_exposed_port_runs_code(farm_up, tmp_path):
    """The review's attack on `up`'s own process tree: every socket beyond loopback gets a pickle
    without the Ray token (refused, nothing runs); the token file is 0600 and in no output or log."""
    from tests.ray_probe import assert_no_exposed_port_runs_code, cmdlines_holding, files_holding, session_dirs

    proc, _, cwd, _ = farm_up
    token_file = cwd / "outputs" / "ray_token"
    assert f"Ray: token authentication on (token file {token_file})" in proc.output
    assert "API tokens off: listening on 127.0.0.1 only; every local caller is admin" in proc.output
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64

    assert_no_exposed_port_runs_code([proc.p.pid], str(tmp_path), token)

    sessions = session_dirs([proc.p.pid])
    assert sessions
    assert files_holding(token, sessions) == []
    assert cmdlines_holding(token, [proc.p.pid]) == []
    assert token not in proc.output


def test_up_refuses_a_taken_port(farm_up, tmp_path):
    _, _, _, port = farm_up
    second = subprocess.run(CLI + ["up", "--port", str(port)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 2
    assert f"port {port}" in second.stderr and "in use" in second.stderr


def test_up_plans_simulated_nodes_and_refuses_a_bad_spec():
    """`--simulate` (no processes: what `up` would start; the start itself is the fixture's)."""
    from serving.config import load_settings
    from serving.launcher import LaunchError, plan_nodes

    settings = load_settings(env={})
    assert plan_nodes(settings, "12gb:2,24gb:1") == (
        {"12gb": 2, "24gb": 1}, "simulated nodes (fake GPUs): 2 x 12gb, 1 x 24gb")
    with pytest.raises(LaunchError) as err:
        plan_nodes(settings, "13gb:1")
    assert err.value.field == "simulate"


def test_ctrl_c_stops_the_farm(farm_up, tmp_path):
    """The package's last test (tests/e2e/conftest.py moves it there): Ctrl-C stops the farm the
    others used, here and in test_web.py."""
    proc, url, cwd, _ = farm_up
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    _ray_cli_works_as_up_says(proc, cwd, tmp_path)
    assert proc.stop() == 0
    assert "stopped" in proc.output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)


def _ray_cli_works_as_up_says(proc: Proc, cwd: Path, tmp_path: Path) -> None:
    """`up --dashboard` prints the shell line for `ray job submit` (the token FILE, never the token);
    a shell with just those variables reaches the Jobs API, one without them is refused."""
    import shlex

    (line,) = [l for l in proc.output.splitlines() if " ray job submit --address " in l]
    words = shlex.split(line)
    assignments = dict(w.split("=", 1) for w in words[:words.index("ray")])
    address = words[words.index("--address") + 1]
    token_file = Path(assignments["RAY_AUTH_TOKEN_PATH"])
    assert assignments["RAY_AUTH_MODE"] == "token" and token_file == cwd / "outputs" / "ray_token"
    assert token_file.read_text().strip() not in proc.output
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    ray = [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address]
    ok = subprocess.run(ray, env={**base, **assignments}, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = subprocess.run(ray, env=base, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr
