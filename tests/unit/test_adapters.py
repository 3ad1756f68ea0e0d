"""LoRA adapters on the tiny-random UNet (CPU): checked against the UNet's layers, applied per job
with PEFT, base weights exactly restored, adapters kept in an LRU bounded by bytes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.adapters import (
    AdapterCache,
    AdapterError,
    AdapterLRU,
    adapter_set_id,
    check_lora,
    lora_bytes,
    meta_unet,
    random_lora,
    read_lora,
    sha256_hex,
)
from pipeline.generator import Generator, MemoryOptions
from pipeline.loading import load_model
from pipeline.request import parse_params
from tests.helpers import make_image

SIZE = (32, 32)


def params(**overrides):
    fields = dict(prompt="waves rolling in", num_frames=8, num_inference_steps=2, seed=7, guidance_scale=3.0)
    fields.update(overrides)
    return parse_params(fields)


@pytest.fixture(scope="module")
def loras(tiny_model):
    unet = tiny_model.pipe.unet
    return {
        "a": lora_bytes(random_lora(unet, rank=4, seed=1, std=0.3), {"lora_alpha": "4"}),
        "b": lora_bytes(random_lora(unet, rank=2, seed=2, std=0.3, targets=("to_k", "to_v", "proj_in"))),
    }


def fresh_generator() -> Generator:
    return Generator(load_model("tiny-random", device="cpu"), MemoryOptions())


def reference(data: bytes, scale: float, p, image) -> np.ndarray:
    """A fresh model with the LoRA applied by hand with PEFT (the reference the farm must equal)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    gen = fresh_generator()
    unet = gen.pipe.unet
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    state, meta = read_lora(data)
    info = check_lora(state, unet, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(LoraConfig(r=info.rank, lora_alpha=info.alpha, init_lora_weights=False,
                                           target_modules=list(info.target_modules)), unet, adapter_name="ref")
        set_peft_model_state_dict(unet, state, adapter_name="ref")
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in unet.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_scale("ref", scale)
    for name, param in unet.named_parameters():  # as loaded (see pipeline/adapters.py: PEFT freezes them)
        base = name.replace(".base_layer.", ".")
        if base in grads:
            param.requires_grad_(grads[base])
    return gen.generate(image, p, size=SIZE).frames


def test_check_lora_accepts_a_fitting_lora_and_reports_rank_and_targets(tiny_model, loras):
    state, meta = read_lora(loras["a"])
    info = check_lora(state, meta_unet("tiny-random"), meta)
    assert info.rank == 4 and info.alpha == 4.0
    assert all(t.endswith(("to_q", "to_k", "to_v", "to_out.0")) for t in info.target_modules)
    assert info.parameters == sum(t.numel() for t in state.values())


def test_check_lora_refuses_what_does_not_fit(tiny_model):
    tiny = meta_unet("tiny-random")
    full = meta_unet("sim")  # the full-size architecture, on the meta device
    with pytest.raises(AdapterError, match="do not fit"):  # a full-size LoRA on the tiny UNet
        state = random_lora(full, rank=2, targets=("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",))
        check_lora(state, tiny)
    state = random_lora(tiny_model.pipe.unet, rank=2)
    bogus = {**state, "no_such_block.to_q.lora_A.weight": torch.zeros(2, 8),
             "no_such_block.to_q.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(AdapterError, match="no layer 'no_such_block.to_q'"):
        check_lora(bogus, tiny)
    half = {k: v for k, v in state.items() if "lora_B" not in k}
    with pytest.raises(AdapterError, match="only lora_A"):
        check_lora(half, tiny)
    with pytest.raises(AdapterError, match="not a safetensors"):
        read_lora(b"not a lora")
    with pytest.raises(AdapterError, match="not a LoRA weight"):
        read_lora(lora_bytes({"conv_in.weight": torch.zeros(2, 2)}))


def test_lru_evicts_least_recently_used_within_capacity():
    loads, unloads = [], []
    lru = AdapterLRU(100, lambda k: (loads.append(k) or k, 40), lambda k, v: unloads.append(k))
    assert lru.ensure(["a", "b"]).misses == 2
    assert lru.ensure(["a"]).hits == 1  # b is now the least recently used
    stats = lru.ensure(["c"])
    assert (stats.misses, stats.evicted, lru.keys) == (1, ["b"], ["a", "c"])
    big = lru.ensure(["d", "e", "f"])  # more than fits: the job's own adapters stay (pinned)
    assert lru.keys == ["d", "e", "f"] and unloads == ["b", "a", "c"] and big.misses == 3
    assert loads == ["a", "b", "c", "d", "e", "f"]


def test_adapter_set_id_is_order_free():
    assert adapter_set_id(["b", "a"]) == adapter_set_id(["a", "b"]) == "a+b"
    assert adapter_set_id([]) == ""


def test_switching_adapters_matches_references_and_restores_the_base_exactly(loras):
    image = make_image(64, 64, seed=5)
    p = params()
    store = {name: data for name, data in loras.items()}
    fetched = []
    gen = fresh_generator()
    cache = AdapterCache(gen.pipe.unet, lambda name, sha: fetched.append(name) or store[name], 2**30)
    spec = {"a": {"name": "a", "scale": 0.8, "sha256": sha256_hex(loras["a"])},
            "b": {"name": "b", "scale": 1.5, "sha256": sha256_hex(loras["b"])}}

    base = gen.generate(image, p, size=SIZE).frames
    with cache.applied([spec["a"]]) as stats:
        with_a = gen.generate(image, p, size=SIZE).frames
    assert (stats.hits, stats.misses) == (0, 1)
    with cache.applied([spec["b"]]):
        with_b = gen.generate(image, p, size=SIZE).frames
    with cache.applied([spec["a"]]) as stats:  # still loaded: a hit, same output as before
        again_a = gen.generate(image, p, size=SIZE).frames
    assert (stats.hits, stats.misses) == (1, 0) and fetched == ["a", "b"]
    after = gen.generate(image, p, size=SIZE).frames

    fresh_base = fresh_generator().generate(image, p, size=SIZE).frames
    assert np.array_equal(base, fresh_base)
    assert np.array_equal(after, fresh_base), "a base job after LoRA jobs differs from a fresh model"
    assert not np.array_equal(with_a, base) and not np.array_equal(with_b, base)
    assert not np.array_equal(with_a, with_b)
    assert np.array_equal(with_a, reference(loras["a"], 0.8, p, image))
    assert np.array_equal(with_b, reference(loras["b"], 1.5, p, image)), "adapter a leaked into b's job"
    assert np.array_equal(again_a, with_a)

    with cache.applied([spec["a"], spec["b"]]):  # two at once differ from each alone
        both = gen.generate(image, p, size=SIZE).frames
    assert not np.array_equal(both, with_a) and not np.array_equal(both, with_b)
    assert np.array_equal(gen.generate(image, p, size=SIZE).frames, fresh_base)
