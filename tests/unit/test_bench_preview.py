"""The preview part of the benchmarks: its summary arithmetic, and `bench.gpu_suite --dry-run
--parts preview` end to end on the CPU (tiny model, tiny shapes)."""

from __future__ import annotations

import json

import pytest

from bench.generation import parse_args, preview_variants, summarize_preview


def test_summary_gives_the_ratio_and_the_share_of_the_loop():
    rows = {
        "off": [{"denoise_s": 10.0, "previews": 0, "preview_s": 0.0, "bytes": 0},
                {"denoise_s": 12.0, "previews": 0, "preview_s": 0.0, "bytes": 0}],
        "every 1 s": [{"denoise_s": 11.0, "previews": 9, "preview_s": 0.09, "bytes": 9000},
                      {"denoise_s": 13.0, "previews": 11, "preview_s": 0.11, "bytes": 11000}],
    }
    off, on = summarize_preview(rows, steps=10)
    assert off["step_s"] == pytest.approx(1.1) and off["ratio"] == 1.0 and off["previews_per_job"] == 0
    assert on["step_s"] == pytest.approx(1.2) and on["ratio"] == pytest.approx(1.2 / 1.1)
    assert on["previews_per_job"] == 10 and on["s_per_preview"] == pytest.approx(0.01)
    assert on["preview_share"] == pytest.approx(0.2 / 24.0) and on["bytes_per_preview"] == 1000


def test_variants_and_the_part_is_a_choice():
    assert [name for name, _ in preview_variants(1.0)] == ["off", "every 1 s", "every step"]
    assert parse_args(["--parts", "preview"]).parts == {"preview"}


def test_gpu_suite_preview_part_dry_run(tmp_path):
    from bench import gpu_suite

    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--parts", "preview"]) == 0
    speed = json.loads((tmp_path / "gpu-speed-dry-run-cpu.json").read_text())
    preview = speed["preview"]
    assert preview["shape"] == "64x64x8@2" and preview["alone_s"] > 0
    rows = {r["variant"]: r for r in preview["rows"]}
    assert set(rows) == {"off", "every 1 s", "every step"}
    assert rows["off"]["previews_per_job"] == 0
    assert rows["every step"]["previews_per_job"] == 2 and rows["every step"]["bytes_per_preview"] > 0
