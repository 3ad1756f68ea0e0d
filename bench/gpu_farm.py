"""The farm on a real GPU, as a user starts it: `i2v-farm up` on this machine's GPU with the
full-size I2VGen-XL architecture, jobs over HTTP, against the same job rendered in-process.

    python -m bench.gpu_farm [--out DIR] [--model-dir DIR] [--repeat 2] [--concurrent 3]
                             [--resolution 512p] [--frames 16] [--steps 50] [--budget-s 420]

One run, in this order:

1. saves the full-size architecture (`pipeline.architecture.FULL_SIZE`, seeded random weights,
   fp16 safetensors) with `save_pretrained` unless `--model-dir` already holds a model, so the
   farm loads it through the normal diffusers path (`pipeline.loading`);
2. starts `python -m serving.cli up --model DIR` (what `i2v-farm up` runs): class detection by
   nvidia-smi, a local Ray with token authentication, Serve, HTTP on 127.0.0.1; waits for
   `/readyz`;
3. sends the job `--repeat` times, one after the other, then `--concurrent` jobs at once (they
   queue for the one GPU), each through `POST /v1/jobs` and polled to the end; reads each
   job's `params.json` (peak VRAM, timings) from the result store;
4. stops the farm and runs the same job `--repeat` times in-process with the worker's own
   backend (`serving.backends.ModelBackend`: generate + MP4 + params.json + poster);
5. prints and writes `gpu-farm-serving-<gpu>.json`: the farm's seconds per job (POST to
   `finished_at`), queue and worker seconds, peak VRAM, the class and node the job ran on, the
   in-process seconds, and the farm's added seconds and percent.

It needs a GPU (it refuses to run without one) and is not a test. The farm's stdout goes to
`farm.log` under `--out`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Sequence

TERMINAL = ("succeeded", "failed", "canceled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_full_model(target: Path) -> float:
    """The full-size architecture with seeded random weights, saved as a diffusers directory (fp16)."""
    import torch
    from diffusers import I2VGenXLPipeline

    from pipeline.architecture import FULL_SIZE, build_components

    if (target / "model_index.json").is_file():
        return 0.0
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        components = build_components(FULL_SIZE)
    pipe = I2VGenXLPipeline(**components).to(dtype=torch.float16)
    pipe.save_pretrained(target, safe_serialization=True)
    del pipe, components
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def job_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": "a lighthouse on a cliff, waves rolling in", "resolution": args.resolution,
            "num_frames": args.frames, "num_inference_steps": args.steps, "seed": 1234,
            "reuse": False}  # the same request each time: render it, never answer with the stored result


def image_bytes() -> bytes:
    from bench.generation import SAMPLE_IMAGE
    from bench.scheduler import png_bytes

    return SAMPLE_IMAGE.read_bytes() if SAMPLE_IMAGE.is_file() else png_bytes(512)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class FarmProcess:
    """`i2v-farm up` in a child process, stopped with SIGTERM as Ctrl-C would."""

    def __init__(self, model_dir: Path, workdir: Path, log: Path, ready_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        env = dict(os.environ, I2V_JOB_DB=str(workdir / "jobs.sqlite3"),
                   I2V_STORAGE_URL=f"file://{workdir / 'outputs'}", I2V_SPOOL_DIR=str(workdir / "spool"))
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "up", "--model", str(model_dir), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.ready_s = self._wait_ready(ready_s)

    def _wait_ready(self, limit: float) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the farm exited with status {self.proc.returncode} (see farm.log)")
            try:
                _http("GET", self.url + "/readyz", timeout=5)  # 200 once every class has its replicas
                return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"the farm was not ready after {limit:.0f} s (see farm.log)")

    def submit(self, data: bytes, fields: dict[str, Any]) -> tuple[str, float]:
        t0 = time.time()
        job = _http("POST", self.url + "/v1/jobs", {**fields, "image": base64.b64encode(data).decode()})
        return job["id"], t0

    def wait(self, job_id: str, t0: float, limit: float) -> dict[str, Any]:
        while True:
            job = _http("GET", f"{self.url}/v1/jobs/{job_id}")
            if job["status"] in TERMINAL:
                break
            if time.time() - t0 > limit:
                raise RuntimeError(f"job {job_id} still {job['status']} after {limit:.0f} s")
            time.sleep(0.2)
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        return self._row(job, t0)

    def _row(self, job: dict[str, Any], t0: float) -> dict[str, Any]:
        created, started, finished = (_epoch(job[k]) for k in ("created_at", "started_at", "finished_at"))
        record = self._params(job)
        worker = float(job["timings"]["total"])
        return {"id": job["id"], "vram_class": job.get("vram_class"), "node": job.get("node"),
                "seconds": finished - t0, "queue_s": started - created, "worker_s": worker,
                "rest_s": (finished - started) - worker, "timings": job["timings"],
                "peak_vram_bytes": job.get("peak_vram_bytes"),
                "params_peak_vram_bytes": record.get("peak_vram_bytes"),
                "video_bytes": (job.get("result") or {}).get("bytes")}

    def _params(self, job: dict[str, Any]) -> dict[str, Any]:
        found = list((self.workdir / "outputs").rglob(f"*{job['id']}*/params.json")) or \
            [p for p in (self.workdir / "outputs").rglob("params.json") if job["id"] in p.read_text()]
        return json.loads(found[0].read_text()) if found else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def in_process(model_dir: Path, workdir: Path, data: bytes, fields: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The worker's own backend in this process: load time, then `repeat` jobs after one warm-up."""
    from cluster.gpus import detect_gpus
    from cluster.vram_classes import default_classes
    from pipeline.request import parse_params
    from serving.backends import ModelBackend
    from serving.config import load_settings

    classes = default_classes()
    gpus = detect_gpus()
    vram_class = (classes.for_memory(gpus[0].memory_bytes) if gpus else None) or classes.classes[-1]
    started = time.perf_counter()
    backend = ModelBackend(load_settings({"model": str(model_dir)}, env={}), vram_class)
    load_s = time.perf_counter() - started
    rows = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        params = parse_params({k: v for k, v in fields.items() if k != "reuse"})  # reuse: a farm field
        result = backend.run(uuid.uuid4().hex, data, params, workdir / f"inproc{i}",
                             lambda *_: None, lambda: False)
        rows.append({"seconds": time.perf_counter() - t0, "timings": result.record["timings"],
                     "peak_vram_bytes": result.record.get("peak_vram_bytes"), "warm_up": i == 0})
    return {"load_s": load_s, "rows": rows}


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and not r.get("warm_up")]
    return statistics.median(values) if values else float("nan")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_farm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="where the JSON and farm.log go")
    p.add_argument("--model-dir", default="/tmp/i2v-full-random", help="full-size random model (made if absent)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--concurrent", type=int, default=3)
    p.add_argument("--resolution", default="512p")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ready-s", type=float, default=240, help="longest wait for the farm to be ready")
    p.add_argument("--smoke", action="store_true",
                   help="check the bench itself without a GPU: tiny-random model, 8 frames x 2 steps at 512p")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.smoke:
        args.model_dir, args.frames, args.steps, args.repeat, args.concurrent = "tiny-random", 8, 2, 1, 2
    elif not torch.cuda.is_available():
        print("bench.gpu_farm needs a CUDA GPU (--smoke checks the bench on the CPU)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu-smoke"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    dest = out / f"gpu-farm-serving-{slug}.json"
    result: dict[str, Any] = {"gpu": gpu, "job": job_fields(args), "farm": {}, "in_process": {}}

    def save() -> None:
        dest.write_text(json.dumps(result, indent=2) + "\n")

    model_dir = Path(args.model_dir)
    result["model_save_s"] = 0.0 if args.smoke else save_full_model(model_dir)
    print(f"model: {model_dir} (saved in {result['model_save_s']:.1f} s)", flush=True)
    data, fields = image_bytes(), job_fields(args)
    work = Path("/tmp") / f"gpu-farm-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    farm = None
    try:
        farm = FarmProcess(model_dir, work, out / "farm.log", args.ready_s)
        result["farm"]["ready_s"] = farm.ready_s
        print(f"farm ready in {farm.ready_s:.1f} s at {farm.url}", flush=True)
        info = _http("GET", farm.url + "/v1/cluster")
        result["farm"]["cluster"] = info
        rows = []
        for i in range(args.repeat + 1):  # the first is the worker's warm-up (lazy CUDA init, cuDNN plans)
            job_id, t0 = farm.submit(data, fields)
            row = farm.wait(job_id, t0, limit=600)
            row["warm_up"] = i == 0
            rows.append(row)
            print(f"farm job {i}: {row['seconds']:.2f} s (queue {row['queue_s']:.2f}, worker {row['worker_s']:.2f}, "
                  f"rest {row['rest_s']:.2f}) on {row['vram_class']} peak "
                  f"{(row['params_peak_vram_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
            result["farm"]["sequential"] = rows
            save()
        submitted = [farm.submit(data, {**fields, "seed": 100 + k}) for k in range(args.concurrent)]
        burst = [farm.wait(job_id, t0, limit=900) for job_id, t0 in submitted]
        result["farm"]["concurrent"] = burst
        print("concurrent: " + ", ".join(f"{r['seconds']:.1f} s (queued {r['queue_s']:.1f})" for r in burst),
              flush=True)
        save()
    finally:
        if farm is not None:
            farm.stop()
    result["in_process"] = in_process(model_dir, work, data, fields, args.repeat)
    farm_s, local_s = _median(result["farm"]["sequential"], "seconds"), _median(result["in_process"]["rows"], "seconds")
    result["summary"] = {"farm_s": farm_s, "in_process_s": local_s, "added_s": farm_s - local_s,
                         "added_percent": 100 * (farm_s - local_s) / local_s,
                         "farm_queue_s": _median(result["farm"]["sequential"], "queue_s"),
                         "farm_rest_s": _median(result["farm"]["sequential"], "rest_s")}
    save()
    s = result["summary"]
    print(f"{gpu}: farm {farm_s:.2f} s/job vs in-process {local_s:.2f} s/job: +{s['added_s']:.2f} s "
          f"({s['added_percent']:+.1f} %); queue {s['farm_queue_s']:.2f} s, after-render {s['farm_rest_s']:.2f} s",
          flush=True)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
