"""The web page as a person uses it: real headless Chromium (Debian's `/usr/bin/chromium`, driven
by Playwright; no browser download) against `i2v-farm up` started as a process (tiny-random; the
one the package's tests share, tests/e2e/conftest.py).

Upload an image, pick a preset, generate, watch the video play with the right duration, watch a
long job's clip form in the live preview (and turn previews off for the next), cancel a running
job from the history, open the finished one again from the history. A screenshot of the finished
page is saved under the test's tmp dir and copied to `test-artifacts/web-page.png`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.helpers import ffprobe, make_image

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

VIDEO_PLAYING = """() => { const v = document.getElementById('video');
    return !v.hidden && v.readyState >= 3 && v.currentTime > 0.1 && !v.paused }"""


@pytest.fixture(scope="module")
def farm(farm_up):
    """The URL of the package's `i2v-farm up` (tests/e2e/conftest.py), shared with test_farm_up.py."""
    return farm_up[1]




def _job_id_of(page) -> str:
    return page.locator("#record dd").first.inner_text()


def _video_state(page) -> dict:
    return page.evaluate("""() => { const v = document.getElementById('video');
        return {src: v.currentSrc, duration: v.duration, readyState: v.readyState, time: v.currentTime,
                paused: v.paused, error: v.error && v.error.message} }""")


