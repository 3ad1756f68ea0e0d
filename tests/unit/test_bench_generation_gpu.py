"""`bench.generation_gpu` without a GPU: its arguments, its FLOP/MFU arithmetic, `--help`,
`--dry-run` (the plan on the meta device) and `--cpu-smoke` (every code path on the tiny model; slow)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench.generation_gpu import Shape, mfu, parse_choice_list, parse_shapes, peak_tflops_for, unet_flops_per_step

ROOT = Path(__file__).resolve().parents[2]


def test_shapes_parse_with_and_without_steps():
    assert parse_shapes("512x512x16@50,1024x1024x16") == [Shape(512, 512, 16, 50), Shape(1024, 1024, 16, 50)]
    assert parse_shapes("768x512x24@10", default_steps=4)[0].label == "768x512x24@10"
    for bad in ("512x512", "512x512x16@0", "500x512x16", "512x512x4", "512x512x64", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shapes(bad)


def test_choice_lists_reject_unknown_names():
    assert parse_choice_list("fuse_qkv,compile", ("fuse_qkv", "compile"), "--levers") == ["fuse_qkv", "compile"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown"):
        parse_choice_list("fuse_qkv,warp_drive", ("fuse_qkv",), "--levers")


def test_peak_tflops_by_device_name():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0  # the PCIe card, before the generic H100
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA GeForce RTX 4090") == 165.2
    assert peak_tflops_for("Some Future GPU") is None


def test_mfu_is_achieved_flops_over_peak():
    flops = unet_flops_per_step(512, 512, 16)
    assert flops == pytest.approx(41.9e12, rel=0.01)  # docs/cost-model.md: 41.9 TFLOP per step at 512x512x16 with CFG
    achieved, util = mfu(flops, 0.1, 989.0)
    assert achieved == pytest.approx(flops / 0.1 / 1e12)
    assert util == pytest.approx(achieved / 989.0)
    assert unet_flops_per_step(512, 512, 16, guidance=False) == pytest.approx(flops / 2, rel=1e-6)


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.generation_gpu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_works():
    r = _run("--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "full-size" in r.stdout


# In this process (`main(argv)`, what `python -m` calls; `test_help_works` runs the module): each
# subprocess would import torch again, seconds on 2 cores.
def test_dry_run_validates_the_plan_on_the_meta_device(capsys):
    from bench.generation_gpu import main

    assert main(["--dry-run", "--shapes", "512x512x16@50,1024x1024x16@10", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "2.49 B parameters" in out and "512x512x16@50" in out and "ok:" in out
    with pytest.raises(SystemExit) as bad:
        main(["--dry-run", "--levers", "warp_drive"])
    assert bad.value.code != 0 and "unknown" in capsys.readouterr().err


def test_without_a_gpu_it_says_so(capsys):
    import torch

    from bench.generation_gpu import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["--parts", "stock"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    import json

    r = _run("--cpu-smoke", "--shapes", "64x64x8@2", "--levers", "cfg_split,fuse_qkv,attention_cache",
             "--solver-steps", "3", "--json", str(tmp_path / "g.json"), "--memory-json", str(tmp_path / "m.json"),
             timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "g.json").read_text())
    assert all("error" not in row for part in ("stock", "levers", "solvers", "memory") for row in data[part])
    assert [row["lever"] for row in data["levers"]] == ["baseline", "cfg_split", "fuse_qkv", "attention_cache"]
    assert data["stock"][0]["max_diff"] <= 1
    assert "calibration" in json.loads((tmp_path / "m.json").read_text())


def test_gpu_suite_dry_run_writes_the_three_result_files(tmp_path):
    """`python -m bench.gpu_suite --dry-run`: every part on the CPU (tiny model), the three JSON
    files with per-stage peaks, the class-cap rows, the kernel profile and class detection."""
    import json

    from bench import gpu_suite

    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--parts", "memory,fits,profile,farm"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu-farm-dry-run-cpu.json", "gpu-memory-dry-run-cpu.json", "gpu-speed-dry-run-cpu.json"]
    memory = json.loads((tmp_path / "gpu-memory-dry-run-cpu.json").read_text())
    assert memory["versions"]["diffusers"] and memory["skipped"] == []
    cases = [r["case"] for r in memory["rows"]]
    assert cases == ["64p x8", "64p x16", "64p x16 chunk 2"]
    assert all(set(r["stages"]) == {"conditioning", "denoise", "decode"} for r in memory["rows"])
    assert [r["class"] for r in memory["fits"]] == ["12gb", "24gb"] and all(r["fits"] for r in memory["fits"])
    speed = json.loads((tmp_path / "gpu-speed-dry-run-cpu.json").read_text())
    assert speed["profile"]["kernel_s_total"] > 0 and speed["profile"]["top_kernels"]
    farm = json.loads((tmp_path / "gpu-farm-dry-run-cpu.json").read_text())
    assert set(farm["class_holds_as_measured"]) == {"12gb", "24gb", "40gb", "80gb"}
