"""Result storage: one key prefix per job (`<job id>/input.png`, `video.mp4`, `params.json`).

`I2V_STORAGE_URL=file://DIR` keeps objects as files under DIR (the default, `./outputs`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

INPUT_NAMES = {"png": "input.png", "jpeg": "input.jpg", "webp": "input.webp"}
VIDEO_NAME = "video.mp4"
PARAMS_NAME = "params.json"


def job_key(job_id: str, name: str) -> str:
    return f"{job_id}/{name}"


class LocalStorage:
    """Objects as files under one directory (single machine or a shared file system)."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> int:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return len(data)

    def put_file(self, key: str, source: str | os.PathLike, content_type: str = "application/octet-stream") -> int:
        return self.put_bytes(key, Path(source).read_bytes(), content_type)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()


def open_storage(url: str) -> LocalStorage:
    if url.startswith("file://"):
        return LocalStorage(url[len("file://"):])
    if url.startswith("s3://"):
        raise ValueError("s3:// storage is not available in this build; use file://DIR")
    raise ValueError(f"storage URL must start with file:// or s3://, got {url!r}")
