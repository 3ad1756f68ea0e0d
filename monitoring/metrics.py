"""The farm's Prometheus metrics: definitions, and the small functions the farm records them with.

Every name starts with `i2v_`, in base units (`_seconds`, `_bytes`), counters end in `_total`.
Labels are bounded: the VRAM class (`vram_class`), `resolution` (512p/768p/1024p), the job
`status`, an attempt's `outcome`, a Serve replica `state`, and for GPU memory the Ray `node`,
its `node_ip` and the `gpu` index. Never a job id.

How they reach Prometheus (the export route), and why this one
----------------------------------------------------------------
All farm metrics are served by the farm's own HTTP endpoint, `GET /metrics` on the ingress
(Prometheus text format 0.0.4): one scrape target, the same address as the API.

- The job manager sees every job event (submission, dispatch, every worker event, retries,
  the end), so it keeps the counters and histograms (`FarmMetrics`), and it knows the live state
  (queues, replicas per state, busy workers, job counts), which it turns into gauges at scrape
  time. Any ingress replica asks it (`JobManager.metrics_text`) and returns the text, so the
  numbers are the same whichever ingress replica is scraped.
- Workers run in Ray actors on GPU nodes, where nothing scrapes them. What only they know (GPU
  memory in use on their GPU, storage uploads that failed) rides to the manager on the events of
  the jobs they run (`WorkerStats.annotate` adds a small `stats` dict to each event; the manager
  turns cumulative counts into counter increments per replica). So worker numbers are as fresh
  as the worker's last job event; an idle worker's GPU memory is the value after its last job.

Ray's own route (`ray.util.metrics` in the actors, exported by each node's metrics agent and
found through `prom_metrics_service_discovery.json`) was checked on this Ray (2.60) with the
simulated cluster and not used for farm metrics:
- Ray renames custom metrics to `ray_<name>` (`ray_i2v_jobs_total`): not our `i2v_` names.
- Each sample carries per-process labels (`WorkerId`, `SessionName`, `Version`, ...), so a
  restarted worker is a new series and queries must aggregate them away.
- Values appear ~10 s after they are recorded (the agent's export interval).
- The service-discovery file is written by Ray's dashboard; a cluster started without it (the
  simulated one, `include_dashboard=False`) has no file, and the default path
  `/tmp/ray/prom_metrics_service_discovery.json` is shared by every Ray cluster on a machine.
Ray's own metrics (Serve, raylet, node GPU memory `ray_node_gram_used`) are still worth
scraping on a real cluster: `monitoring/prometheus/prometheus.yml` has a `ray` job reading that
file (see docs/monitoring.md).

GPU memory in use: on a CUDA worker, the device's used memory (`torch.cuda.mem_get_info`:
total - free, every process on that GPU). A worker with no CUDA device (the simulated cluster's
fake GPUs, a CPU worker) reports 0 bytes used and its class's size as the total: nothing is held
on a GPU there. Per-job peaks (`i2v_job_peak_gpu_memory_bytes`) are what the backend reports:
`torch.cuda.max_memory_allocated` on GPU, the simulated peak for the `sim` model, none on CPU.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from serving.jobs import FailureKind, JobStatus

log = logging.getLogger(__name__)

#: The exposition format `/metrics` answers with (the classic text format every Prometheus reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

GiB = 2**30
RESOLUTIONS = ("512p", "768p", "1024p")
FINISHED = tuple(s.value for s in JobStatus if s.finished)
#: How an attempt on a worker ended (`i2v_job_run_seconds{outcome}`).
OUTCOMES = ("succeeded", FailureKind.OOM.value, FailureKind.ERROR.value, FailureKind.WORKER_DIED.value, "canceled",
            "incomplete")
#: Why a failed attempt is retried (`i2v_job_retries_total{reason}`).
RETRY_REASONS = (FailureKind.OOM.value, FailureKind.WORKER_DIED.value)
REJECT_REASONS = ("no_class_fits", "backlogged")
#: How a webhook POST ended (`i2v_webhook_deliveries_total{outcome}`).
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed")
JOB_STATUSES = tuple(s.value for s in JobStatus)
#: Replica states always exported per class (0 when none), so alerts see a 0, not nothing.
REPLICA_STATES = ("running", "starting")

#: Seconds: sim jobs take a fraction of a second; a 1024p x 32 job on a 12 GB card, most of an hour.
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
#: Seconds a worker spends making one live preview (milliseconds on a GPU, more on a CPU).
PREVIEW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
#: Bytes, on the GiB steps that matter against the class sizes (12, 24, 40, 80 GiB).
MEMORY_BUCKETS = tuple(g * GiB for g in (1, 2, 4, 6, 8, 10, 11, 12, 16, 20, 22, 24, 32, 40, 48, 64, 76, 80, 96))


def _time(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except (TypeError, ValueError):
        return None


class FarmMetrics:
    """The job manager's metrics: one per manager process, with its own registry.

    `classes` is the farm's active VRAM classes (objects with `name` and `memory_bytes`); every
    label combination that can be enumerated is created at 0 up front, so rates and alerts see
    a 0 instead of no series before the first event.
    """

    def __init__(self, classes: Iterable[Any] = ()):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter("i2v_jobs_submitted_total", "Jobs accepted (202), by the class they were placed in.",
                                 ["vram_class", "resolution"], registry=r)
        self.rejected = Counter("i2v_jobs_rejected_total", "Submissions the job manager refused (422 no class fits, "
                                "429 backlog full, ...), by error code.", ["reason"], registry=r)
        self.finished = Counter("i2v_jobs_finished_total", "Jobs that reached succeeded, failed or canceled, by the "
                                "class that ran (or last held) them.", ["vram_class", "resolution", "status"],
                                registry=r)
        self.queue_wait = Histogram("i2v_job_queue_wait_seconds", "Time a job waited in its class's queue before a "
                                    "worker took it (since submission, or since the failure that requeued it).",
                                    ["vram_class"], buckets=WAIT_BUCKETS, registry=r)
        self.run = Histogram("i2v_job_run_seconds", "Time of one attempt on a worker, dispatch to its last event, by "
                             "the class it ran on and how it ended.", ["vram_class", "outcome"], buckets=RUN_BUCKETS,
                             registry=r)
        self.latency = Histogram("i2v_job_latency_seconds", "Submission to success, for succeeded jobs (what a user "
                                 "waits), by the class that ran them.", ["vram_class", "resolution"],
                                 buckets=WAIT_BUCKETS, registry=r)
        self.frames = Counter("i2v_frames_generated_total", "Video frames of succeeded jobs.", ["vram_class"],
                              registry=r)
        self.video_seconds = Counter("i2v_video_generated_seconds_total", "Seconds of video of succeeded jobs "
                                     "(frames / fps).", ["vram_class"], registry=r)
        self.steps = Counter("i2v_denoising_steps_total", "Denoising steps workers completed (every attempt).",
                             ["vram_class"], registry=r)
        self.peak = Histogram("i2v_job_peak_gpu_memory_bytes", "Peak GPU memory of a succeeded job, as its worker "
                              "measured it (simulated for the sim model; none on CPU).", ["vram_class"],
                              buckets=MEMORY_BUCKETS, registry=r)
        self.oom = Counter("i2v_oom_total", "Attempts that ran out of GPU memory, by the class that ran out.",
                           ["vram_class"], registry=r)
        self.retries = Counter("i2v_job_retries_total", "Failed attempts that were queued again, by the class the "
                               "attempt failed on and why.", ["vram_class", "reason"], registry=r)
        self.storage_failures = Counter("i2v_storage_upload_failures_total", "Result uploads to storage that failed "
                                        "(each try), as workers report them.", ["vram_class"], registry=r)
        self.previews = Counter("i2v_previews_total", "Live previews workers sent while jobs denoised.",
                                ["vram_class"], registry=r)
        self.preview_seconds = Histogram("i2v_preview_seconds", "Worker time to make one live preview (latent "
                                         "-> RGB strip, JPEG), inside the denoising loop.", ["vram_class"],
                                         buckets=PREVIEW_BUCKETS, registry=r)
        # result reuse and webhooks (issue 18)
        self.reused = Counter("i2v_jobs_reused_total", "Jobs answered with the stored result of an earlier identical "
                              "job (no GPU ran), by the class of that job.", ["vram_class"], registry=r)
        self.reuse_saved = Counter("i2v_reuse_gpu_seconds_saved_total", "GPU seconds (render + encode) of the "
                                   "earlier jobs whose results were reused.", ["vram_class"], registry=r)
        self.webhooks = Counter("i2v_webhook_deliveries_total", "Webhook POST attempts, by how they ended "
                                "(delivered, retried, failed: given up).", ["outcome"], registry=r)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks.labels(outcome)
        # LoRA adapters (issue 18): a job's adapters already loaded on its worker (hit) or loaded now
        self.adapter_hits = Counter("i2v_adapter_cache_hits_total", "LoRA adapters a job needed that its worker "
                                    "held already, by the class that ran it.", ["vram_class"], registry=r)
        self.adapter_misses = Counter("i2v_adapter_cache_misses_total", "LoRA adapters a worker had to load for a "
                                      "job, by the class that ran it.", ["vram_class"], registry=r)
        self.adapter_load = Counter("i2v_adapter_load_seconds_total", "Seconds workers spent loading LoRA "
                                    "adapters (cache misses), by class.", ["vram_class"], registry=r)
        self._lock = threading.Lock()
        self._memory: dict[str, int] = {}
        self._requeued_at: dict[str, float] = {}
        self._gpus: dict[tuple[str, str], dict[str, Any]] = {}
        self._worker_failures: dict[str, int] = {}
        self.setup(classes)

    def setup(self, classes: Iterable[Any]) -> None:
        for c in classes:
            self._memory[c.name] = int(c.memory_bytes)
            for res in RESOLUTIONS:
                self.submitted.labels(c.name, res)
                self.latency.labels(c.name, res)
                for status in FINISHED:
                    self.finished.labels(c.name, res, status)
            for outcome in OUTCOMES:
                self.run.labels(c.name, outcome)
            for reason in RETRY_REASONS:
                self.retries.labels(c.name, reason)
            for metric in (self.queue_wait, self.frames, self.video_seconds, self.steps, self.peak, self.oom,
                           self.storage_failures, self.previews, self.preview_seconds, self.adapter_hits,
                           self.adapter_misses, self.adapter_load):
                metric.labels(c.name)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    # --- job events (the job manager calls these) -------------------------------------------

    def job_submitted(self, vram_class: str, resolution: str) -> None:
        self.submitted.labels(vram_class, resolution).inc()

    def job_reused(self, vram_class: str, gpu_seconds: float) -> None:
        """A request was answered with an earlier job's result, saving `gpu_seconds`."""
        self.reused.labels(vram_class).inc()
        self.reuse_saved.labels(vram_class).inc(max(0.0, float(gpu_seconds)))

    def webhook_attempt(self, outcome: str) -> None:
        """One webhook POST ended: `delivered`, `retried` or `failed` (given up)."""
        self.webhooks.labels(outcome if outcome in WEBHOOK_OUTCOMES else "failed").inc()

    def job_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def job_started(self, job_id: str, queue_class: str, created_at: str | None) -> None:
        """A worker took the job from `queue_class`'s queue."""
        with self._lock:
            since = self._requeued_at.pop(job_id, None)
        since = since or _time(created_at) or time.time()
        self.queue_wait.labels(queue_class).observe(max(0.0, time.time() - since))

    def attempt_ended(self, vram_class: str, kind: str | None, seconds: float) -> None:
        """One attempt ended; `kind` as the manager names it (done, oom, error, worker_died, canceled, None)."""
        outcome = {"done": "succeeded", None: "incomplete"}.get(kind, kind)
        self.run.labels(vram_class, outcome if outcome in OUTCOMES else "error").observe(max(0.0, seconds))

    def attempt_failed(self, job_id: str, vram_class: str, kind: str, retried: bool) -> None:
        """A failed attempt (`kind`: oom, worker_died, error) on `vram_class`, and whether it is retried."""
        if kind == FailureKind.OOM:
            self.oom.labels(vram_class).inc()
        if retried:
            self.retries.labels(vram_class, kind).inc()
            with self._lock:
                self._requeued_at[job_id] = time.time()

    def job_finished(self, record: Mapping[str, Any] | None) -> None:
        """The job record once it is succeeded, failed or canceled."""
        if not record or record.get("status") not in FINISHED:
            return
        with self._lock:
            self._requeued_at.pop(record.get("id"), None)
        vram_class = record.get("vram_class") or "unknown"
        resolution = str((record.get("params") or {}).get("resolution") or "unknown")
        self.finished.labels(vram_class, resolution, record["status"]).inc()
        if record["status"] != JobStatus.SUCCEEDED:
            return
        created, finished = _time(record.get("created_at")), _time(record.get("finished_at"))
        if created and finished:
            self.latency.labels(vram_class, resolution).observe(max(0.0, finished - created))
        result = record.get("result") or {}
        frames = int(result.get("frames") or 0)
        self.frames.labels(vram_class).inc(frames)
        if frames and result.get("fps"):
            self.video_seconds.labels(vram_class).inc(frames / float(result["fps"]))
        if record.get("peak_vram_bytes"):
            self.peak.labels(vram_class).observe(int(record["peak_vram_bytes"]))

    def adapter_loads(self, vram_class: str, hits: int, misses: int, load_seconds: float) -> None:
        """A job's LoRA adapters: `hits` held by its worker already, `misses` loaded in `load_seconds`."""
        self.adapter_hits.labels(vram_class).inc(max(0, int(hits)))
        self.adapter_misses.labels(vram_class).inc(max(0, int(misses)))
        self.adapter_load.labels(vram_class).inc(max(0.0, float(load_seconds)))

    def preview_sent(self, vram_class: str, seconds: float) -> None:
        """A worker sent a live preview that took it `seconds` to make."""
        self.previews.labels(vram_class).inc()
        self.preview_seconds.labels(vram_class).observe(max(0.0, float(seconds)))

    def worker_event(self, vram_class: str, event: Mapping[str, Any], steps: int = 1) -> None:
        """Every event a worker streams: progress counts `steps` denoising steps (workers coalesce
        progress, so the caller passes the steps since the attempt's previous progress event);
        `stats` (see `WorkerStats`) updates the GPU memory gauges and the worker's storage failures."""
        if event.get("event") == "progress" and steps > 0:
            self.steps.labels(vram_class).inc(steps)
        stats = event.get("stats")
        if not isinstance(stats, Mapping):
            return
        with self._lock:
            if stats.get("node") is not None:
                self._gpus[(str(stats["node"]), str(stats.get("gpu", "")))] = {
                    "vram_class": vram_class, "node_ip": str(stats.get("node_ip") or ""),
                    "used": int(stats.get("gpu_memory_used_bytes") or 0),
                    "total": int(stats.get("gpu_memory_total_bytes") or 0),
                }
            replica = str(stats.get("replica") or stats.get("node"))
            count = int(stats.get("storage_upload_failures") or 0)
            last = self._worker_failures.get(replica, 0)
            self._worker_failures[replica] = count
        if count > last:
            self.storage_failures.labels(vram_class).inc(count - last)

    # --- scrape -----------------------------------------------------------------------------

    def render(self, cluster: Mapping[str, Any], replica_states: Mapping[str, Mapping[str, int]] | None = None,
               alive_nodes: Iterable[str] | None = None) -> bytes:
        """The exposition text: the counters and histograms, plus gauges of the live state.

        `cluster` is the job manager's cluster view (`classes` with `replicas`, `busy`, `queued`;
        `jobs` counts by status); `replica_states` Serve's replica counts per class and state;
        `alive_nodes` the Ray node ids alive now (GPU memory of other nodes is dropped; None:
        asks Ray when this process is connected to it).
        """
        snapshot = _Snapshot(self._families(cluster, replica_states or {}, alive_nodes))
        live = CollectorRegistry(auto_describe=False)
        live.register(snapshot)
        return generate_latest(self.registry) + generate_latest(live)

    def _families(self, cluster, replica_states, alive_nodes) -> list[GaugeMetricFamily]:
        queue = GaugeMetricFamily("i2v_queue_depth", "Jobs waiting in each class's queue.", labels=["vram_class"])
        busy = GaugeMetricFamily("i2v_workers_busy", "Worker replicas running a job.", labels=["vram_class"])
        replicas = GaugeMetricFamily("i2v_worker_replicas", "Worker replicas per class and Serve replica state "
                                     "(running = healthy and serving).", labels=["vram_class", "state"])
        rmin = GaugeMetricFamily("i2v_worker_replicas_min", "Configured minimum replicas.", labels=["vram_class"])
        rmax = GaugeMetricFamily("i2v_worker_replicas_max", "Configured maximum replicas.", labels=["vram_class"])
        memory = GaugeMetricFamily("i2v_vram_class_memory_bytes", "GPU memory a class's jobs may plan for.",
                                   labels=["vram_class"])
        for c in cluster.get("classes", []):
            name = c["name"]
            queue.add_metric([name], c.get("queued", 0))
            busy.add_metric([name], c.get("busy", 0))
            scaling = c.get("replicas", {})
            rmin.add_metric([name], scaling.get("min", 0))
            rmax.add_metric([name], scaling.get("max", 0))
            mem = self._memory.get(name) or int(float(c.get("memory_gib", 0)) * GiB)
            memory.add_metric([name], mem)
            states = {str(k).lower(): v for k, v in (replica_states.get(name) or {}).items()}
            states.setdefault("running", scaling.get("running", 0))
            states.setdefault("starting", scaling.get("starting", 0))
            for state in sorted(states):
                replicas.add_metric([name, state], states[state])
        jobs = GaugeMetricFamily("i2v_jobs", "Jobs in the job store by status (durable: survives restarts).",
                                 labels=["status"])
        counts = cluster.get("jobs") or {}
        for status in sorted(set(JOB_STATUSES) | set(counts)):
            jobs.add_metric([status], counts.get(status, 0))
        used = GaugeMetricFamily("i2v_gpu_memory_used_bytes", "GPU memory in use on a worker's GPU as of its last "
                                 "job event (0 where there is no CUDA device, e.g. simulated GPUs).",
                                 labels=["vram_class", "node", "node_ip", "gpu"])
        total = GaugeMetricFamily("i2v_gpu_memory_total_bytes", "Memory of a worker's GPU (the class's size where "
                                  "the GPU is simulated).", labels=["vram_class", "node", "node_ip", "gpu"])
        alive = set(alive_nodes) if alive_nodes is not None else _alive_ray_nodes()
        with self._lock:
            if alive is not None:
                for key in [k for k in self._gpus if k[0] not in alive]:
                    del self._gpus[key]
            gpus = sorted(self._gpus.items())
        for (node, gpu), g in gpus:
            labels = [g["vram_class"], node, g["node_ip"], gpu]
            used.add_metric(labels, g["used"])
            total.add_metric(labels, g["total"])
        return [queue, busy, replicas, rmin, rmax, memory, jobs, used, total]


