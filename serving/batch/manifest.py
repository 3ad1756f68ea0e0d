"""Reading a manifest: JSON Lines or CSV, each row with the line it starts on, a bad line a row
with an `error` (the others still run), an unusable file or CSV header a `UsageError`.

Design: docs/design/batch.md.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import UsageError


@dataclass
class ManifestRow:
    """One row as read from the manifest: its fields, or why the line could not be read."""

    line: int
    fields: dict[str, Any] | None
    error: str | None = None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """The rows of a JSON Lines or CSV manifest, with the line each starts on (1-based).

    The format is chosen by the suffix (`.csv`; `.jsonl`, `.ndjson`, `.json`), otherwise by the
    first character (`{`: JSON Lines). Blank lines are skipped. Raises `UsageError` when the file
    cannot be read or a CSV header is unusable; a bad line is a row with an `error`.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"no manifest at {path} (run from the directory that holds it: the working dir)") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a manifest") from None
    except OSError as exc:
        raise UsageError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"the manifest {path} is not UTF-8 text: {exc}") from None
    return parse_manifest(text, fmt=manifest_format(path, text))


def manifest_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def parse_manifest(text: str, fmt: str = "jsonl") -> list[ManifestRow]:
    if fmt == "jsonl":
        return _parse_jsonl(text)
    if fmt == "csv":
        return _parse_csv(text)
    raise ValueError(f"unknown manifest format {fmt!r}")


def _parse_jsonl(text: str) -> list[ManifestRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            rows.append(ManifestRow(number, None, f"not valid JSON: {exc}"))
            continue
        if not isinstance(data, dict):
            rows.append(ManifestRow(number, None, f"each line must be a JSON object, got {type(data).__name__}"))
            continue
        rows.append(ManifestRow(number, {str(k): v for k, v in data.items()}))
    return rows


def _parse_csv(text: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows = []
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: the record starts here
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:
                raise UsageError(f"line {start}: the CSV header cannot be read: {exc}") from None
            rows.append(ManifestRow(start, None, f"not valid CSV: {exc}"))
            continue
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = [cell.strip() for cell in record]
            if "" in header:
                raise UsageError(f"line {start}: the CSV header has an empty column name "
                                 f"(column {header.index('') + 1})")
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise UsageError(f"line {start}: the CSV header repeats {', '.join(repeated)}")
            continue
        if len(record) > len(header):
            rows.append(ManifestRow(start, None, f"{len(record)} cells but the header names {len(header)} columns"))
            continue
        # an empty cell is a field left out (its default applies)
        rows.append(ManifestRow(start, {h: v for h, v in zip(header, record, strict=False) if v.strip() != ""}))
    return rows
