"""`i2v-farm gc`: delete results older than a cut-off from storage (local files or S3).

    i2v-farm gc --older-than 30d [--dry-run]      # or set retention_days (I2V_RETENTION_DAYS)

A job's files live under `jobs/YYYY/MM/DD/<job id>/`; a job is old when the newest of its files
is older than the cut-off. Job records stay in the job store; their video answers 404 afterwards.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline.errors import I2VError

from .config import load_settings
from .storage import Storage, open_storage

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_JOB_PREFIX = re.compile(r"^(jobs/\d{4}/\d\d/\d\d/[0-9a-f]+/)")


class RetentionError(I2VError):
    code = "retention_error"


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w` -> timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise RetentionError(f"--older-than must look like 30d, 12h, 90m or 2w, got {text!r}", field="older_than")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class GcReport:
    jobs: int
    files: int
    bytes: int
    prefixes: list[str]


def collect_garbage(storage: Storage, older_than: timedelta, dry_run: bool = False,
                    now: datetime | None = None) -> GcReport:
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    newest: dict[str, datetime] = {}
    files: dict[str, tuple[int, int]] = {}
    for obj in storage.list("jobs/"):
        m = _JOB_PREFIX.match(obj.key)
        if not m:
            continue
        prefix = m.group(1)
        newest[prefix] = max(newest.get(prefix, obj.last_modified), obj.last_modified)
        count, size = files.get(prefix, (0, 0))
        files[prefix] = (count + 1, size + obj.size)
    old = sorted(p for p, t in newest.items() if t < cutoff)
    if not dry_run:
        for prefix in old:
            storage.delete_prefix(prefix)
    return GcReport(jobs=len(old), files=sum(files[p][0] for p in old), bytes=sum(files[p][1] for p in old),
                    prefixes=old)


def add_commands(subparsers) -> None:
    gc = subparsers.add_parser("gc", help="delete old results from storage",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gc.add_argument("--older-than", help="age cut-off, e.g. 30d, 12h (default: retention_days)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--storage", dest="storage_url", help="file://DIR or s3://BUCKET (default: the settings')")
    gc.set_defaults(func=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        settings = load_settings({"storage_url": args.storage_url})
    except ValueError as exc:
        raise RetentionError(str(exc)) from None
    if args.older_than:
        age = parse_age(args.older_than)
    elif settings.retention_days:
        age = timedelta(days=settings.retention_days)
    else:
        raise RetentionError("give --older-than (e.g. 30d) or set retention_days (I2V_RETENTION_DAYS)",
                             field="older_than")
    report = collect_garbage(open_storage(settings), age, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for prefix in report.prefixes:
        print(prefix)
    print(f"{verb} {report.jobs} jobs ({report.files} files, {report.bytes / 2**20:.1f} MiB) older than "
          f"{age} from {settings.storage_url}", file=sys.stderr)
    return 0
