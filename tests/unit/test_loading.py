"""Model loading: tiny-random through the normal diffusers path, and clear errors otherwise."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from pipeline.errors import ModelLoadError
from pipeline.loading import ensure_tiny_random, load_model


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            h.update(path.relative_to(directory).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_tiny_random_is_saved_like_real_weights_and_deterministic(tmp_path):
    first = ensure_tiny_random(tmp_path / "a")
    second = ensure_tiny_random(tmp_path / "b")
    index = json.loads((first / "model_index.json").read_text())
    assert index["_class_name"] == "I2VGenXLPipeline"
    for part in ("unet", "vae", "text_encoder", "image_encoder", "tokenizer", "scheduler", "feature_extractor"):
        assert (first / part).is_dir(), part
    assert list((first / "unet").glob("*.safetensors"))
    assert _digest(first) == _digest(second)  # same seed, same weights, same files
    assert ensure_tiny_random(tmp_path / "a") == first  # reused, not rebuilt


def test_tiny_random_vae_keeps_the_real_8x_downscale(tiny_model):
    assert tiny_model.pipe.vae_scale_factor == 8
    assert tiny_model.pipe.tokenizer.model_max_length == 77


def test_loading_a_directory_uses_the_same_path(tiny_model):
    loaded = load_model(tiny_model.source, device="cpu")
    assert loaded.name == tiny_model.source and not loaded.is_tiny_random
    assert type(loaded.pipe).__name__ == "I2VGenXLPipeline"
    assert loaded.dtype == "float32" and loaded.device == "cpu"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "nowhere"), device="cpu")
    assert "does not exist" in info.value.message and info.value.field == "model"


def test_directory_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path), device="cpu")
    assert "model_index.json" in info.value.message


def test_corrupt_weights_are_a_clear_error(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model.source, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as info:
        load_model(str(broken), device="cpu")
    assert "could not load" in info.value.message and "corrupt" in info.value.message


def test_hub_id_not_in_cache_is_refused_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("ali-vilab/i2vgen-xl", device="cpu")
    assert "not in the local Hugging Face cache" in info.value.message


def test_unknown_name_and_bad_dtype():
    with pytest.raises(ModelLoadError):
        load_model("not a model", device="cpu")
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-random", device="cpu", dtype="float8")
    assert info.value.field == "dtype"


def test_cuda_requested_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError) as info:
        load_model("tiny-random", device="cuda")
    assert "no CUDA GPU" in info.value.message


def test_directory_with_only_the_fp16_variant(tiny_model, tmp_path):
    tiny_model.pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert list((tmp_path / "fp16" / "unet").glob("*.fp16.safetensors"))
    loaded = load_model(str(tmp_path / "fp16"), device="cpu")
    assert type(loaded.pipe).__name__ == "I2VGenXLPipeline" and loaded.dtype == "float32"
