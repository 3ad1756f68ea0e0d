"""The entry point, `python -m serving.batch MANIFEST` (as `ray job submit -- python -m
serving.batch ...` or directly): arguments, the farm's settings and storage from the environment,
SIGTERM/SIGINT, exit codes.

Design: docs/design/batch.md ("Exit code").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..client import DEFAULT_URL, FarmClient
from ..egress import EgressPolicy
from ..files import apply_umask
from .common import EXIT_USAGE, MIN_POLL_S, UsageError
from .manifest import read_manifest
from .runner import run_batch


def batch_settings(env: dict[str, str] | None = None):
    """The farm's settings as the batch reads them (`I2V_*` of the job's runtime environment,
    `I2V_CONFIG`): storage, `egress_allow` (`I2V_EGRESS_ALLOW`), `file_mode`."""
    from ..config import load_settings

    try:
        return load_settings(env=dict(os.environ if env is None else env))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def open_batch_storage(env: dict[str, str] | None = None, settings: Any = None):
    """The farm's storage, from the same settings the farm reads (`I2V_STORAGE_URL`, `I2V_S3_*`)."""
    from ..storage import StorageUnavailable, open_storage

    env = dict(os.environ if env is None else env)
    try:
        settings = settings or batch_settings(env)
        url = settings.storage_url
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in env and url.startswith("file://") \
                and not Path(url[len("file://"):]).expanduser().is_absolute():
            raise UsageError(
                f"storage is {url}, relative to this Ray job's temporary working directory: the summary "
                "would be lost. Pass the farm's storage to the job, e.g. --runtime-env-json "
                "'{\"env_vars\": {\"I2V_STORAGE_URL\": \"s3://BUCKET\", ...}}'")
        storage = open_storage(settings)
        storage.ensure_ready()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except StorageUnavailable as exc:
        raise UsageError(f"storage is unreachable: {exc}") from None
    return storage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.batch",
        description="Render every row of a manifest (JSON Lines or CSV: image, prompt, request fields) through "
                    "the running farm; resumable, with a summary in the farm's storage.",
        epilog="As a Ray job: ray job submit --working-dir . -- python -m serving.batch manifest.jsonl")
    p.add_argument("manifest", help="JSON Lines (.jsonl) or CSV (.csv) file, relative to the working directory")
    p.add_argument("--out", metavar="PREFIX",
                   help="storage key prefix for the summary (default batches/<manifest stem>/)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="rows in flight on the farm at once (default 4)")
    p.add_argument("--priority", choices=("low", "normal", "high"),
                   help="queue priority of rows that name none (default: the farm's, normal)")
    p.add_argument("--url", default=os.environ.get("I2V_URL", DEFAULT_URL),
                   help=f"farm URL (default {DEFAULT_URL}, env I2V_URL)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="give a row up once this many of its farm jobs failed, across runs (default 3)")
    p.add_argument("--unreachable-timeout", type=float, default=300.0, metavar="S",
                   help="fail the rows that need the farm after it has been unreachable this long (default 300)")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="how long to wait for the farm to answer at start (default 30)")
    p.add_argument("--row-timeout", type=float, default=0, metavar="S",
                   help="fail a row whose farm job has not ended after this long (default 0: wait as long as "
                        "the farm works on it); the job is not canceled, the next run picks it up")
    p.add_argument("--poll", type=float, default=1.0, metavar="S",
                   help=f"seconds between job status polls (default 1, at least {MIN_POLL_S:g})")
    p.add_argument("--download-timeout", type=float, default=30.0, metavar="S",
                   help="timeout of http(s) image downloads (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001 - `ray job stop` sends SIGTERM, then SIGKILL after 3 s
        stop.signum = signum  # type: ignore[attr-defined]
        stop.set()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, on_signal)
    try:
        if args.concurrency < 1 or args.max_attempts < 1:
            raise UsageError("--concurrency and --max-attempts must be at least 1")
        if not MIN_POLL_S <= args.poll < float("inf"):  # nan too
            raise UsageError(f"--poll must be at least {MIN_POLL_S:g} seconds, not {args.poll:g}: each poll asks "
                             "the farm about every row in flight (the default, 1, suits jobs of seconds to minutes)")
        manifest = Path(args.manifest)
        mrows = read_manifest(manifest)  # before storage and farm: the cheapest mistake first
        settings = batch_settings()
        apply_umask(settings)  # the spool and (file://) summaries: file_mode, like the farm's own files
        storage = open_batch_storage(settings=settings)
        try:
            egress = EgressPolicy.from_settings(settings)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return run_batch(
            manifest, client=FarmClient(args.url, timeout=60), storage=storage, root=Path.cwd(), stop=stop,
            egress=egress, prefix=args.out, concurrency=args.concurrency, priority=args.priority,
            max_attempts=args.max_attempts, unreachable_timeout=args.unreachable_timeout, poll_s=args.poll,
            download_timeout=args.download_timeout, connect_timeout=args.connect_timeout, manifest_rows=mrows,
            row_timeout=args.row_timeout,
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
