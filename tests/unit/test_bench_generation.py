"""`bench.generation`: its quality metrics and table pieces, the bench-only levers, and a tiny run (slow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.generation import (
    frame_quality,
    levers,
    median,
    parse_ints,
    parse_size,
    psnr,
    spread,
    ssim,
    table,
)


def _image(seed=0, shape=(32, 40, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def test_psnr_of_identical_images_is_infinite_and_of_a_known_error_exact():
    a = _image()
    assert psnr(a, a) == math.inf
    b = a.astype(np.float64) + 5.0  # MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))


def test_psnr_refuses_different_shapes():
    with pytest.raises(ValueError, match="shapes"):
        psnr(_image(shape=(16, 16)), _image(shape=(16, 17)))


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = _image(shape=(48, 48))
    assert ssim(a, a) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255) for s in (5, 20, 60)]
    scores = [ssim(a, n) for n in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    assert ssim(a, noisy[1]) == pytest.approx(ssim(noisy[1], a))  # symmetric


def test_ssim_of_two_flat_images_matches_the_closed_form():
    # Flat images: no variance, no covariance; SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 255) ** 2
    a, b = np.full((20, 20), 100.0), np.full((20, 20), 140.0)
    assert ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1))


def test_ssim_averages_colour_channels_and_needs_a_window_sized_image():
    a = _image(shape=(24, 24, 3))
    b = a.copy()
    b[..., 0] = 255 - b[..., 0]
    per_channel = [ssim(a[..., c], b[..., c]) for c in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(per_channel))
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((8, 30)), np.zeros((8, 30)))


def test_frame_quality_reports_mean_and_worst_frame():
    ref = np.stack([_image(i, (24, 24, 3)) for i in range(3)])
    out = ref.copy()
    out[2] = np.clip(out[2].astype(int) + 9, 0, 255).astype(np.uint8)  # only the last frame differs
    q = frame_quality(out, ref)
    assert q["psnr_min"] == pytest.approx(psnr(out[2], ref[2]))
    assert q["psnr_mean"] == math.inf  # two identical frames
    assert q["ssim_min"] < 1.0 and q["max_diff"] == 9


def test_median_and_spread():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert spread([5.0]) == 0.0


def test_argument_parsers():
    assert parse_size("320x256") == (320, 256)
    assert parse_ints("10,20, 25") == [10, 20, 25]
    import argparse

    for bad in ("320", "321x256", "32x32"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ints("10,0")


def test_table_aligns_columns():
    text = table(["name", "n", "what"], [["a", "1", "left"], ["bbb", "22", "x"]], left=(0, 2))
    lines = text.splitlines()
    assert lines[0] == "name   n  what"
    assert lines[2] == "a      1  left"
    assert lines[3] == "bbb   22  x"


def test_lever_rows_each_alone_then_together():
    names = [lv.name for lv in levers(8, with_compile=False)]
    assert names[0] == "baseline" and names[-2:] == ["exact levers together", "all together"]
    assert "compile" not in names and "compile" in [lv.name for lv in levers(8, with_compile=True)]
    rows = {lv.name: lv for lv in levers(8, with_compile=False)}
    assert rows["decode_chunk_size=8"].options == {"decode_chunk_size": 8}
    assert not rows["attention_cache=2"].exact and rows["channels_last"].exact
    # every option a row sets is a MemoryOptions field
    from pipeline.generator import MemoryOptions

    fields = set(MemoryOptions.__dataclass_fields__)
    assert all(set(lv.options) <= fields for lv in levers(8, with_compile=True))


def test_split_cfg_computes_the_same_video_in_two_unet_calls(tiny_model):
    from bench.generation import Lever, job_params, make_generator, split_cfg
    from tests.helpers import make_image

    gen = make_generator(Lever("baseline"))
    image, p = make_image(seed=4), job_params(8, 2)
    batched = gen.generate(image, p, size=(64, 64)).frames
    batches = []
    forward = gen.pipe.unet.forward

    def counted(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    gen.pipe.unet.forward = counted
    split_cfg(gen)  # wraps the (counted) forward
    split = gen.generate(image, p, size=(64, 64)).frames
    assert np.abs(batched.astype(int) - split.astype(int)).max() <= 1
    assert batches == [1, 1, 1, 1]  # two UNet calls of batch 1 per step, 2 steps


def test_stock_pipeline_computes_our_video(tiny_model):
    from bench.generation import job_params, run_ours, run_stock
    from pipeline.generator import Generator
    from tests.helpers import make_image

    gen = Generator(tiny_model)
    image, p = make_image(seed=4), job_params(8, 2)
    ours = run_ours(gen, image, p, (64, 48))
    stock = run_stock(tiny_model.pipe, image, p, (64, 48), gen.options.decode_chunk_size)
    assert ours.frames.shape == stock.frames.shape == (8, 48, 64, 3)
    assert np.abs(ours.frames.astype(int) - stock.frames.astype(int)).max() <= 1


@pytest.mark.slow
def test_bench_runs_end_to_end_on_a_tiny_job(tmp_path, capsys, tiny_model):
    import json

    from bench.generation import main

    out = main(["--size", "64x64", "--frames", "8", "--steps", "2", "--repeat", "1", "--reference-steps", "4",
                "--solver-steps", "2", "--levers", "channels_last,attention_cache=2", "--json",
                str(tmp_path / "gen.json")])
    text = capsys.readouterr().out
    assert "stock/ours" in text and "x base" in text and "PSNR mean" in text
    assert [r["lever"] for r in out["levers"]] == ["baseline", "channels_last", "attention_cache=2"]
    assert out["ours_vs_stock"]["max_diff"] <= 1
    assert out["solvers"][0]["psnr_mean"] == float("inf")  # the reference against itself
    assert json.loads((tmp_path / "gen.json").read_text())["levers"][1]["max_diff"] <= 1