class _Snapshot:
    """A one-shot collector for the gauges computed at scrape time (no stale label sets)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


def _alive_ray_nodes() -> set[str] | None:
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 - a scrape must not fail because the GCS is slow
        log.debug("could not list Ray nodes", exc_info=True)
    return None


def _gpu_id() -> str:
    """The GPU Ray gave this actor: its id on the node (`ray.get_gpu_ids`). On a node whose GPUs
    are only counted (the simulated cluster sets CUDA_VISIBLE_DEVICES="", so Ray maps its slot to
    no device), the slot Ray assigned, read from the core worker (private; "0" if that fails)."""
    import ray

    gpus = ray.get_gpu_ids()
    if gpus:
        return str(gpus[0])
    try:
        slots = ray._private.worker.global_worker.core_worker.resource_ids().get("GPU") or []
        return str(slots[0][0]) if slots else "0"
    except Exception:  # noqa: BLE001
        return "0"


class WorkerStats:
    """What a worker replica knows about itself, attached to each event it streams (`stats`).

    The job manager turns it into `i2v_gpu_memory_used_bytes` / `_total_bytes` for this node
    and GPU and into `i2v_storage_upload_failures_total` (the count here is cumulative, so a
    lost or repeated event does not miscount).
    """

    def __init__(self, memory_bytes: int, node: str | None = None, node_ip: str | None = None,
                 gpu: str | None = None, replica: str | None = None):
        self.memory_bytes = int(memory_bytes)
        self.node, self.node_ip, self.gpu, self.replica = node, node_ip, gpu, replica
        self.storage_upload_failures = 0
        self._lock = threading.Lock()

    @classmethod
    def for_ray_actor(cls, memory_bytes: int) -> "WorkerStats":
        """Node, node IP, GPU id and actor name from Ray's runtime context (inside a worker)."""
        import ray

        ctx = ray.get_runtime_context()
        return cls(memory_bytes, node=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
                   gpu=_gpu_id(), replica=ctx.get_actor_name())

    def storage_upload_failed(self, *_args: Any) -> None:
        """Count one failed upload try (usable as an uploader's `on_failure(job_id, exc)`)."""
        with self._lock:
            self.storage_upload_failures += 1

    def gpu_memory(self) -> tuple[int, int]:
        """(used, total) bytes of this process's GPU; (0, class size) without a CUDA device."""
        torch = sys.modules.get("torch")  # never import torch (or initialise CUDA) just for this
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                free, total = torch.cuda.mem_get_info()
                return int(total - free), int(total)
        except Exception:  # noqa: BLE001 - numbers for a dashboard must not fail a job
            log.debug("cuda memory query failed", exc_info=True)
        return 0, self.memory_bytes

    def snapshot(self) -> dict[str, Any]:
        used, total = self.gpu_memory()
        return {"node": self.node, "node_ip": self.node_ip, "gpu": self.gpu, "replica": self.replica,
                "gpu_memory_used_bytes": used, "gpu_memory_total_bytes": total,
                "storage_upload_failures": self.storage_upload_failures}

    def annotate(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event with this worker's `stats` added (returned for `yield stats.annotate(...)`)."""
        event["stats"] = self.snapshot()
        return event
