"""The LoRA registry (a directory), the `lora` request field, the cost model's share and the `sim`
worker's adapter cache: no Ray, no model weights (UNets on the meta device)."""

from __future__ import annotations

import pytest
import torch

from pipeline.adapters import AdapterError, lora_bytes, meta_unet, random_lora, sha256_hex
from pipeline.cost_model import ADAPTER_LOAD_OVERHEAD_S, DEFAULT_CALIBRATION, adapter_cost
from pipeline.errors import InvalidRequest
from pipeline.request import parse_params
from serving.adapter_registry import AdapterRegistry, registry_url
from serving.adapter_runtime import WorkerAdapters
from serving.config import load_settings

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def settings(tmp_path, model="tiny-random", **extra):
    return load_settings({"adapters_url": str(tmp_path / "reg"), "model": model,
                          "job_db": str(tmp_path / "db" / "jobs.sqlite3"), **extra}, env={})


def tiny_lora(seed=0, rank=2, targets=("to_q", "to_v")) -> bytes:
    return lora_bytes(random_lora(meta_unet("tiny-random"), rank=rank, seed=seed, targets=targets))


def test_registry_adds_lists_reads_and_resolves(tmp_path):
    reg = AdapterRegistry(settings(tmp_path))
    data = tiny_lora(1)
    meta = reg.add("walk-cycle", data, note="a walk")
    assert (meta["name"], meta["rank"], meta["bytes"], meta["sha256"], meta["note"]) == \
        ("walk-cycle", 2, len(data), sha256_hex(data), "a walk")
    assert all(t.endswith(("to_q", "to_v")) for t in meta["target_modules"])
    assert (tmp_path / "reg" / "walk-cycle" / "adapter.safetensors").read_bytes() == data
    other = AdapterRegistry(settings(tmp_path))  # another process sees it
    assert [m["name"] for m in other.list()] == ["walk-cycle"]
    assert other.read("walk-cycle", meta["sha256"]) == data
    assert other.resolve([{"name": "walk-cycle", "scale": 0.5}]) == [
        {"name": "walk-cycle", "scale": 0.5, "sha256": meta["sha256"], "bytes": len(data)}]
    with pytest.raises(AdapterError) as exc:
        other.resolve([{"name": "walk-cycle", "scale": 1}, {"name": "nope", "scale": 1}])
    assert exc.value.field == "lora" and exc.value.http_status == 422 and "lora[1]" in exc.value.message
    with pytest.raises(AdapterError, match="changed since"):
        other.read("walk-cycle", "0" * 64)


def test_registry_refuses_what_does_not_fit_and_keeps_nothing(tmp_path):
    reg = AdapterRegistry(settings(tmp_path))
    full_size = lora_bytes(random_lora(meta_unet("sim"), rank=2, targets=(LAYER,)))
    with pytest.raises(AdapterError, match="do not fit"):
        reg.add("too-big", full_size)
    bogus = lora_bytes({"mid_block.nothing.lora_A.weight": torch.ones(2, 4),
                        "mid_block.nothing.lora_B.weight": torch.ones(4, 2)})
    with pytest.raises(AdapterError, match="no layer 'mid_block.nothing'"):
        reg.add("bogus", bogus)
    with pytest.raises(AdapterError, match="adapter name"):
        reg.add("Bad Name", tiny_lora())
    assert reg.list(fresh=True) == [] and not (tmp_path / "reg").exists()
    reg.add("ok", tiny_lora())
    with pytest.raises(AdapterError) as exc:
        reg.add("ok", tiny_lora(2))
    assert exc.value.http_status == 409
    assert reg.add("ok", tiny_lora(2), replace=True)["sha256"] == sha256_hex(tiny_lora(2))
    # the full-size LoRA fits the sim model (the published architecture)
    assert AdapterRegistry(settings(tmp_path / "sim", model="sim")).add("full", full_size)["rank"] == 2


