"""`FarmClient`, the one client of the farm's HTTP API (stdlib only), and the commands built on it
(`i2v-farm submit`, `status`, `cancel`). The batch runner (`serving.batch`), the harness's
readiness wait (`serving.harness`), the benches and the integration tests' `Farm` use it too.

    i2v-farm submit --image cat.png --prompt "A cat turning its head" --wait
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.cli import SAMPLE_PROMPT, add_request_arguments, request_fields, sample_image_path
from pipeline.errors import I2VError

from .jobs import FINISHED, JobStatus

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = FINISHED  # serving.jobs: the one definition


class FarmClientError(I2VError):
    code = "client_error"


#: Headers that carry a credential: never sent along a redirect to another origin.
CREDENTIAL_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")


def same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port (an http -> https upgrade is another origin too)."""
    from urllib.parse import urlsplit

    def origin(url: str):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            return None
        default_port = {"http": 80, "https": 443}.get(parts.scheme)
        return parts.scheme.lower(), (parts.hostname or "").lower(), port or default_port

    oa = origin(a)
    return oa is not None and oa == origin(b)


class CredentialSafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but drops the token (and cookies) when one leads to another origin: the
    farm's `GET /v1/jobs/{id}/video` answers 307 to a presigned S3 URL, whose host must not see it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not same_origin(req.full_url, new.full_url):
            for name in CREDENTIAL_HEADERS:
                new.remove_header(name)
        return new


class Reply:
    """One answer of the farm: `status`, `payload` (the JSON it carried, decoded; else the bytes),
    `headers` (case-insensitive), `body` (the bytes). Unpacks as `(status, payload, headers)`;
    `status_code`, `json()` and `text` read as `requests`' do."""

    __slots__ = ("status", "payload", "headers", "body")

    def __init__(self, status: int, payload: Any, headers: Any, body: bytes):
        self.status, self.payload, self.headers, self.body = status, payload, headers, body

    def __iter__(self):
        return iter((self.status, self.payload, self.headers))

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.text[:200]!r})"

    @property
    def status_code(self) -> int:
        return self.status

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return self.payload if not isinstance(self.payload, bytes) else json.loads(self.body)


class FarmClient:
    """The farm's HTTP API: `request` answers every status as a `Reply`; `call` returns the payload
    of a success and raises `FarmClientError` (the farm's code, message and field) otherwise."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60, token: str | None = None):
        """`token` (default: $I2V_TOKEN) is sent as `Authorization: Bearer` when the farm wants one."""
        self.token = token if token is not None else os.environ.get("I2V_TOKEN") or None
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(CredentialSafeRedirects)

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        """`method path` with `body` as JSON; a `Reply` whatever the status (`FarmClientError` only
        when the farm cannot be reached)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.token}"} if self.token else {}),
                                              **(headers or {})})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
                status, hdrs = resp.status, resp.headers
        except urllib.error.HTTPError as exc:
            raw, status, hdrs = exc.read(), exc.code, exc.headers
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # no (whole) answer
            reason = getattr(exc, "reason", exc)
            raise FarmClientError(
                f"cannot reach the farm at {self.url}: {reason} (is `i2v-farm up` running?)") from None
        ctype = hdrs.get("content-type", "")  # an http.client message: names are case-insensitive
        payload = json.loads(raw) if ctype.startswith("application/json") else raw
        return Reply(status, payload, hdrs, raw)

    def call(self, method: str, path: str, body: dict | None = None, headers=None) -> Any:
        status, payload, hdrs = self.request(method, path, body, headers)
        if status >= 400:
            err = payload.get("error", {}) if isinstance(payload, dict) else {}
            message = err.get("message") or f"HTTP {status}"
            if status == 429 and "Retry-After" in hdrs:
                message += f" (retry after {hdrs['Retry-After']} s)"
            raise FarmClientError(message, field=err.get("field"), code=err.get("code", "http_error"))
        return payload

    def submit(self, image: bytes, fields: dict[str, Any], idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", "/v1/jobs", {**fields, "image": base64.b64encode(image).decode()}, headers)

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/v1/jobs/{job_id}")

    def video(self, job_id: str) -> bytes:
        return self.call("GET", f"/v1/jobs/{job_id}/video")

    def wait(self, job_id: str, on_update=None, poll_s: float = 0.5) -> dict:
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll_s)


