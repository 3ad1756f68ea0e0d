"""Batch rendering: a manifest of (image, prompt, settings) rows through the running farm.

    ray job submit --working-dir . -- python -m serving.batch manifest.jsonl
    python -m serving.batch manifest.csv --out batches/spring/ --concurrency 8 --priority low

Usage: docs/batch.md. Design decisions: docs/design/batch.md. The parts:

* `manifest` reads a JSON Lines or CSV manifest into rows;
* `images` reads a row's image (working directory, `s3://KEY`, http(s) URL); `scope` decides
  whose `s3://` keys a manifest may name;
* `rows` validates a row, gives it its stable id and Idempotency-Key, and plans a resumed run;
* `farm` talks to the farm's HTTP API with the batch's retry rules;
* `runner` runs one batch (`run_batch`, `BatchRun`); `report` writes and reads its summary;
* `cli` is `python -m serving.batch` (`main`), run by `__main__`.

The public names of all of them are importable from `serving.batch`.
"""

from __future__ import annotations

from ..client import DEFAULT_URL, FarmClient, FarmClientError
from ..egress import EgressPolicy, EgressRefused, FetchError
from .cli import batch_settings, build_parser, main, open_batch_storage
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    MAX_ID_CHARS,
    MIN_POLL_S,
    SLOW_ROW_LOG_S,
    STATUSES,
    SUMMARY_EVERY_S,
    TERMINAL,
    RowError,
    Stopped,
    UsageError,
    invalid,
)
from .farm import FarmLink, check_farm
from .images import ImageLimits, read_image
from .manifest import ManifestRow, manifest_format, parse_manifest, read_manifest
from .report import SUMMARY_COUNTS, SUMMARY_ROWS, default_prefix, normalize_prefix, put_summary, read_previous
from .rows import Row, assign_ids, check_row, idempotency_key, plan_rows, row_digest
from .runner import BatchRun, run_batch
from .scope import StorageScope

__all__ = [
    # the entry points
    "main", "build_parser", "run_batch", "BatchRun", "batch_settings", "open_batch_storage",
    # manifests, images, rows
    "ManifestRow", "read_manifest", "parse_manifest", "manifest_format",
    "ImageLimits", "read_image", "StorageScope",
    "Row", "check_row", "assign_ids", "row_digest", "idempotency_key", "plan_rows",
    # the farm, the summary
    "FarmLink", "check_farm",
    "SUMMARY_ROWS", "SUMMARY_COUNTS", "default_prefix", "normalize_prefix", "read_previous", "put_summary",
    # statuses, exit codes, errors
    "STATUSES", "TERMINAL", "SUMMARY_EVERY_S", "SLOW_ROW_LOG_S", "MAX_ID_CHARS", "MIN_POLL_S",
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "UsageError", "RowError", "Stopped", "invalid",
    # re-exported from serving.client / serving.egress, as the single module had them
    "DEFAULT_URL", "FarmClient", "FarmClientError", "EgressPolicy", "EgressRefused", "FetchError",
]
