"""Live previews (pipeline/preview.py): the latent -> RGB map, the strip, when one is due, and the
generation loop with and without them (tiny-random on the CPU)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

from pipeline.generator import Generator, MemoryOptions
from pipeline.preview import (
    LATENT_RGB_FACTORS,
    MAX_FRAMES,
    LivePreview,
    frame_count,
    latents_to_rgb,
    pick_frames,
    predict_x0,
    preview_strip,
)
from pipeline.request import parse_params
from tests.helpers import make_image

SIZE = (64, 48)


def _jpeg(data: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image


# --- the map and the strip ------------------------------------------------------------------


def test_latent_map_is_the_sd_coefficients_per_pixel():
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.normal(0, 1, (3, 4, 5, 7)).astype(np.float32))
    rgb = latents_to_rgb(latents)
    assert rgb.shape == (3, 5, 7, 3) and rgb.dtype == np.uint8
    # one pixel by hand: RGB = latent . factors, then (x + 1) / 2 in [0, 1], * 255
    f, y, x = 2, 3, 4
    expected = np.asarray(LATENT_RGB_FACTORS).T @ latents[f, :, y, x].numpy()
    expected = np.round(np.clip((expected + 1) / 2, 0, 1) * 255)
    assert np.abs(rgb[f, y, x].astype(int) - expected).max() <= 1
    # a latent of all zeros is mid grey; the 4th channel pushes blue down hardest
    zero = latents_to_rgb(torch.zeros(1, 4, 2, 2))
    assert (zero == 128).all()
    blueish = latents_to_rgb(torch.tensor([0, 0, 0, 1.0]).reshape(1, 4, 1, 1))[0, 0, 0]
    assert blueish[2] < blueish[0] < 128


@pytest.mark.parametrize("num_frames, expected", [(16, [0, 2, 4, 6, 9, 11, 13, 15]), (8, list(range(8))),
                                                  (3, [0, 1, 2]), (1, [0])])
def test_frames_are_spread_over_the_clip(num_frames, expected):
    assert pick_frames(num_frames) == expected
    assert frame_count(num_frames) == len(expected) <= MAX_FRAMES


@pytest.mark.parametrize("frames, h, w, max_side, frame_hw", [
    (16, 64, 64, 160, (160, 160)),  # 512p x 16: 8 frames of 160 x 160
    (8, 48, 85, 160, (90, 160)),  # 16:9 (680x384 at 512p): the longest side is max_side
    (4, 85, 48, 64, (64, 36)),  # 9:16, fewer frames than MAX_FRAMES
])
def test_strip_size(frames, h, w, max_side, frame_hw):
    x0 = torch.randn(frames, 4, h, w)
    image = _jpeg(preview_strip(x0, max_side=max_side))
    n = frame_count(frames)
    assert image.size == (n * frame_hw[1], frame_hw[0])
    assert max(frame_hw) == max_side


def test_strip_reads_a_clip_shaped_tensor_too():
    clip = torch.randn(1, 4, 16, 8, 8)  # (batch, channels, frames, h, w), as the UNet sees it
    assert preview_strip(clip, max_side=32) == preview_strip(clip[0].permute(1, 0, 2, 3), max_side=32)


def test_x0_from_the_model_output_matches_ddim_for_v_and_epsilon():
    from diffusers import DDIMScheduler

    for kind in ("v_prediction", "epsilon"):
        scheduler = DDIMScheduler(prediction_type=kind, clip_sample=False)
        scheduler.set_timesteps(10)
        t = scheduler.timesteps[3]
        sample, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        ddim = scheduler.step(out, t, sample).pred_original_sample
        torch.testing.assert_close(predict_x0(scheduler, sample, out, t), ddim, rtol=1e-4, atol=1e-4)


# --- when a preview is due ------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_previews_come_every_interval():
    clock, got = Clock(), []
    live = LivePreview(lambda *a: got.append(a), interval_s=1.0, max_side=16, clock=clock)
    live.start()
    x0 = torch.zeros(2, 4, 4, 4)
    sent = []
    for step in range(1, 11):  # 0.4 s per step: previews after steps 3, 6, 9 (1.2 s apart)
        clock.now += 0.4
        if live.due():
            live.emit(step, 10, x0)
            sent.append(step)
    assert sent == [3, 6, 9]
    assert [(s, t) for s, t, _, _ in got] == [(3, 10), (6, 10), (9, 10)]
    assert all(_jpeg(image).size == (32, 16) and seconds >= 0 for _, _, image, seconds in got)
    assert live.count == 3 and live.seconds == pytest.approx(sum(g[3] for g in got))


def test_x0_is_computed_only_when_due():
    clock = Clock()
    live = LivePreview(lambda *a: None, interval_s=0.5, clock=clock)
    calls = []
    assert not live.due()  # nothing before the interval
    clock.now += 0.5
    live.emit(1, 2, lambda: calls.append(1) or torch.zeros(1, 4, 2, 2))
    assert calls == [1]


def test_an_interval_of_zero_is_refused():
    with pytest.raises(ValueError, match="no previews"):
        LivePreview(lambda *a: None, interval_s=0)


# --- the generation loop (tiny-random) ------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_model):
    return Generator(tiny_model, MemoryOptions(decode_chunk_size=4))


def _params(**overrides):
    return parse_params({"prompt": "waves", "num_frames": 8, "num_inference_steps": 4, "seed": 11, **overrides})


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_previews_do_not_change_the_video(generator, scheduler):
    image = make_image(96, 80, seed=2)
    got = []
    with_previews = generator.generate(image, _params(scheduler=scheduler), size=SIZE,
                                       preview=lambda *a: got.append(a), preview_interval_s=1e-9, preview_max_side=40)
    plain = generator.generate(image, _params(scheduler=scheduler), size=SIZE)
    np.testing.assert_array_equal(with_previews.frames, plain.frames)
    # a preview after every step (the interval is tiny), each the strip of the clip at that step
    assert [(s, t) for s, t, _, _ in got] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for _, _, data, _ in got:
        assert _jpeg(data).size == (8 * 40, 30)  # 8 frames of 64x48 output (8x6 latents) -> 40x30
    assert len({data for _, _, data, _ in got}) > 1  # the picture changes as it denoises
    assert "preview" in with_previews.timings and "preview" not in plain.timings


def test_no_callback_when_off(generator):
    image = make_image(96, 80, seed=2)
    called = []
    generator.generate(image, _params(), size=SIZE, preview=lambda *a: called.append(a), preview_interval_s=0)
    assert called == []
    # an interval longer than the job: never due
    generator.generate(image, _params(), size=SIZE, preview=lambda *a: called.append(a), preview_interval_s=1e9)
    assert called == []


def test_preview_field_defaults_on_and_does_not_change_the_seed():
    on, off = _params(), _params(preview=False)
    assert on.preview is True and off.preview is False
    assert on.with_seed().seed == off.with_seed().seed == 11
    assert parse_params({"prompt": "x", "preview": "false"}).preview is False  # a form field
    with pytest.raises(Exception, match="'preview' must be true or false"):
        parse_params({"prompt": "x", "preview": "sometimes"})
