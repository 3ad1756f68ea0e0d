"""The cost model: fitted FLOP closed forms, the VRAM formula, seconds, table and calibration."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import cost_model as cm
from pipeline.cost_model import (
    GPUS,
    STAGES,
    Calibration,
    GpuSpec,
    MemoryMeasurement,
    Workload,
    calibrate_memory,
    count_flops,
    estimate,
    table,
)

GB12 = GPUS["rtx3060-12gb"]
GB24 = GPUS["rtx4090-24gb"]
BASE = Workload(512, 512, 16, 50)


# (a) closed forms against exact meta-device counts ---------------------------------------------


def test_closed_forms_reproduce_exact_counts_at_unseen_shapes():
    """One UNet step and one decoded frame at shapes not used for fitting: within 2%."""
    co = cm.load_coefficients()
    fitted = {tuple(s) for s in json.loads(cm.COEFFICIENTS_PATH.read_text())["flops"]["unet"]["fitted_at"]}
    frames, width, height = 12, 640, 384
    assert (frames, height, width) not in fitted
    n = (width // 8) * (height // 8)

    exact_unet = count_flops("unet", width, height, frames, batch=2)
    assert co.per_unit("unet", frames, n) * 2 == pytest.approx(exact_unet, rel=0.02)
    exact_decode = count_flops("vae_decode", width, height, 1)
    assert co.per_unit("vae_decode", 1, n) == pytest.approx(exact_decode, rel=0.02)


def test_unet_closed_form_at_a_non_multiple_of_64():
    """Aspect-kept sizes (multiples of 8) pad the UNet's lower levels: the documented undercount."""
    co = cm.load_coefficients()
    width, height, frames = 680, 384, 16  # 512p at 16:9, as `request.output_size` renders it
    exact = count_flops("unet", width, height, frames)
    closed = co.per_unit("unet", frames, (width // 8) * (height // 8))
    assert 0.97 * exact < closed <= exact


def test_coefficients_file_records_exact_fits_and_attention_checks():
    data = json.loads(cm.COEFFICIENTS_PATH.read_text())
    for stage in STAGES:
        fit = data["flops"][stage]
        assert len(fit["terms"]) == len(fit["coefficients"])
        assert fit["max_relative_residual"] < 1e-6
    for pair in data["checks"]["attention_quadratic_terms"].values():
        assert pair["fitted"] == pytest.approx(pair["analytic"], rel=1e-3)


def test_attention_is_counted():
    assert cm._sdpa_is_counted()


# (b) monotonic --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("cpu_offload", [False, True])
@pytest.mark.parametrize("guidance", [False, True])
def test_more_work_never_costs_less(dtype, cpu_offload, guidance):
    def cost(w, h, f, steps):
        e = estimate(Workload(w, h, f, steps, guidance=guidance, dtype=dtype, cpu_offload=cpu_offload), GB24)
        return e.vram_bytes, e.seconds

    sizes = [(256, 256), (512, 512), (768, 512), (768, 768), (1024, 768), (1024, 1024)]
    for w, h in sizes:
        for f in (1, 2, 8, 16, 24, 32, 48):
            for steps in (1, 10, 50, 100):
                here = cost(w, h, f, steps)
                for other in (cost(w, h, f + 8, steps), cost(w, h, f, steps + 10)):
                    assert other[0] >= here[0] and other[1] >= here[1]
    for (w0, h0), (w1, h1) in zip(sizes, sizes[1:]):
        for f in (8, 16, 32):
            a, b = cost(w0, h0, f, 50), cost(w1, h1, f, 50)
            assert b[0] >= a[0] and b[1] >= a[1]


def test_decode_chunk_size_costs_memory_only_without_vae_slicing():
    small = estimate(Workload(1024, 1024, 16, 50, decode_chunk_size=1, vae_slicing=False), GB24)
    big = estimate(Workload(1024, 1024, 16, 50, decode_chunk_size=16, vae_slicing=False), GB24)
    assert big.vram_bytes > small.vram_bytes and big.peak_stage == "vae_decode"
    assert big.flops == small.flops


def test_vae_slicing_decodes_one_frame_whatever_the_chunk():
    # measured on an H200: with slicing (the worker's default) chunk 8 peaks exactly as chunk 1
    one = estimate(Workload(1024, 1024, 16, 50, decode_chunk_size=1), GB24)
    eight = estimate(Workload(1024, 1024, 16, 50, decode_chunk_size=8), GB24)
    assert eight.vram_bytes == one.vram_bytes and one.peak_stage == "unet"


def test_gpu_calibration_is_current_and_matches_the_measured_class_table():
    """pipeline/gpu_calibration.json is what `pipeline.gpu_fit` derives from the checked-in GPU
    results, the cost model uses it by default, and for every shape run under a class's memory
    cap the calibrated model's fits/does-not-fit is what happened on the GPU."""
    import json

    from pipeline import cost_model, gpu_fit

    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    memory = json.loads((results / "gpu-memory-nvidia-h200.json").read_text())
    speed = json.loads((results / "gpu-speed-nvidia-h200.json").read_text())
    fitted = gpu_fit.fit(memory, speed)
    assert fitted == json.loads(cost_model.CALIBRATION_PATH.read_text())
    assert cost_model.DEFAULT_CALIBRATION.activation_scale == fitted["calibration"]["activation_scale"]
    assert [(c["class"], c["case"], c["predicted_fits"]) for c in fitted["checks"]] == [
        (c["class"], c["case"], c["measured_fits"]) for c in fitted["checks"]]
    # and the memory grid (no cap) is predicted within 10% of what the card held (allocated + context)
    for row in memory["expandable_segments"]["grid"]:
        est = estimate(Workload(row["width"], row["height"], row["frames"], 50), GB24)
        held = row["peak_allocated_bytes"] + memory["context_bytes"]
        assert 1.0 <= est.vram_bytes / held < 1.10, (row["case"], est.vram_bytes / held)


def test_bigger_dtype_costs_more():
    fp16 = estimate(BASE, GB24)
    bf16 = estimate(replace(BASE, dtype="bfloat16"), GB24)
    fp32 = estimate(replace(BASE, dtype="float32"), GB24)
    assert fp16.vram_bytes == bf16.vram_bytes < fp32.vram_bytes
    assert fp16.seconds == bf16.seconds < fp32.seconds
    assert fp32.vram_by_part["weights"] == 2 * fp16.vram_by_part["weights"]


# (c) CFG --------------------------------------------------------------------------------------


def test_cfg_off_halves_unet_flops():
    on = estimate(BASE, GB24)
    off = estimate(replace(BASE, guidance=False), GB24)
    assert off.flops_by_stage["unet"] == pytest.approx(on.flops_by_stage["unet"] / 2, rel=1e-12)
    assert off.flops_by_stage["text_encoder"] == pytest.approx(on.flops_by_stage["text_encoder"] / 2)
    assert off.vram_by_part["activations"] == pytest.approx(on.vram_by_part["activations"] / 2, rel=1e-6)
    # and the real model agrees: one step at batch 2 is exactly twice batch 1
    assert count_flops("unet", 256, 256, 4, batch=2) == 2 * count_flops("unet", 256, 256, 4, batch=1)


# (d) CPU offload ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(512, 512, 16), (768, 768, 24), (1024, 1024, 32)])
def test_cpu_offload_lowers_vram_and_adds_transfer_time(shape):
    wl = Workload(*shape, 50)
    resident = estimate(wl, GB24)
    offload = estimate(replace(wl, cpu_offload=True), GB24)
    assert offload.vram_bytes < resident.vram_bytes
    assert offload.vram_by_part["weights"] == cm.load_coefficients().parameters["unet"] * 2
    assert offload.seconds_by_stage["offload"] > 0 == resident.seconds_by_stage["offload"]


# (e) the scheduler's key facts ----------------------------------------------------------------


def test_512p_16_frames_fits_12gb_and_1024p_32_does_not():
    standard = estimate(Workload(512, 512, 16, 50, dtype="float16"), GB12)
    assert standard.fits(GB12), standard.vram_bytes
    huge = estimate(Workload(1024, 1024, 32, 50, dtype="float16"), GB12)
    assert not huge.fits(GB12), huge.vram_bytes
    # measured on an H200 (PyTorch capped at 24 GiB minus the context): 1024p x 32 does not fit
    assert not huge.fits(GB24) and huge.fits(GPUS["a100-40gb"]), huge.vram_bytes


# (f) parameters --------------------------------------------------------------------------------


def test_parameter_counts_are_plausible():
    params = cm.load_coefficients().parameters
    assert 1.3e9 <= params["unet"] <= 1.5e9
    assert 8.0e7 <= params["vae"] <= 8.8e7
    assert 3.3e8 <= params["text_encoder"] <= 3.7e8
    assert 6.0e8 <= params["image_encoder"] <= 6.6e8
    assert cm.count_parameters() == params  # the JSON matches the current FULL_SIZE


# (g) table --------------------------------------------------------------------------------------


def test_table_lists_every_resolution_and_frame_count():
    text = table(GB24, resolutions=("512p", "768p", "1024p"), frames=(8, 16, 24, 32), steps=50)
    rows = [line.split() for line in text.splitlines()]
    combos = {(r[0], int(r[1])) for r in rows if r and r[0].endswith("p") and r[1].isdigit()}
    assert combos == {(r, f) for r in ("512p", "768p", "1024p") for f in (8, 16, 24, 32)}
    assert "rtx4090-24gb" in text


def test_cli_table_and_estimate(capsys):
    assert cm.main(["table", "--gpu", "rtx3060-12gb"]) == 0
    assert "1024p" in capsys.readouterr().out
    assert cm.main(["estimate", "--width", "512", "--height", "512", "--frames", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vram_bytes"] == estimate(BASE, GB24).vram_bytes


# (h) memory calibration ------------------------------------------------------------------------


def test_calibrate_memory_recovers_a_known_scale():
    truth = Calibration(activation_scale=1.37)
    shapes = [
        (512, 512, 16, "float16"),
        (768, 768, 16, "float16"),
        (1024, 576, 24, "bfloat16"),
        (512, 512, 32, "float32"),
        (1024, 1024, 16, "float16"),
    ]
    gpu = GpuSpec("any", 0, 1.0)
    measurements = [
        (w, h, f, dt, estimate(Workload(w, h, f, 1, dtype=dt), gpu, truth).vram_bytes)
        for w, h, f, dt in shapes
    ]
    fitted = calibrate_memory(measurements, Calibration())
    assert fitted.activation_scale == pytest.approx(1.37, rel=1e-3)
    assert replace(fitted, activation_scale=1.0) == Calibration()  # nothing else changed

    # with ±3% measurement noise it still lands close
    noisy = [(*m[:4], int(m[4] * (1.03 if i % 2 else 0.97))) for i, m in enumerate(measurements)]
    assert calibrate_memory(noisy).activation_scale == pytest.approx(1.37, rel=0.15)

    # a MemoryMeasurement with offload uses the offload weights
    m = MemoryMeasurement(512, 512, 16, "float16", 0, cpu_offload=True)
    peak = estimate(m.workload(), gpu, truth).vram_bytes
    fitted = calibrate_memory([replace(m, peak_bytes=peak)], Calibration())
    assert fitted.activation_scale == pytest.approx(1.37, rel=1e-3)


def test_calibrate_memory_needs_measurements():
    with pytest.raises(ValueError):
        calibrate_memory([])


# the estimate itself ---------------------------------------------------------------------------


def test_estimate_parts_add_up():
    e = estimate(BASE, GB24)
    assert set(e.flops_by_stage) == set(STAGES)
    assert e.flops == pytest.approx(sum(e.flops_by_stage.values()))
    assert e.vram_bytes == sum(e.vram_by_part.values())
    assert e.seconds == pytest.approx(sum(e.seconds_by_stage.values()))
    assert e.flops_by_stage["unet"] > 0.9 * e.flops
    assert e.peak_stage == "unet"


def test_seconds_scale_with_the_gpu_and_calibration():
    slow, fast = estimate(BASE, GB12), estimate(BASE, GPUS["h100-80gb"])
    assert fast.seconds < slow.seconds
    lower_mfu = estimate(BASE, GB24, Calibration(mfu_unet=0.2))
    default = estimate(BASE, GB24, Calibration(mfu_unet=0.4))
    assert lower_mfu.seconds_by_stage["unet"] == pytest.approx(2 * default.seconds_by_stage["unet"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(width=0, height=512, num_frames=16, num_inference_steps=50),
        dict(width=510, height=512, num_frames=16, num_inference_steps=50),
        dict(width=512, height=512, num_frames=0, num_inference_steps=50),
        dict(width=512, height=512, num_frames=16, num_inference_steps=50, dtype="float8"),
        dict(width=512, height=512, num_frames=16, num_inference_steps=50, decode_chunk_size=0),
    ],
)
def test_workload_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        Workload(**kwargs)


def test_estimate_needs_no_torch():
    code = (
        "import sys; from pipeline.cost_model import estimate, Workload, GPUS; "
        "estimate(Workload(512, 512, 16, 50), GPUS['l4-24gb']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_gpu_table_has_the_named_cards():
    named = {"rtx3060-12gb", "rtx4090-24gb", "a100-40gb", "a100-80gb", "h100-80gb", "l4-24gb", "a10g-24gb"}
    assert set(GPUS) >= named
    for name, gpu in GPUS.items():
        assert gpu.name == name and gpu.memory_bytes > 0 and gpu.peak_tflops > 0
