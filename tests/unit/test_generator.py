"""The generation loop on the tiny-random model (CPU), against diffusers' own pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import GenerationCanceled
from pipeline.generator import Generator, MemoryOptions
from pipeline.request import parse_params
from tests.helpers import make_image

SIZE = (64, 48)  # small, non-square, multiple of 8


@pytest.fixture(scope="module")
def generator(tiny_model):
    return Generator(tiny_model, MemoryOptions(decode_chunk_size=3))


def params(**overrides):
    fields = dict(prompt="A cat turning its head to the left", num_frames=8, num_inference_steps=3, seed=1234)
    fields.update(overrides)
    return parse_params(fields)


def penultimate_embedding(pipe, text: str) -> torch.Tensor:
    """Reference: CLIP hidden state of the second-to-last layer through the final layer norm,
    computed straight from transformers (what diffusers' clip_skip=1 means)."""
    ids = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    return pipe.text_encoder.final_layer_norm(hidden[-2])


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_output_matches_diffusers_pipeline(generator, tiny_model, guidance_scale):
    image = make_image(96, 80, seed=3)
    p = params(negative_prompt="blurry, static", guidance_scale=guidance_scale, target_fps=12)
    ours = generator.generate(image, p, size=SIZE)

    pipe = tiny_model.pipe
    with torch.inference_mode():
        prompt_embeds = penultimate_embedding(pipe, p.prompt)
        negative_embeds = penultimate_embedding(pipe, p.negative_prompt)
        torch.manual_seed(p.seed)  # the stock pipeline samples the image posterior from the global RNG
        reference = pipe(
            image=image,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            width=SIZE[0],
            height=SIZE[1],
            target_fps=12,
            num_frames=8,
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            decode_chunk_size=3,
            output_type="np",
        ).frames[0]
    reference = (reference * 255).round()
    assert ours.frames.shape == reference.shape == (8, SIZE[1], SIZE[0], 3)
    diff = np.abs(ours.frames.astype(np.float64) - reference)
    assert diff.max() <= 1.0, f"max pixel difference {diff.max()}"
    assert diff.mean() < 0.01
    # and the frames are not trivially constant (the comparison would then prove nothing)
    assert ours.frames.std() > 1.0


def test_text_embedding_is_penultimate_layer(generator, tiny_model):
    with torch.inference_mode():
        ours = generator.encode_text("Ocean waves crashing on the shore")
        reference = penultimate_embedding(tiny_model.pipe, "Ocean waves crashing on the shore")
        last = tiny_model.pipe.text_encoder(
            tiny_model.pipe.tokenizer(["Ocean waves crashing on the shore"], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids
        ).last_hidden_state
    assert ours.shape == (1, 77, tiny_model.pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(ours, reference)
    assert not torch.allclose(ours, last), "must not be the last layer's output"


def test_same_seed_same_video_other_seed_other_video(generator):
    image = make_image(seed=5)
    a = generator.generate(image, params(seed=7), size=SIZE).frames
    b = generator.generate(image, params(seed=7), size=SIZE).frames
    c = generator.generate(image, params(seed=8), size=SIZE).frames
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 0.5


def test_seed_is_chosen_and_reported_when_missing(generator):
    result = generator.generate(make_image(), params(seed=None), size=SIZE)
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**32


def test_progress_reports_every_step(generator):
    seen = []
    generator.generate(make_image(), params(num_inference_steps=4), size=SIZE, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_between_steps(generator):
    seen = []
    with pytest.raises(GenerationCanceled):
        generator.generate(
            make_image(), params(num_inference_steps=6), size=SIZE,
            progress=lambda i, n: seen.append(i), cancel=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc"])
def test_other_schedulers_run(generator, scheduler):
    result = generator.generate(make_image(), params(scheduler=scheduler, num_inference_steps=3), size=SIZE)
    assert result.frames.shape == (8, SIZE[1], SIZE[0], 3)
    assert result.frames.dtype == np.uint8


def test_timings_and_peak_memory_recorded(generator):
    result = generator.generate(make_image(), params(), size=SIZE)
    assert set(result.timings) == {"conditioning", "denoise", "decode"}
    assert all(v > 0 for v in result.timings.values())
    assert result.peak_memory_kind == "process_peak_rss"
    assert result.peak_memory_bytes > 50 * 2**20


def test_resolution_preset_sets_output_size(generator):
    # 512p of a 2:1 image keeps the aspect: width x height <= 512^2, multiples of 8
    result = generator.generate(make_image(200, 100), params(num_frames=8, num_inference_steps=1))
    assert (result.width, result.height) == (720, 360)
    assert result.frames.shape == (8, 360, 720, 3)


# --- speed levers (MemoryOptions; off by default, see docs/benchmarks.md) ----------------------
# Each lever changes the loaded model in place, so every test here loads its own copy.

LEVER_SIZE = (64, 64)


def _fresh_generator(tiny_model, **options):
    from pipeline.loading import load_model

    del tiny_model  # (the fixture built and saved the model once; this loads another copy)
    return Generator(load_model("tiny-random", device="cpu"), MemoryOptions(**options))


@pytest.fixture(scope="module")
def baseline_frames(tiny_model):
    gen = _fresh_generator(tiny_model)
    return gen.generate(make_image(seed=2), params(num_inference_steps=10), size=LEVER_SIZE).frames


def _diff(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_defaults_leave_every_lever_off():
    o = MemoryOptions()
    assert (o.channels_last, o.fuse_qkv, o.compile, o.attention_cache, o.group_norm) == (False, False, False, 0,
                                                                                         "native")


def test_channels_last_puts_conv_weights_in_nhwc_and_keeps_the_video(tiny_model, baseline_frames):
    gen = _fresh_generator(tiny_model, channels_last=True)
    convs = [m for m in (*gen.pipe.unet.modules(), *gen.pipe.vae.modules()) if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert any(not c.weight.is_contiguous() for c in convs)  # really NHWC, not 1x1 kernels only
    frames = gen.generate(make_image(seed=2), params(num_inference_steps=10), size=LEVER_SIZE).frames
    assert _diff(frames, baseline_frames).max() <= 1


def test_fuse_qkv_fuses_every_attention_and_keeps_the_video(tiny_model, baseline_frames):
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    gen = _fresh_generator(tiny_model, fuse_qkv=True)
    attentions = [m for m in gen.pipe.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(a.fused_projections for a in attentions)
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in gen.pipe.unet.attn_processors.values())
    frames = gen.generate(make_image(seed=2), params(num_inference_steps=10), size=LEVER_SIZE).frames
    assert _diff(frames, baseline_frames).max() <= 1


def test_split_group_norm_patches_every_group_norm_and_keeps_the_video(tiny_model, baseline_frames):
    gen = _fresh_generator(tiny_model, group_norm="split")
    norms = [m for m in (*gen.pipe.unet.modules(), *gen.pipe.vae.modules()) if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(getattr(m, "_i2v_split", False) for m in norms)
    frames = gen.generate(make_image(seed=2), params(num_inference_steps=10), size=LEVER_SIZE).frames
    assert _diff(frames, baseline_frames).max() <= 1


def test_group_norm_option_is_checked(tiny_model):
    with pytest.raises(ValueError, match="group_norm"):
        _fresh_generator(tiny_model, group_norm="fast")


def test_fuse_qkv_needs_sdpa(tiny_model):
    with pytest.raises(ValueError, match="sdpa"):
        _fresh_generator(tiny_model, fuse_qkv=True, attention="xformers")


def test_attention_cache_needs_a_skip_range_of_two_or_more(tiny_model):
    with pytest.raises(ValueError, match="attention_cache"):
        _fresh_generator(tiny_model, attention_cache=1)


class _CountingProcessor:
    """Wraps an attention processor and records the timestep of each call (a skipped attention
    never calls its processor)."""

    def __init__(self, inner, gen):
        self.inner, self.gen, self.timesteps = inner, gen, []

    @property
    def calls(self) -> int:
        return len(self.timesteps)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        self.timesteps.append(self.gen._timestep)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _count_spatial_self_attention(gen):
    counters = []
    for name, module in gen.pipe.unet.named_modules():
        if name.endswith("attn1") and ".attentions." in f".{name}" and "temp_" not in name:
            module.processor = _CountingProcessor(module.processor, gen)
            counters.append(module.processor)
    return counters


def test_attention_cache_skips_spatial_attention_inside_its_timestep_range(tiny_model, baseline_frames):
    gen = _fresh_generator(tiny_model, attention_cache=3)
    counters = _count_spatial_self_attention(gen)
    assert len(counters) == 4  # down, mid and two up spatial transformers of the tiny UNet
    image, p = make_image(seed=2), params(num_inference_steps=10)
    # DDIM 10 steps ("leading"): t = 901, 801, 701, ..., 1; inside (100, 800): 701 ... 101, 7 steps.
    # Call i computes when i == 0, outside the range, or i % 3 == 0: i = 0, 1, 3, 6, 9 -> 5 of 10.
    first = gen.generate(image, p, size=LEVER_SIZE).frames
    assert [c.timesteps for c in counters] == [[901, 801, 601, 301, 1]] * 4
    # The next job starts afresh (a stale step count would compute 7 times; a stale output of
    # another job would change the video).
    second = gen.generate(image, p, size=LEVER_SIZE).frames
    assert [c.calls for c in counters] == [10] * 4
    np.testing.assert_array_equal(first, second)
    # It is an approximation: the video changes, a little.
    diff = _diff(first, baseline_frames)
    assert diff.max() >= 1 and diff.mean() < 2.0


def test_attention_cache_leaves_temporal_and_cross_attention_alone(tiny_model):
    gen = _fresh_generator(tiny_model, attention_cache=2)
    hooked = sorted(name for name, m in gen.pipe.unet.named_modules() if hasattr(m, "_diffusers_hook")
                    and m is not gen.pipe.unet)
    assert hooked and all(n.endswith("attn1") and "temp_attentions" not in n and "transformer_in" not in n
                          for n in hooked)


def test_options_are_recorded_in_the_parameter_record(tiny_model, tmp_path):
    from pipeline.render import render

    gen = _fresh_generator(tiny_model, channels_last=True, attention_cache=2)
    out = render(gen, make_image(seed=2), params(num_inference_steps=2), tmp_path, size=LEVER_SIZE)
    recorded = out.record["memory_options"]
    assert recorded["channels_last"] is True and recorded["attention_cache"] == 2
    import json

    json.loads(out.params_path.read_text())  # still valid JSON


def test_warm_up_runs_one_step_of_the_shape(tiny_model):
    gen = _fresh_generator(tiny_model)
    seen = []
    original = gen.generate

    def spy(image, p, **kw):
        seen.append((p.num_inference_steps, kw.get("size")))
        return original(image, p, **kw)

    gen.generate = spy
    assert gen.warm_up(make_image(), params(num_inference_steps=30), size=LEVER_SIZE) > 0
    assert seen == [(1, LEVER_SIZE)]
