"""Result storage: local files (the default) or MinIO / any S3, behind one interface.

Every job owns one key prefix, `jobs/YYYY/MM/DD/<job id>/` (the UTC day it was submitted),
holding `input.<ext>`, `video.mp4` (`video/mp4`), `params.json` and `poster.jpg` (the first
frame). Nothing else in the code builds paths or talks to buckets.

    I2V_STORAGE_URL=file://./outputs          files under ./outputs (default)
    I2V_STORAGE_URL=s3://BUCKET[/PREFIX]      objects in BUCKET (created if missing), through the
                                              `minio` client: I2V_S3_ENDPOINT, I2V_S3_ACCESS_KEY,
                                              I2V_S3_SECRET_KEY, I2V_S3_SECURE, I2V_S3_REGION,
                                              I2V_S3_PUBLIC_ENDPOINT (host clients reach, for
                                              presigned URLs)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .files import DEFAULT_FILE_MODE, atomic_copy, atomic_write, dir_mode_for, make_dirs

INPUT_NAMES = {"png": "input.png", "jpeg": "input.jpg", "webp": "input.webp"}
VIDEO_NAME = "video.mp4"
PARAMS_NAME = "params.json"
POSTER_NAME = "poster.jpg"
CONTENT_TYPES = {
    ".mp4": "video/mp4", ".json": "application/json", ".jpg": "image/jpeg", ".png": "image/png",
    ".webp": "image/webp",
}
#: Files above this go up as S3 multipart uploads, in parts of this size.
PART_SIZE = 16 * 2**20


class StorageUnavailable(Exception):
    """The store could not be reached or refused the operation (worth retrying later)."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    etag: str | None
    last_modified: datetime


def job_prefix(job_id: str, created_at: str | datetime) -> str:
    """`jobs/YYYY/MM/DD/<job id>/` for a job submitted at `created_at` (UTC)."""
    when = datetime.fromisoformat(created_at) if isinstance(created_at, str) else created_at
    when = when.astimezone(timezone.utc)
    if not all(c in "0123456789abcdef" for c in job_id) or not job_id:
        raise ValueError(f"bad job id {job_id!r}")
    return f"jobs/{when:%Y/%m/%d}/{job_id}/"


def content_type(key: str) -> str:
    return CONTENT_TYPES.get(Path(key).suffix.lower(), "application/octet-stream")