def add_commands(subparsers) -> None:
    sub = subparsers.add_parser("submit", help="send a job to a running farm",
                                description="Send an image and a prompt to a running farm (`i2v-farm up`).")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="input image (JPG, PNG or WEBP)")
    source.add_argument("--sample", action="store_true", help="use the bundled sample image and prompt")
    sub.add_argument("--prompt", help="what should move, and how")
    sub.add_argument("--negative-prompt", dest="negative_prompt", help="what to avoid")
    add_request_arguments(sub)
    sub.add_argument("--priority", choices=("low", "normal", "high"), help="queue priority (default normal)")
    sub.add_argument("--url", default=os.environ.get("I2V_URL", DEFAULT_URL),
                     help=f"farm URL (default {DEFAULT_URL}, env I2V_URL)")
    sub.add_argument("--wait", action="store_true", help="wait with a progress bar and download the MP4")
    sub.add_argument("--out", default=".", help="directory for the MP4 with --wait (default: here)")
    sub.add_argument("--idempotency-key", help="retrying with the same key never makes a second job")
    sub.add_argument("--webhook", metavar="URL", help="https URL the farm POSTs the job to when it ends "
                     "(signed; docs/webhooks.md)")
    sub.add_argument("--webhook-events", dest="webhook_events", metavar="EVENTS",
                     help="which endings call the webhook: succeeded,failed,canceled or all (default all)")
    sub.add_argument("--no-reuse", dest="reuse", action="store_false", default=None,
                     help="render even when an identical earlier job (same image, settings and seed) succeeded")
    sub.add_argument("--no-preview", dest="preview", action="store_false", default=None,
                     help="no live previews for this job (the video is the same either way)")
    sub.set_defaults(func=cmd_submit)

    st = subparsers.add_parser("status", help="show a job (or the farm) of a running farm")
    st.add_argument("job_id", nargs="?", help="job id (none: the cluster's classes and queues)")
    st.add_argument("--url", default=os.environ.get("I2V_URL", DEFAULT_URL))
    st.set_defaults(func=cmd_status)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--url", default=os.environ.get("I2V_URL", DEFAULT_URL))
    cancel.set_defaults(func=cmd_cancel)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.sample:
        path, prompt = sample_image_path(), args.prompt or SAMPLE_PROMPT
    else:
        path, prompt = Path(args.image), args.prompt
        if not prompt:
            raise FarmClientError("--prompt is required with --image", field="prompt")
    try:
        image = path.read_bytes()
    except OSError as exc:
        raise FarmClientError(f"cannot read {path}: {exc.strerror}", field="image") from None
    fields = request_fields(args, names=("negative_prompt", "preset", "resolution", "num_frames", "fps", "target_fps",
                                         "num_inference_steps", "guidance_scale", "seed", "scheduler", "priority"))
    fields["prompt"] = prompt
    fields.update({k: v for k in ("webhook", "webhook_events", "reuse", "preview")
                   if (v := getattr(args, k, None)) is not None})
    client = FarmClient(args.url)
    job = client.submit(image, fields, args.idempotency_key)
    est = job["estimate"]
    print(f"job {job['id']} {job['status']} on class {job['vram_class']} "
          f"(estimate: {est['vram_bytes'] / 2**30:.1f} GiB, {est['seconds']:.0f} s on that GPU)"
          + (f"; reused the result of job {job['reused_from']}" if job.get("reused_from") else ""))
    if not args.wait:
        print(f"follow it: i2v-farm status {job['id']}   or   {args.url}{job['links']['self']}")
        return 0
    job = _wait_with_bar(client, job)
    if job["status"] != JobStatus.SUCCEEDED:
        err = job.get("error") or {}
        print(f"job {job['id']} {job['status']}: {err.get('message', '')}", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = (out_dir / f"video_{job['id'][:8]}.mp4").resolve()
    dest.write_bytes(client.video(job["id"]))
    r = job["result"]
    print(f"{r['width']}x{r['height']}, {r['frames']} frames at {r['fps']} fps on {job['vram_class']} "
          f"in {job['timings'].get('total', 0):.1f} s")
    print(dest)
    return 0


def _wait_with_bar(client: FarmClient, job: dict) -> dict:
    from tqdm import tqdm

    total = job["params"]["num_inference_steps"]
    with tqdm(total=total, desc="queued", unit="step", disable=False, file=sys.stderr) as bar:
        def update(j: dict) -> None:
            bar.set_description(f"{j['status']} on {j['vram_class']}")
            step = (j.get("progress") or {}).get("step") or 0
            if step > bar.n:
                bar.update(step - bar.n)
            elif step < bar.n:  # a retry starts over
                bar.reset(total=total)
                bar.update(step)
        return client.wait(job["id"], update)


def cmd_status(args: argparse.Namespace) -> int:
    client = FarmClient(args.url)
    if args.job_id:
        print(json.dumps(client.job(args.job_id), indent=2))
        return 0
    info = client.call("GET", "/v1/cluster")
    print(f"model {info['model']}; queued {info['queue_depth']}, running {info['running']}")
    for c in info["classes"]:
        r = c["replicas"]
        workers = c.get("workers") or []
        threads = sorted({w.get("threads") for w in workers if w.get("threads")})
        print(f"  {c['name']:>6}: {r['running']} replicas running ({r['min']}-{r['max']}), "
              f"{c['busy']} busy, {c['queued']} queued"
              + (f"; cpu threads {'/'.join(str(t) for t in threads)}" if threads else ""))
        for w in workers:
            print(f"          {worker_line(w)}")
    return 0


THREAD_RULES = {"worker_threads": "set by worker_threads", "auto_gpu": "auto: GPU worker, worker_cpus"}


def worker_line(w: dict[str, Any]) -> str:
    """One worker replica of `GET /v1/cluster`: device, CPU threads and why, CUDA allocator config."""
    name = str(w.get("replica") or "?").split("::")[-1].split("#", 1)[-1]  # Worker_12gb#abc123
    rule = w.get("threads_rule")
    why = THREAD_RULES.get(rule) or (f"auto: no GPU, the node's {w.get('node_cores')} cores" if rule == "auto_cpu"
                                     else str(rule))
    line = f"{name}: {w.get('device')}, {w.get('threads')} cpu threads ({why}), node {str(w.get('node') or '?')[:8]}"
    if w.get("cuda_alloc_conf"):
        line += f", PYTORCH_CUDA_ALLOC_CONF={w['cuda_alloc_conf']} (from {w.get('cuda_alloc_conf_from')})"
    return line


def cmd_cancel(args: argparse.Namespace) -> int:
    job = FarmClient(args.url).call("POST", f"/v1/jobs/{args.job_id}/cancel")
    print(f"job {job['id']} {job['status']}")
    return 0