def test_page_generates_plays_cancels_and_reopens_from_history(farm, browser, tmp_path, capsys):
    from playwright.sync_api import expect

    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    page.goto(farm + "/")

    # The page: Input on the left, Output on the right, the model's note, tips and examples.
    expect(page.get_by_role("heading", name="Input")).to_be_visible()
    expect(page.get_by_role("heading", name="Output")).to_be_visible()
    note = page.get_by_role("note")
    expect(note).to_contain_text("noise")
    expect(note).to_contain_text("--model")  # how to point the farm at real weights
    expect(page.get_by_text("subject + action verb")).to_be_visible()
    assert page.get_by_label("Fast", exact=True).is_visible()

    # A picture too small for the farm: the API's refusal shows in the message area.
    small = tmp_path / "small.png"
    make_image(32, 32, seed=1).save(small)
    page.get_by_label("Image", exact=True).set_input_files(small)
    page.get_by_role("button", name="A cat turning its head to the left").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("A cat turning its head to the left")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The image was refused")
    expect(alert).to_contain_text("64")
    assert page.get_by_label("Image", exact=True).get_attribute("aria-invalid") == "true"

    # Upload, preset, advanced settings (few steps: tiny-random on a CPU), estimate, generate.
    image = tmp_path / "in.png"
    make_image(320, 240, seed=5).save(image)
    page.get_by_label("Image", exact=True).set_input_files(image)
    expect(page.get_by_role("img", name="Preview of the input image")).to_be_visible()
    expect(page.locator("#image-info")).to_contain_text("320 × 240")
    expect(alert).to_be_hidden()
    page.get_by_label("Fast", exact=True).check()
    page.get_by_text("Advanced settings").click()
    expect(page.get_by_label("Frames", exact=True)).to_have_value("8")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("30")
    page.get_by_label("Steps", exact=True).fill("2")
    page.get_by_label("Frames per second", exact=True).fill("4")
    page.get_by_label("Seed", exact=True).fill("7")
    estimate = page.get_by_role("status", name="Estimate")
    expect(estimate).to_contain_text("VRAM class 80gb")
    expect(estimate).to_contain_text("584 × 440 px, 8 frames at 4 fps = 2 s of video")
    page.get_by_role("button", name="Generate").click()

    # Live progress, then the video plays in the page with the right duration (8 frames / 4 fps).
    progress = page.locator("#job-progress-text")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
    expect(progress).to_contain_text("Done in")
    first = _job_id_of(page)
    page.wait_for_function(VIDEO_PLAYING, timeout=30_000)
    video = _video_state(page)
    assert video["src"].endswith(f"/v1/jobs/{first}/video") and video["error"] is None, video
    assert video["duration"] == pytest.approx(2.0, abs=0.1), video
    before = video["time"]
    page.wait_for_function(f"() => document.getElementById('video').currentTime != {before}")

    # The download link is the MP4, and the parameter record names time, VRAM, class, node, seed.
    download = page.get_by_role("link", name="Download MP4")
    href = download.get_attribute("href")
    assert href.endswith(f"/v1/jobs/{first}/video")
    mp4 = tmp_path / "downloaded.mp4"
    mp4.write_bytes(requests.get(href, timeout=60).content)
    stream = ffprobe(mp4)
    assert (stream["codec_name"], int(stream["nb_read_frames"]), stream["r_frame_rate"]) == ("h264", 8, "4/1")
    job = requests.get(f"{farm}/v1/jobs/{first}", timeout=30).json()
    record = page.locator("#record")
    for text in ("Time", "Peak VRAM", "VRAM class", "80gb", "Node", job["node"], "Seed", "7",
                 "584 × 440 px · 8 frames · 4 fps · 2.00 s"):
        expect(record).to_contain_text(text)

    # The history lists it with its poster (or a placeholder while the farm has none).
    history = page.get_by_role("list", name="Recent jobs")
    item = history.get_by_role("listitem").filter(has_text=first[:8])
    expect(item).to_contain_text("succeeded")
    assert item.get_by_role("link", name="Download").get_attribute("href") == href
    if requests.get(f"{farm}/v1/jobs/{first}/poster", timeout=30).status_code == 200:
        poster = item.get_by_role("img", name=f"First frame of job {first[:8]}")
        expect(poster).to_be_visible()
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=poster.element_handle())
    else:
        expect(item.get_by_text("no preview")).to_be_visible()

    # A long job: live step i/N with an ETA. One behind it waits in the queue (one worker here)
    # and is canceled from the Output panel; the long one is canceled from the history while it runs.
    page.get_by_label("Steps", exact=True).fill("50")
    page.get_by_role("button", name="Generate").click()
    expect(progress).to_contain_text(re.compile(r"Step \d+ / 50 · .* per step · about .* left"), timeout=90_000)
    second = _job_id_of(page)
    assert second != first
    # The clip forming: the Output panel plays the job's latest live preview (a strip of frames).
    live = page.get_by_role("img", name="Live preview of the video forming")
    expect(live).to_be_visible(timeout=60_000)
    expect(page.locator("#job-preview-text")).to_contain_text(re.compile(r"Live preview at step \d+ / 50"))
    # one frame of the strip at a time: 584x440 output -> 73x55 latents -> 160x121 (preview_max_side 160)
    page.wait_for_function("() => { const c = document.getElementById('job-preview'); "
                           "return c.width === 160 && c.height === 121 }")
    page.get_by_label("Live preview", exact=True).uncheck()  # the job behind it asks for none
    page.get_by_role("button", name="Generate").click()
    expect(progress).to_contain_text("Queued: position 1 in the 80gb queue")
    third = _job_id_of(page)
    assert third not in (first, second)
    expect(history.get_by_role("listitem").filter(has_text=third[:8])).to_contain_text("#1 in queue")
    page.locator("#job-view").get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-status")).to_have_text("canceled")
    running = history.get_by_role("listitem").filter(has_text=second[:8])
    expect(running).to_contain_text("running")
    running.get_by_role("button", name="Cancel").click()
    expect(running).to_contain_text("canceled")
    expect(page.locator("#job-status")).to_have_text("canceled")
    expect(progress).to_contain_text(re.compile(r"Canceled after step \d+ of 50"))
    expect(live).to_be_hidden()  # previews live only while a job runs
    expect(running.get_by_role("button", name="Cancel")).to_be_hidden()
    job = requests.get(f"{farm}/v1/jobs/{second}", timeout=30).json()
    assert job["status"] == "canceled" and job["progress"]["step"] < 50 and job["params"]["preview"] is True, job
    job = requests.get(f"{farm}/v1/jobs/{third}", timeout=30).json()
    assert job["status"] == "canceled" and job["params"]["preview"] is False, job

    # Open the finished job again from the history: its video plays again.
    item.get_by_role("button", name="Open").click()
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#record dd").first).to_have_text(first)
    page.wait_for_function(VIDEO_PLAYING, timeout=30_000)
    assert _video_state(page)["src"].endswith(f"/v1/jobs/{first}/video")
    assert errors == []

    shot = tmp_path / "web-page.png"
    page.screenshot(path=shot, full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    kept = shutil.copy(shot, ARTIFACTS / "web-page.png")
    with capsys.disabled():
        print(f"\nscreenshot of the web page: {kept} (also {shot})")
    page.close()


def test_page_shows_over_capacity_and_failed_jobs_plainly(farm, browser, tmp_path):
    """Answers this one-worker CPU farm does not give on demand (every job fits its 80gb class, its
    backlog is 100, tiny-random does not fail), served to the page in the API's own format."""
    import json

    from playwright.sync_api import expect

    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(farm + "/")
    image = tmp_path / "in.png"
    make_image(320, 240, seed=5).save(image)
    page.get_by_label("Image", exact=True).set_input_files(image)
    page.get_by_label("Prompt", exact=True).fill("Ocean waves crashing on the shore, slow motion")
    alert = page.get_by_role("alert")
    generate = page.get_by_role("button", name="Generate")
    estimate = page.get_by_role("status", name="Estimate")
    expect(estimate).to_contain_text("VRAM class 80gb")

    # No class can hold it: said before submitting, and Generate is off.
    reason = "estimated peak VRAM 20.4 GiB exceeds the largest VRAM class 12gb (12.0 GiB); reduce resolution"
    too_big = {"fits": False, "reason": reason, "vram_class": None, "gpu": None, "vram_bytes": 20 * 2**30,
               "seconds": None, "width": 1176, "height": 880, "num_frames": 32, "fps": 8, "duration_s": 4.0}
    page.route("**/v1/estimate", lambda route: route.fulfill(json=too_big))
    page.get_by_label("High quality", exact=True).check()
    expect(estimate).to_contain_text("Too large for this farm")
    expect(estimate).to_contain_text(reason)
    expect(generate).to_be_disabled()
    page.unroute("**/v1/estimate")
    page.get_by_label("Fast", exact=True).check()
    expect(generate).to_be_enabled()

    # The class's backlog is full: 429 with Retry-After.
    def submit_answer(status, body, headers=None):
        def handle(route):
            if route.request.method != "POST":
                return route.fallback()
            route.fulfill(status=status, headers=headers or {}, content_type="application/json", body=json.dumps(body))
        return handle

    is_submit = re.compile(r"/v1/jobs$")
    full = {"error": {"code": "backlogged", "field": None,
                      "message": "the 80gb queue is full (100 jobs queued, limit 100); retry in about 42 s"}}
    page.route(is_submit, submit_answer(429, full, {"Retry-After": "42"}))
    generate.click()
    expect(alert).to_contain_text("The farm is at capacity")
    expect(alert).to_contain_text("the 80gb queue is full")
    expect(alert).to_contain_text("Try again in about 42 s")
    page.unroute(is_submit)

    # A job that fails on the farm: its reason, in the message area and the Output panel.
    job = {"id": "f" * 32, "status": "queued", "vram_class": "80gb", "node": None, "progress": {"step": 0, "total": 8},
           "params": {"prompt": "Ocean waves", "resolution": "512p", "num_frames": 8, "fps": 8, "seed": 1,
                      "num_inference_steps": 8, "guidance_scale": 9.0, "scheduler": "ddim"},
           "estimate": {"vram_bytes": 6 * 2**30, "seconds": 3.0}, "created_at": "2026-01-01T00:00:00Z"}
    failed = {**job, "status": "failed", "progress": {"step": 3, "total": 8},
              "error": {"code": "out_of_memory", "message": "out of GPU memory on 80gb after 3 attempts"}}
    page.route(is_submit, submit_answer(202, job))
    page.route(f"**/v1/jobs/{job['id']}", lambda route: route.fulfill(json=failed))
    generate.click()
    expect(alert).to_contain_text("The job failed")
    expect(alert).to_contain_text("out of GPU memory on 80gb after 3 attempts")
    expect(page.locator("#job-status")).to_have_text("failed")
    page.close()