def test_default_registry_is_beside_the_job_store(tmp_path):
    s = load_settings({"job_db": str(tmp_path / "db" / "jobs.sqlite3")}, env={})
    assert registry_url(s) == str(tmp_path / "db" / "adapters")


@pytest.mark.parametrize("value, expected", [
    ([{"name": "a", "scale": 0.5}], [("a", 0.5)]),
    ('[{"name": "a", "scale": -1}, {"name": "b"}]', [("a", -1.0), ("b", 1.0)]),
    ("a:0.25, b", [("a", 0.25), ("b", 1.0)]),
    ("", []),
])
def test_lora_field_forms(value, expected):
    assert [(r.name, r.scale) for r in parse_params({"prompt": "x", "lora": value}).lora] == expected


@pytest.mark.parametrize("value, message", [
    ([{"name": "a", "scale": 2.5}], "lora[0].scale must be between -2 and 2"),
    ("a,b,c,d", "at most 3 adapters"),
    ([{"name": "a"}, {"name": "a"}], "named twice"),
    ([{"name": "A B"}], "is not an adapter name"),
    ([{"name": "a", "weight": 1}], "lora[0].weight"),
    ("[oops", "JSON list"),
    (7, "must be a list"),
])
def test_lora_field_errors_name_the_field(value, message):
    with pytest.raises(InvalidRequest) as exc:
        parse_params({"prompt": "x", "lora": value})
    assert exc.value.field == "lora" and message in exc.value.message, exc.value.message


def test_cost_model_adds_adapter_memory_and_a_load():
    vram, seconds = adapter_cost([2**20, 3 * 2**20])
    assert vram == 4 * 2**20
    assert seconds == pytest.approx(2 * ADAPTER_LOAD_OVERHEAD_S + 4 * 2**20 / DEFAULT_CALIBRATION.offload_bandwidth_bytes_per_s)
    assert adapter_cost([]) == (0, 0.0)


def test_sim_worker_keeps_adapters_in_a_byte_bounded_lru(tmp_path):
    s = settings(tmp_path, model="sim", sim_time_scale=1e-6)
    reg = AdapterRegistry(s)
    size = 0
    for i in range(3):
        meta = reg.add(f"s{i}", lora_bytes(random_lora(meta_unet("sim"), rank=2, seed=i, targets=(LAYER,))))
        size = meta["bytes"]
    worker = WorkerAdapters(s.model_copy(update={"adapter_cache_bytes": 2 * size}), backend=None, sim=True)

    def job(*names):
        lora = [{"name": n, "scale": 1.0, "sha256": reg.get(n)["sha256"]} for n in names]
        with worker.applied(parse_params({"prompt": "x", "lora": lora})) as stats:
            return stats.hits, stats.misses

    with worker.applied(parse_params({"prompt": "x"})) as none:
        assert none is None
    assert [job("s0"), job("s0"), job("s1"), job("s2"), job("s0")] == [(0, 1), (1, 0), (0, 1), (0, 1), (0, 1)]
    assert [k.split("@")[0] for k in worker.loaded] == ["s2", "s0"]


def test_cli_adds_and_lists_adapters(tmp_path, capsys):
    import json

    from serving.cli import main

    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    good.write_bytes(tiny_lora(5))
    bad.write_bytes(lora_bytes(random_lora(meta_unet("sim"), rank=2, targets=(LAYER,))))
    reg = ["--adapters-url", str(tmp_path / "reg")]
    assert main(["adapters", "add", "sway", str(good), "--note", "gentle sway", "--model", "tiny-random", *reg]) == 0
    assert "registered sway: rank 2" in capsys.readouterr().out
    assert main(["adapters", "add", "huge", str(bad), "--model", "tiny-random", *reg]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert main(["adapters", "list", "--json", *reg]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["note"], a["sha256"]) for a in listed] == [("sway", "gentle sway", sha256_hex(good.read_bytes()))]
