"""The request schema: presets, ranges, types, and the resolution -> size mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import InvalidRequest
from pipeline.request import PRESETS, output_size, parse_params


def test_defaults_are_the_standard_preset():
    p = parse_params({"prompt": "A person walking forward naturally"})
    assert (p.resolution, p.num_frames, p.num_inference_steps, p.guidance_scale, p.fps) == ("512p", 16, 50, 9.0, 8)
    assert p.target_fps == 16 and p.scheduler == "ddim" and p.seed is None


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("fast", ("512p", 8, 30)),
        ("standard", ("512p", 16, 50)),
        ("high", ("768p", 24, 80)),
    ],
)
def test_presets(preset, expected):
    p = parse_params({"prompt": "x", "preset": preset})
    assert (p.resolution, p.num_frames, p.num_inference_steps) == expected
    assert p.guidance_scale == 9.0 and p.fps == 8


def test_explicit_fields_override_the_preset():
    p = parse_params({"prompt": "x", "preset": "high", "num_frames": 12, "resolution": "512p"})
    assert (p.resolution, p.num_frames, p.num_inference_steps) == ("512p", 12, 80)


def test_form_strings_are_coerced():
    p = parse_params({"prompt": "x", "num_frames": "24", "guidance_scale": "10.5", "seed": "42"})
    assert (p.num_frames, p.guidance_scale, p.seed) == (24, 10.5, 42)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("num_frames", 7, "between 8 and 32"),
        ("num_frames", 33, "between 8 and 32"),
        ("num_frames", "many", "whole number"),
        ("num_frames", 16.5, "whole number"),
        ("num_inference_steps", 0, "between 1 and 200"),
        ("guidance_scale", 31, "between 1.0 and 30.0"),
        ("guidance_scale", "high", "number"),
        ("fps", 0, "between 1 and 60"),
        ("target_fps", 61, "between 1 and 60"),
        ("seed", -1, "between 0 and"),
        ("seed", 2**40, "between 0 and"),
        ("resolution", "720p", "512p"),
        ("preset", "ultra", "fast"),
        ("scheduler", "euler", "ddim"),
        ("prompt", "   ", "blank"),
        ("prompt", "a" * 2001, "characters"),
        ("prompt", "bell\x07", "control characters"),
        ("num_frame", 16, "unknown field"),
    ],
)
def test_bad_values_name_the_field(field, value, words):
    data = {"prompt": "A cat turning its head", field: value}
    with pytest.raises(InvalidRequest) as info:
        parse_params(data)
    err = info.value
    assert err.field == field
    assert words in err.message, err.message
    assert err.http_status == 422
    assert err.to_dict()["field"] == field


def test_prompt_is_required():
    with pytest.raises(InvalidRequest) as info:
        parse_params({"num_frames": 16})
    assert info.value.field == "prompt" and "required" in info.value.message


def test_with_seed_picks_and_keeps_one():
    p = parse_params({"prompt": "x"})
    seeded = p.with_seed()
    assert seeded.seed is not None and seeded.with_seed().seed == seeded.seed
    assert parse_params({"prompt": "x", "seed": 5}).with_seed().seed == 5


@pytest.mark.parametrize(
    "resolution, size, expected",
    [
        ("512p", (1000, 1000), (512, 512)),
        ("512p", (1920, 1080), (680, 384)),
        ("512p", (1080, 1920), (384, 680)),
        ("768p", (800, 800), (768, 768)),
        ("1024p", (1280, 720), (1360, 768)),
    ],
)
def test_output_size_examples(resolution, size, expected):
    assert output_size(resolution, *size) == expected


@settings(max_examples=300, deadline=None)
@given(
    resolution=st.sampled_from(["512p", "768p", "1024p"]),
    width=st.integers(64, 8000),
    height=st.integers(64, 8000),
)
def test_output_size_properties(resolution, width, height):
    if max(width, height) / min(width, height) > 4:
        return  # refused at image validation
    n = int(resolution[:-1])
    w, h = output_size(resolution, width, height)
    assert w % 8 == 0 and h % 8 == 0
    assert w * h <= n * n
    assert w * h >= 0.9 * n * n * 0.9  # close to the budget
    assert abs(w / h - width / height) / (width / height) < 0.1  # aspect kept


def test_every_preset_validates():
    for name in PRESETS:
        assert parse_params({"prompt": "x", "preset": name}).preset == name
