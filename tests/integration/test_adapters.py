"""LoRA adapters through the farm: the registry over HTTP, `lora` on jobs (JSON and form), 422s,
`params.json` records, cache metrics (`sim`), and (slow) the real model code on tiny-random:
the farm's output equals an in-process reference, the base is restored exactly, two adapters on
one worker do not leak into each other."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.adapters import lora_bytes, meta_unet, random_lora
from serving.adapter_registry import AdapterRegistry
from serving.config import load_settings
from tests.helpers import require_tool
from tests.integration.conftest import deploy, png_bytes, undeploy

ONE_12GB = {"12gb": {"min_replicas": 1, "max_replicas": 1}}
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def make_registry(tmp_path: Path, model: str, loras: dict[str, dict]) -> tuple[Path, dict[str, dict]]:
    root = tmp_path / "adapters"
    registry = AdapterRegistry(load_settings({"adapters_url": str(root), "model": model}, env={}))
    metas = {name: registry.add(name, lora_bytes(state), note=f"test {name}") for name, state in loras.items()}
    return root, metas


def stored(farm, job: dict, key: str) -> Path:
    return Path(farm.settings.storage_url[len("file://"):]) / job["result"][key]


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_adapters_listed_named_by_jobs_recorded_and_counted(ray_cluster, tmp_path):
    unet = meta_unet("sim")
    root, metas = make_registry(tmp_path, "sim", {
        "zoom": random_lora(unet, rank=2, seed=1, targets=(LAYER,)),
        "pan": random_lora(unet, rank=4, seed=2, targets=(LAYER,)),
    })
    farm = deploy(ray_cluster, tmp_path, workers=ONE_12GB, adapters_url=str(root))
    try:
        listing = farm.client.call("GET", "/v1/adapters")["adapters"]
        assert [(a["name"], a["rank"], a["sha256"]) for a in listing] == [
            ("pan", 4, metas["pan"]["sha256"]), ("zoom", 2, metas["zoom"]["sha256"])]
        assert listing[0]["target_modules"] == [LAYER] and listing[1]["note"] == "test zoom"

        small = {"num_frames": 8, "num_inference_steps": 2}
        for lora, why in (([{"name": "nope", "scale": 1}], "unknown adapter 'nope'"),
                          ([{"name": "zoom", "scale": 5}], "between -2 and 2"),
                          ([{"name": n, "scale": 1} for n in ("a", "b", "c", "d")], "at most 3"),
                          ([{"name": "zoom"}, {"name": "zoom"}], "named twice")):
            r = farm.submit(lora=lora, **small)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "lora" and why in r.json()["error"]["message"], r.text

        jobs = [farm.submit_ok(lora=[{"name": "zoom", "scale": 0.5}], **small),
                farm.submit_ok(lora=[{"name": "zoom", "scale": 1.5}], **small)]
        form = farm.session.post(farm.url + "/v1/jobs", files={"image": ("in.png", png_bytes(), "image/png")},
                                 data={"prompt": "pan left", "num_frames": "8", "num_inference_steps": "2",
                                       "lora": json.dumps([{"name": "pan", "scale": -0.5},
                                                           {"name": "zoom", "scale": 1}])})
        assert form.status_code == 202, form.text
        jobs.append(form.json())
        done = [farm.wait(j["id"]) for j in jobs]
        assert [d["status"] for d in done] == ["succeeded"] * 3, done
        record = json.loads(stored(farm, done[2], "params_key").read_text())
        assert record["params"]["lora"] == [
            {"name": "pan", "scale": -0.5, "sha256": metas["pan"]["sha256"]},
            {"name": "zoom", "scale": 1.0, "sha256": metas["zoom"]["sha256"]}]
        assert record["adapter_cache"]["misses"] + record["adapter_cache"]["hits"] == 2
        text = farm.session.get(farm.url + "/metrics").text
        # one worker: zoom loaded once (job 1), held for jobs 2 and 3; pan loaded for job 3
        assert (metric(text, "i2v_adapter_cache_misses_total"), metric(text, "i2v_adapter_cache_hits_total")) \
            == (2, 2), text
    finally:
        undeploy()


def decoded(path: Path) -> bytes:
    """The MP4's frames as raw RGB (what a viewer sees), through ffmpeg."""
    ffmpeg = require_tool("ffmpeg")
    return subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          check=True, capture_output=True).stdout


@pytest.mark.slow
def test_tiny_random_lora_jobs_match_in_process_references(ray_cluster, tmp_path, tiny_model):
    import warnings

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pipeline.adapters import check_lora
    from pipeline.generator import Generator, MemoryOptions
    from pipeline.images import load_image
    from pipeline.loading import load_model
    from pipeline.render import render
    from pipeline.request import parse_params

    unet = tiny_model.pipe.unet
    loras = {"a": random_lora(unet, rank=4, seed=1, std=0.3),
             "b": random_lora(unet, rank=2, seed=2, std=0.3, targets=("to_k", "to_v", "proj_in"))}
    root, _ = make_registry(tmp_path, "tiny-random", loras)
    job = {"num_frames": 8, "num_inference_steps": 1, "guidance_scale": 1.0, "seed": 11}
    farm = deploy(ray_cluster, tmp_path, model="tiny-random", workers=ONE_12GB, adapters_url=str(root))
    try:
        order = [None, ("a", 0.8), ("b", 1.5), None]
        done = []
        for entry in order:  # one at a time, on the one worker
            lora = [{"name": entry[0], "scale": entry[1]}] if entry else []
            done.append(farm.wait(farm.submit_ok(lora=lora, reuse=False, **job)["id"], timeout=300))  # really render
        assert [d["status"] for d in done] == ["succeeded"] * 4, done
        assert len({d["node"] for d in done}) == 1  # the one worker
        videos = [decoded(stored(farm, d, "key")) for d in done]
    finally:
        undeploy()

    assert videos[3] == videos[0], "a base job after LoRA jobs differs from the fresh worker's base job"
    assert videos[1] != videos[0] and videos[2] != videos[0] and videos[1] != videos[2]
    image = load_image(png_bytes())
    for index, (name, scale) in ((1, order[1]), (2, order[2])):
        gen = Generator(load_model("tiny-random", device="cpu"),  # as the farm's worker has it
                        MemoryOptions(decode_chunk_size=farm.settings.decode_chunk_size,
                                      attention=farm.settings.attention))
        ref_unet = gen.pipe.unet
        grads = {n: p.requires_grad for n, p in ref_unet.named_parameters()}
        info = check_lora(loras[name], ref_unet)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject_adapter_in_model(LoraConfig(r=info.rank, lora_alpha=info.alpha, init_lora_weights=False,
                                               target_modules=list(info.target_modules)), ref_unet, adapter_name=name)
            set_peft_model_state_dict(ref_unet, loras[name], adapter_name=name)
        for layer in ref_unet.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_scale(name, scale)
        for pname, param in ref_unet.named_parameters():
            base = pname.replace(".base_layer.", ".")
            if base in grads:
                param.requires_grad_(grads[base])
        params = parse_params({"prompt": "waves rolling in", "resolution": "512p", **job})
        out = render(gen, image, params, tmp_path / f"ref-{name}")
        assert decoded(out.video_path) == videos[index], f"the farm's LoRA {name!r} job differs from the reference"
