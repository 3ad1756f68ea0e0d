"""bench.adapters without a cluster: the trace and the registered adapters it runs on."""

from __future__ import annotations

from collections import Counter

from bench.adapters import make_trace, register_adapters


def test_trace_is_deterministic_and_skewed():
    trace = make_trace(400, 20, seed=3)
    assert trace == make_trace(400, 20, seed=3) and trace != make_trace(400, 20, seed=4)
    counts = Counter(trace)
    assert set(counts) <= {f"style-{i:02d}" for i in range(20)} and len(counts) >= 15
    assert counts["style-00"] > 3 * counts.get("style-19", 0)  # Zipf: a popular head, a long tail


def test_bench_adapters_fit_the_full_size_unet(tmp_path):
    metas = register_adapters(tmp_path / "reg", 2, seed=0)
    assert [m["name"] for m in metas] == ["style-00", "style-01"]
    assert metas[0]["sha256"] != metas[1]["sha256"] and metas[0]["rank"] == 4 and metas[0]["model"] == "sim"
    assert (tmp_path / "reg" / "style-01" / "adapter.json").is_file()
