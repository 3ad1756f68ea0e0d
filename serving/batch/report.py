"""What the batch reports: the summary in the farm's storage (`summary.jsonl`, `summary.json`,
under the output prefix), the previous run's summary read back to resume, and the log lines.

Design: docs/design/batch.md ("Summary written as it goes").
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .common import UsageError
from .rows import Row

SUMMARY_ROWS = "summary.jsonl"
SUMMARY_COUNTS = "summary.json"


def default_prefix(manifest: Path) -> str:
    return f"batches/{manifest.stem}/"


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip().strip("/")
    if not prefix or "://" in prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"--out must be a key prefix in the farm's storage, like batches/spring/, got {prefix!r}")
    return prefix + "/"


def put_summary(storage: Any, prefix: str, lines: list[str], summary: dict[str, Any]) -> None:
    """Write `summary.jsonl` (`lines`: one JSON row record each) and `summary.json` (`summary`) under
    `prefix`; raises what the storage raises."""
    storage.put_bytes(prefix + SUMMARY_ROWS, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
    storage.put_bytes(prefix + SUMMARY_COUNTS, (json.dumps(summary, indent=2) + "\n").encode(), "application/json")


def read_previous(storage: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """The rows of the previous run's `summary.jsonl` under `prefix`, by row id ({} if none)."""
    from ..storage import StorageUnavailable

    try:
        raw = storage.get_bytes(prefix + SUMMARY_ROWS)
    except KeyError:
        return {}
    except StorageUnavailable as exc:
        raise UsageError(f"cannot read the previous summary from storage: {exc}") from None
    previous = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("id"):
            previous[str(rec["id"])] = rec
    return previous


class _LogLines(io.TextIOBase):
    """tqdm's output for a log file (Ray job logs capture stdout): each refresh of the bar on a
    line of its own instead of carriage-return redraws."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> int:
        for segment in text.replace("\r", "\n").split("\n"):
            if segment.strip():
                self.out.write(segment.rstrip() + "\n")
        self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _row_line(row: Row) -> str:
    head = f"line {row.line} [{row.id}]"
    if row.status == "succeeded":
        return f"{head} succeeded on {row.vram_class} in {row.seconds or 0:.1f} s: {row.video_key}"
    err = row.error or {}
    return f"{head} {row.status}: {err.get('message', '')}" + (f" (job {row.job_id})" if row.job_id else "")
