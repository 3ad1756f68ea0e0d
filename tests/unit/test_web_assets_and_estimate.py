"""What the web page asks before submitting (`/v1/info`, `/v1/estimate` as functions, no Ray),
and the page's own files: shipped with the package, no external resources."""

from __future__ import annotations

import re

import pytest

from pipeline.errors import InvalidRequest
from pipeline.request import PRESETS, PROMPT_EXAMPLES, output_size
from serving.config import FarmSettings
from serving.info import WEB_DIR, estimate_request, farm_info, model_kind


def settings(**kw) -> FarmSettings:
    return FarmSettings(workers={"12gb": {"max_replicas": 1}, "24gb": {"max_replicas": 1}}, **kw)


def test_info_names_the_model_and_says_tiny_random_output_is_noise():
    info = farm_info(settings())
    assert info["model"] == "tiny-random" and info["model_kind"] == "tiny-random"
    assert "noise" in info["note"]
    assert any("--model" in c for c in info["real_weights"]["commands"])
    assert "sim_time_scale" in farm_info(settings(model="sim"))["estimate_note"]
    assert "placeholder" in farm_info(settings(model="sim"))["note"]
    real = farm_info(settings(model="/models/i2vgen-xl"))
    assert real["model_kind"] == "i2vgen-xl" and real["note"] is None and real["real_weights"] is None
    assert model_kind("ali-vilab/i2vgen-xl") == "i2vgen-xl"


def test_info_carries_presets_ranges_tips_and_the_active_classes():
    info = farm_info(settings())
    assert info["presets"] == PRESETS and info["default_preset"] == "standard"
    assert info["prompt_examples"] == list(PROMPT_EXAMPLES)
    assert "A person walking forward naturally" in info["prompt_examples"]
    f = info["fields"]
    assert (f["num_frames"]["minimum"], f["num_frames"]["maximum"], f["num_frames"]["default"]) == (8, 32, 16)
    assert (f["seed"]["type"], f["seed"]["minimum"], f["seed"]["maximum"]) == ("integer", 0, 2**32 - 1)
    assert f["resolution"]["enum"] == ["512p", "768p", "1024p"] and f["prompt"]["required"]
    assert not f["guidance_scale"]["required"]
    assert [c["name"] for c in info["classes"]] == ["12gb", "24gb"]
    assert info["image"]["min_side"] == 64 and info["image"]["max_bytes"] == 20 * 2**20
    assert any("10-12" in t for t in info["tuning_tips"])


def test_estimate_picks_the_smallest_active_class_like_submission():
    est = estimate_request(settings(), {"preset": "fast", "width": 1600, "height": 900})
    assert est["fits"] and est["reason"] is None
    assert est["vram_class"] == "12gb" and est["gpu"] == "rtx3060-12gb"
    assert (est["width"], est["height"]) == output_size("512p", 1600, 900) == (680, 384)
    assert est["seconds"] > 0 and est["vram_bytes"] > 0
    assert (est["num_frames"], est["fps"], est["duration_s"]) == (8, 8, 1.0)
    assert est["params"]["num_inference_steps"] == 30  # the preset filled it in
    # 768p x 32 frames (~13.7 GiB) needs the 24gb class
    assert estimate_request(settings(), {"resolution": "768p", "num_frames": 32})["vram_class"] == "24gb"


def test_estimate_without_image_size_assumes_a_square_and_needs_no_prompt():
    est = estimate_request(settings(), {"resolution": "768p"})
    assert (est["width"], est["height"]) == (768, 768)


def test_a_job_no_class_holds_does_not_fit_and_says_why():
    only_12 = FarmSettings(workers={"12gb": {"max_replicas": 1}})
    est = estimate_request(only_12, {"resolution": "1024p", "num_frames": 16})
    assert est["fits"] is False and est["vram_class"] is None and est["seconds"] is None
    assert "12gb (12.0 GiB)" in est["reason"] and est["vram_bytes"] > 12 * 2**30


@pytest.mark.parametrize("data, field", [
    ({"num_frames": 99}, "num_frames"),
    ({"width": 0, "height": 10}, "width"),
    ({"width": 100, "height": "tall"}, "height"),
    ({"colour": "red"}, "colour"),
])
def test_estimate_refuses_bad_fields_naming_them(data, field):
    with pytest.raises(InvalidRequest) as err:
        estimate_request(settings(), data)
    assert err.value.field == field


def test_page_files_ship_and_load_nothing_from_elsewhere():
    names = {p.name for p in WEB_DIR.iterdir()}
    assert {"index.html", "app.js", "style.css"} <= names
    for path in WEB_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{path.name} loads a remote resource"
    html = (WEB_DIR / "index.html").read_text()
    assert 'src="ui/app.js"' in html and 'href="ui/style.css"' in html
    for label_for in re.findall(r'<label for="([^"]+)"', html):
        assert f'id="{label_for}"' in html, f"label for a missing control: {label_for}"


def _page_fields(elements: dict) -> dict:
    """Run the page's own `fields()` (app.js: what the form sends to POST /v1/jobs and /v1/estimate)
    in node, with the form's controls as `elements` (id -> {value} or {checked})."""
    import json
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    js = (WEB_DIR / "app.js").read_text()
    source = re.search(r"\n  function fields\(\) \{\n.*?\n  \}\n", js, re.S).group(0)
    consts = "\n".join(re.findall(r"^  const (?:NUMBER|SELECT)_FIELDS = \[.*\];$", js, re.M))
    script = (f"{consts}\nconst els = {json.dumps(elements)};\nconst $ = (id) => els[id];\n"
              "const document = { querySelector: () => null };\n"
              f"{source}\nprocess.stdout.write(JSON.stringify(fields()));\n")
    done = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_live_preview_checkbox_is_on_by_default_and_off_sends_preview_false():
    html = (WEB_DIR / "index.html").read_text()
    form = html[html.index('<form id="job-form"'):]
    form = form[:form.index("</form>")]
    box = re.search(r"<input [^>]*id=\"live_preview\"[^>]*>", form).group(0)
    assert 'type="checkbox"' in box and " checked" in box and '<label for="live_preview">Live preview</label>' in form
    controls = {"prompt": {"value": " a cat "}, "negative_prompt": {"value": ""}, "lora": {"value": ""},
                "resolution": {"value": "512p"}, "scheduler": {"value": "ddim"}, "priority": {"value": "normal"},
                "num_frames": {"value": "8"}, "fps": {"value": ""}, "num_inference_steps": {"value": "2"},
                "guidance_scale": {"value": ""}, "seed": {"value": ""}, "target_fps": {"value": ""}}
    on = _page_fields({**controls, "live_preview": {"checked": True}})
    assert on == {"prompt": "a cat", "resolution": "512p", "scheduler": "ddim", "priority": "normal",
                  "num_frames": 8, "num_inference_steps": 2}  # previews on: the farm's default, not sent
    off = _page_fields({**controls, "live_preview": {"checked": False}})
    assert off == {**on, "preview": False}
    # submit() sends every one of fields() in the form (FormData: "false", which the farm reads as false)
    assert re.search(r"const values = fields\(\);.*for \(const \[key, value\] of Object\.entries\(values\)\) "
                     r"form\.append\(key, String\(value\)\)", (WEB_DIR / "app.js").read_text(), re.S)
