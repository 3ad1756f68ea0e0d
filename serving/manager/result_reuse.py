"""Result reuse in the job manager (issue 18; `serving/reuse.py` makes the key): which earlier
identical job, if any, answers a new request with its stored result."""

from __future__ import annotations

import asyncio
import logging

from ..config import FarmSettings
from ..job_store import JobStore
from ..jobs import JobRecord
from ..reuse import gpu_seconds

log = logging.getLogger(__name__)


class ResultReuse:
    """Finds a reusable job in the job store whose result storage still holds."""

    def __init__(self, settings: FarmSettings, store: JobStore):
        self.settings = settings
        self.store = store
        self._storage = None  # opened on first use

    def result_exists(self, key: str) -> bool:
        """Whether a result is still in storage (`i2v-farm gc` may have deleted it); False when
        storage cannot tell (unreachable)."""
        try:
            if self._storage is None:
                from ..storage import open_storage

                self._storage = open_storage(self.settings)
            return bool(self._storage.exists(key))
        except Exception as exc:  # noqa: BLE001
            log.warning("result reuse: cannot check %s in storage: %s", key, exc)
            return False

    async def source(self, key: str, owner: str | None) -> JobRecord | None:
        """The newest succeeded job with reuse key `key` (`owner`'s; None: anyone's) whose result
        is still stored; None when there is none."""
        for row in self.store.find_reusable(key, owner):
            source = JobRecord.parse(row)
            result = source.result or {}
            if result.get("key") and await asyncio.to_thread(self.result_exists, result["key"]):
                return source
        return None


def saved_seconds(source: JobRecord) -> float:
    """The GPU seconds reusing `source`'s result saves: what it took, or, when it was itself a
    reuse, what it saved."""
    if source.reused_from:
        return float(source.gpu_seconds_saved or 0)
    return gpu_seconds(source.to_dict())
