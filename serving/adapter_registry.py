"""The LoRA adapter registry: `adapters_url`, a directory (default `adapters/` beside the job
store) or `s3://BUCKET/PREFIX` through the farm's storage code. One adapter is two objects:

    NAME/adapter.safetensors   the LoRA weights (PEFT layout, see pipeline/adapters.py)
    NAME/adapter.json          {name, rank, alpha, bytes, sha256, target_modules, parameters,
                                note, model, created_at}

`add()` checks the weights against the UNet of the configured model (built on the meta device)
before anything is stored, so a LoRA that does not fit is refused at registration, never in the
middle of a job. Workers read the weights with `read(name, sha256)`, which refuses bytes whose
hash is not the one the job was admitted with.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.adapters import (
    META_NAME,
    NAME_RE,
    WEIGHTS_NAME,
    AdapterError,
    check_lora,
    meta_unet,
    read_lora,
    sha256_hex,
)

from .storage import LocalStorage, StorageUnavailable, open_storage

#: The ingress and the job manager re-read the listing at most this often.
LIST_TTL_S = 2.0


def registry_url(settings) -> str:
    """`adapters_url`, or the directory `adapters/` beside the job store."""
    return settings.adapters_url or str(Path(settings.job_db).expanduser().parent / "adapters")


def open_registry_storage(settings):
    url = registry_url(settings)
    if url.startswith("s3://"):
        return open_storage(settings.model_copy(update={"storage_url": url}))
    path = url[len("file://"):] if url.startswith("file://") else url
    return LocalStorage(Path(path).expanduser(), file_mode=getattr(settings, "file_mode_bits", 0o600))


class AdapterRegistry:
    def __init__(self, settings):
        self.settings = settings
        self.model = settings.model
        self.storage = open_registry_storage(settings)
        self._listing: tuple[float, dict[str, dict[str, Any]]] | None = None

    @property
    def url(self) -> str:
        return registry_url(self.settings)

    def list(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Every registered adapter's metadata, by name."""
        return sorted(self._all(fresh).values(), key=lambda m: m["name"])

    def get(self, name: str, fresh: bool = False) -> dict[str, Any] | None:
        found = self._all(fresh).get(name)
        if found is None and not fresh:
            found = self._all(True).get(name)  # registered a moment ago
        return found

    def _all(self, fresh: bool) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        if not fresh and self._listing is not None and now - self._listing[0] < LIST_TTL_S:
            return self._listing[1]
        out: dict[str, dict[str, Any]] = {}
        try:
            objects = list(self.storage.list(""))
        except FileNotFoundError:
            objects = []
        for obj in objects:
            if not obj.key.endswith("/" + META_NAME):
                continue
            try:
                meta = json.loads(self.storage.get_bytes(obj.key))
            except (KeyError, FileNotFoundError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("name"):
                out[meta["name"]] = meta
        self._listing = (now, out)
        return out

    def add(self, name: str, data: bytes, note: str = "", replace: bool = False) -> dict[str, Any]:
        """Check `data` (LoRA safetensors) against the configured model's UNet and store it."""
        if not NAME_RE.match(name or ""):
            raise AdapterError(f"adapter name {name!r}: use 1-64 lower-case letters, digits, '.', '_', '-' "
                               "(starting with a letter or digit)", field="name")
        if not replace and self.get(name, fresh=True) is not None:
            raise AdapterError(f"adapter {name!r} is registered already (remove it first, or --replace)",
                               field="name", code="adapter_exists", http_status=409)
        state, metadata = read_lora(data)
        info = check_lora(state, meta_unet(self.model), metadata)
        meta = {
            "name": name,
            **info.to_dict(),
            "bytes": len(data),
            "sha256": sha256_hex(data),
            "note": note,
            "model": self.model,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        self.storage.put_bytes(f"{name}/{WEIGHTS_NAME}", data)
        self.storage.put_bytes(f"{name}/{META_NAME}", (json.dumps(meta, indent=2) + "\n").encode())
        self._listing = None
        return meta

    def read(self, name: str, sha256: str | None = None) -> bytes:
        """The weights of `name`; with `sha256`, only if they still have that hash."""
        try:
            if not self.storage.exists(f"{name}/{WEIGHTS_NAME}"):
                raise KeyError(name)
            data = self.storage.get_bytes(f"{name}/{WEIGHTS_NAME}")
        except (KeyError, FileNotFoundError):
            raise AdapterError(f"adapter {name!r} is not in the registry ({self.url})",
                               code="unknown_adapter") from None
        if sha256 and sha256_hex(data) != sha256:
            raise AdapterError(f"adapter {name!r} changed since the job was submitted "
                               f"(SHA-256 {sha256_hex(data)[:12]}..., the job names {sha256[:12]}...)",
                               code="adapter_changed")
        return data

    def resolve(self, refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A job's `lora` entries with each adapter's SHA-256 (and size) from the registry.
        Unknown names raise `AdapterError` (422, field `lora`)."""
        out = []
        for i, ref in enumerate(refs):
            meta = self.get(ref["name"])
            if meta is None:
                known = ", ".join(m["name"] for m in self.list()) or "none registered"
                raise AdapterError(f"lora[{i}]: unknown adapter {ref['name']!r} (registered: {known})",
                                   field="lora", code="unknown_adapter")
            if ref.get("sha256") and ref["sha256"] != meta["sha256"]:
                raise AdapterError(f"lora[{i}]: adapter {ref['name']!r} has SHA-256 {meta['sha256']}, "
                                   f"not {ref['sha256']}", field="lora", code="adapter_changed")
            out.append({"name": ref["name"], "scale": ref["scale"], "sha256": meta["sha256"],
                        "bytes": int(meta.get("bytes", 0))})
        return out


__all__ = ["AdapterRegistry", "META_NAME", "WEIGHTS_NAME", "StorageUnavailable", "registry_url"]
