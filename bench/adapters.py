"""LoRA affinity benchmark: adapter loads with affinity routing vs plain routing, side by side.

    .venv/bin/python -m bench.adapters [--jobs 120] [--adapters 20] [--workers 4] [--cache 3]
                                       [--time-scale 0.02] [--wait 1.0] [--seed 0] [--json FILE]

In one run:

1. registers `--adapters` LoRAs (rank 4, random non-zero weights, fitted to the full-size UNet:
   the `sim` model stands for the real one) in a fresh registry directory, through
   `AdapterRegistry.add` (the check `i2v-farm adapters add` runs);
2. draws a trace: `--jobs` jobs, each naming one adapter, Zipf-distributed over the adapters
   (s = 1.1: a few popular ones and a long tail), all submitted at t=0;
3. runs it through the real farm (`sim` model, HTTP API, job manager, Serve routing, workers) on a
   simulated cluster of `--workers` GPUs of one class whose workers each keep `--cache` adapters
   (`adapter_cache_bytes`), twice on fresh deployments: `affinity` (the default:
   `adapter_affinity=True`, Serve multiplexing by adapter set) and `plain`
   (`adapter_affinity=False`);
4. prints per policy: adapter loads (cache misses, from `/metrics`), hits, load seconds, makespan
   and mean job latency; and the loads affinity avoided.

The sim worker sleeps the cost model's load time of a miss (`adapter_cost`, times
`sim_time_scale`) and keeps the same byte-bounded LRU as a GPU worker, so the counts are what the
routing decides; the times are scaled.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLASS = "12gb"


def register_adapters(registry_dir: Path, count: int, seed: int) -> list[dict[str, Any]]:
    from pipeline.adapters import lora_bytes, meta_unet, random_lora
    from serving.adapter_registry import AdapterRegistry
    from serving.config import load_settings

    registry = AdapterRegistry(load_settings({"adapters_url": str(registry_dir), "model": "sim"}, env={}))
    unet = meta_unet("sim")
    out = []
    for i in range(count):
        state = random_lora(unet, rank=4, seed=seed * 1000 + i, targets=("attn1.to_q", "attn1.to_v"))
        out.append(registry.add(f"style-{i:02d}", lora_bytes(state), note=f"bench adapter {i}"))
    return out


def make_trace(jobs: int, adapters: int, seed: int, s: float = 1.1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(adapters)]
    return [f"style-{rng.choices(range(adapters), weights)[0]:02d}" for _ in range(jobs)]


def png_b64(side: int = 64) -> str:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new("RGB", (side, side), (90, 120, 160)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def scrape(url: str) -> dict[str, float]:
    import requests

    out: dict[str, float] = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        for name in ("i2v_adapter_cache_misses_total", "i2v_adapter_cache_hits_total",
                     "i2v_adapter_load_seconds_total"):
            if line.startswith(name + "{"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_policy(url: str, trace: list[str], steps: int) -> dict[str, Any]:
    import requests

    session = requests.Session()
    image = png_b64()
    started = time.time()
    ids = []
    for i, name in enumerate(trace):
        body = {"prompt": f"adapter job {i}", "image": image, "resolution": "512p", "num_frames": 8,
                "num_inference_steps": steps, "seed": i, "lora": [{"name": name, "scale": 1.0}]}
        resp = session.post(url + "/v1/jobs", json=body, timeout=60)
        resp.raise_for_status()
        ids.append(resp.json()["id"])
    jobs = {}
    deadline = time.monotonic() + 1800
    while len(jobs) < len(ids):
        for job_id in ids:
            if job_id in jobs:
                continue
            job = session.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                jobs[job_id] = job
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(jobs)} jobs unfinished")
        time.sleep(0.5)
    from datetime import datetime

    finished = [datetime.fromisoformat(j["finished_at"]).timestamp() for j in jobs.values()]
    created = [datetime.fromisoformat(j["created_at"]).timestamp() for j in jobs.values()]
    metrics = scrape(url)
    return {
        "jobs": len(jobs),
        "failed": sum(j["status"] != "succeeded" for j in jobs.values()),
        "loads": int(metrics.get("i2v_adapter_cache_misses_total", 0)),
        "hits": int(metrics.get("i2v_adapter_cache_hits_total", 0)),
        "load_s": round(metrics.get("i2v_adapter_load_seconds_total", 0.0), 3),
        "makespan_s": round(max(finished) - started, 2),
        "mean_latency_s": round(sum(f - c for f, c in zip(finished, created)) / len(jobs), 2),
    }


@contextlib.contextmanager
def cluster(workers: int):
    from ray import serve

    from cluster.simulated import SimulatedCluster
    from serving.harness import start_serve

    for attempt in range(8):  # on a loaded machine a raylet can miss Ray's fixed 30 s start window
        try:
            sim = SimulatedCluster(f"{CLASS}:{workers}", head_cpus=2, node_cpus=1).start(timeout=180)
            break
        except Exception as exc:  # noqa: BLE001
            if attempt == 7:
                raise
            print(f"cluster start failed ({type(exc).__name__}: {exc}); again", file=sys.stderr)
    try:
        sim.connect(namespace="i2v-bench-adapters", log_to_driver=False, logging_level=logging.WARNING)
        yield f"http://127.0.0.1:{start_serve()}"
    finally:
        try:
            serve.shutdown()
        finally:
            sim.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cache", type=int, default=3, help="adapters a worker keeps (adapter_cache_bytes)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--time-scale", type=float, default=0.02)
    parser.add_argument("--wait", type=float, default=1.0, help="adapter_affinity_wait_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="affinity,plain")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from serving.config import load_settings
    from serving.harness import deploy, undeploy, workers_for

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="i2v-bench-adapters-") as tmp:
        root = Path(tmp)
        metas = register_adapters(root / "adapters", args.adapters, args.seed)
        size = max(m["bytes"] for m in metas)
        trace = make_trace(args.jobs, args.adapters, args.seed)
        results: dict[str, Any] = {}
        with cluster(args.workers) as url:
            for policy in args.policies.split(","):
                work = root / policy
                settings = load_settings({
                    "model": "sim", "sim_time_scale": args.time_scale, "job_db": str(work / "jobs.sqlite3"),
                    "storage_url": f"file://{work / 'outputs'}", "spool_dir": str(work / "spool"),
                    "workers": workers_for({CLASS: args.workers}), "backlog_limit": max(2000, 2 * args.jobs),
                    "adapters_url": str(root / "adapters"), "adapter_cache_bytes": args.cache * size,
                    "adapter_affinity": policy == "affinity", "adapter_affinity_wait_s": args.wait,
                }, env={})
                deploy(settings, url, {CLASS: args.workers}, timeout=300)
                try:
                    results[policy] = run_policy(url, trace, args.steps)
                finally:
                    undeploy()
                print(f"{policy}: {results[policy]}", file=sys.stderr)
    distinct = len(set(trace))
    print(f"\nLoRA affinity: {args.jobs} jobs over {args.adapters} adapters (Zipf 1.1, {distinct} used), "
          f"{args.workers} x {CLASS} workers keeping {args.cache} adapters each, sim x{args.time_scale}\n")
    print(f"{'policy':<10}{'loads':>7}{'hits':>7}{'load s':>9}{'makespan s':>12}{'mean lat s':>12}{'failed':>8}")
    for policy, r in results.items():
        print(f"{policy:<10}{r['loads']:>7}{r['hits']:>7}{r['load_s']:>9.3f}{r['makespan_s']:>12.2f}"
              f"{r['mean_latency_s']:>12.2f}{r['failed']:>8}")
    if "affinity" in results and "plain" in results:
        a, p = results["affinity"]["loads"], results["plain"]["loads"]
        print(f"\naffinity avoided {p - a} of {p} adapter loads ({(p - a) / max(p, 1):.0%}); "
              f"lower bound {distinct} (each used adapter loaded once); wall {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