def file_md5(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalStorage:
    """Objects as files under one directory (one machine, or a file system every node mounts).

    Files are written with `file_mode` (the `file_mode` setting, default 0600) and the
    directories the store creates (the root, job prefixes) with the matching dir mode (0700).
    """

    kind = "file"

    def __init__(self, root: str | os.PathLike, file_mode: int = DEFAULT_FILE_MODE):
        self.root = Path(root).expanduser().resolve()
        self.file_mode = file_mode
        self.dir_mode = dir_mode_for(file_mode)

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def ensure_ready(self) -> None:
        make_dirs(self.root, self.dir_mode)

    def _parent(self, dest: Path) -> None:
        make_dirs(dest.parent, self.dir_mode)

    def put_file(self, key: str, source: str | os.PathLike, content_type_: str | None = None) -> StoredObject:
        dest = self.path(key)
        try:
            self._parent(dest)
            atomic_copy(source, dest, self.file_mode)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {dest}: {exc.strerror or exc}") from exc
        return self.stat(key)

    def put_bytes(self, key: str, data: bytes, content_type_: str | None = None) -> StoredObject:
        dest = self.path(key)
        try:
            self._parent(dest)
            atomic_write(dest, data, self.file_mode)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {dest}: {exc.strerror or exc}") from exc
        return self.stat(key)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def stat(self, key: str) -> StoredObject | None:
        path = self.path(key)
        if not path.is_file():
            return None
        st = path.stat()
        return StoredObject(key, st.st_size, file_md5(path), datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        base = self.path(prefix) if prefix.strip("/") else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*") if base.is_dir() else [base]):
            if path.is_file() and not path.name.startswith("."):
                st = path.stat()
                yield StoredObject(str(path.relative_to(self.root)), st.st_size, None,
                                   datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def delete_prefix(self, prefix: str) -> int:
        target = self.path(prefix.rstrip("/"))
        if not target.exists():
            return 0
        count = sum(1 for p in target.rglob("*") if p.is_file()) if target.is_dir() else 1
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        # drop the now-empty day directories
        for parent in target.parents:
            if parent == self.root or any(parent.iterdir()):
                break
            parent.rmdir()
        return count

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return None  # files are streamed by the API


class S3Storage:
    """A bucket on MinIO or any S3, through the `minio` client (keyword calls, minio>=7.2.20)."""

    kind = "s3"

    def __init__(self, bucket: str, prefix: str, endpoint: str, access_key: str, secret_key: str,
                 secure: bool = False, region: str = "us-east-1", public_endpoint: str | None = None,
                 public_secure: bool | None = None, timeout_s: float = 10.0):
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.secure = secure
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(3.0, timeout_s), read=timeout_s * 6),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        kwargs = dict(access_key=access_key, secret_key=secret_key, region=region)
        self.client = Minio(endpoint=endpoint, secure=secure, http_client=http, **kwargs)
        # Presigned URLs are signed for the host clients use (no request is made: region is given).
        self.public = Minio(endpoint=public_endpoint or endpoint,
                            secure=secure if public_secure is None else public_secure, **kwargs)
        self._bucket_ready = False

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        return self.prefix + key

    def _call(self, what: str, fn, *args, **kwargs):
        from minio.error import S3Error

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise KeyError(what) from None
            if exc.code == "NoSuchBucket":
                self._bucket_ready = False
            raise StorageUnavailable(f"S3 {what}: {exc.code}: {exc.message}") from exc
        except Exception as exc:  # urllib3 connection errors, timeouts, bad responses
            raise StorageUnavailable(f"S3 {what}: {type(exc).__name__}: {exc}") from exc

    def ensure_ready(self) -> None:
        """Create the bucket if missing (idempotent; again after the store lost it)."""
        if self._bucket_ready:
            return
        if not self._call("bucket_exists", self.client.bucket_exists, bucket_name=self.bucket):
            from minio.error import S3Error

            try:
                self.client.make_bucket(bucket_name=self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StorageUnavailable(f"S3 make_bucket: {exc.code}: {exc.message}") from exc
            except Exception as exc:  # noqa: BLE001
                raise StorageUnavailable(f"S3 make_bucket: {type(exc).__name__}: {exc}") from exc
        self._bucket_ready = True

    def put_file(self, key: str, source: str | os.PathLike, content_type_: str | None = None) -> StoredObject:
        self.ensure_ready()
        size = os.path.getsize(source)
        result = self._call(
            f"put {key}", self.client.fput_object, bucket_name=self.bucket, object_name=self._key(key),
            file_path=str(source), content_type=content_type_ or content_type(key),
            part_size=PART_SIZE if size > PART_SIZE else 0,
        )
        return StoredObject(key, size, result.etag, datetime.now(timezone.utc))

    def put_bytes(self, key: str, data: bytes, content_type_: str | None = None) -> StoredObject:
        import io

        self.ensure_ready()
        result = self._call(
            f"put {key}", self.client.put_object, bucket_name=self.bucket, object_name=self._key(key),
            data=io.BytesIO(data), length=len(data), content_type=content_type_ or content_type(key),
        )
        return StoredObject(key, len(data), result.etag, datetime.now(timezone.utc))

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(f"get {key}", self.client.get_object, bucket_name=self.bucket, object_name=self._key(key))
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def stat(self, key: str) -> StoredObject | None:
        try:
            st = self._call(f"stat {key}", self.client.stat_object, bucket_name=self.bucket,
                            object_name=self._key(key))
        except KeyError:
            return None
        return StoredObject(key, st.size, (st.etag or "").strip('"') or None, st.last_modified)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        objects = self._call("list", self.client.list_objects, bucket_name=self.bucket,
                             prefix=self._key(prefix) if prefix else self.prefix, recursive=True)
        try:
            for obj in objects:
                yield StoredObject(obj.object_name[len(self.prefix):], obj.size, obj.etag, obj.last_modified)
        except Exception as exc:  # noqa: BLE001 - the listing is lazy; errors surface here
            from minio.error import S3Error

            if isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
                return
            raise StorageUnavailable(f"S3 list: {exc}") from exc

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        keys = [self._key(o.key) for o in self.list(prefix)]
        if not keys:
            return 0
        errors = list(self._call("delete", self.client.remove_objects, bucket_name=self.bucket,
                                 delete_object_list=[DeleteObject(name=k) for k in keys]))
        if errors:
            raise StorageUnavailable(f"S3 delete: {errors[0]}")
        return len(keys)

    def presigned_url(self, key: str, expires_s: int) -> str:
        return self.public.get_presigned_url(method="GET", bucket_name=self.bucket, object_name=self._key(key),
                                             expires=timedelta(seconds=expires_s))


Storage = LocalStorage | S3Storage


def open_storage(settings: Any) -> Storage:
    """The store named by `settings.storage_url` (a FarmSettings, or a bare URL for file://)."""
    url = settings if isinstance(settings, str) else settings.storage_url
    if url.startswith("file://"):
        if isinstance(settings, str):
            return LocalStorage(url[len("file://"):])
        return LocalStorage(url[len("file://"):], file_mode=getattr(settings, "file_mode_bits", DEFAULT_FILE_MODE))
    if url.startswith("s3://"):
        if isinstance(settings, str):
            raise ValueError("s3:// storage needs the S3 settings (endpoint, keys)")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"storage URL {url!r} names no bucket")
        s = settings
        if not (s.s3_endpoint and s.s3_access_key and s.s3_secret_key):
            raise ValueError("s3:// storage needs I2V_S3_ENDPOINT, I2V_S3_ACCESS_KEY and I2V_S3_SECRET_KEY")
        public, public_secure = s.s3_public_endpoint or None, None
        if public and "://" in public:
            scheme, _, public = public.partition("://")
            public, public_secure = public.rstrip("/"), scheme == "https"
        return S3Storage(bucket, prefix, s.s3_endpoint, s.s3_access_key, s.s3_secret_key, secure=s.s3_secure,
                         region=s.s3_region, public_endpoint=public, public_secure=public_secure)
    raise ValueError(f"storage URL must start with file:// or s3://, got {url!r}")
