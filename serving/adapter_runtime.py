"""A worker's LoRA adapters: the ones it keeps loaded (LRU bounded by `adapter_cache_bytes`) and
the per-job switch. The real model goes through `pipeline.adapters.AdapterCache` (PEFT on the
UNet); the `sim` model keeps the same LRU and sleeps the cost model's load time on a miss
(times `sim_time_scale`), so routing and cache behaviour can be measured on a simulated fleet.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from pipeline.adapters import AdapterCache, AdapterLRU, CacheStats
from pipeline.request import GenerationParams

from .adapter_registry import AdapterRegistry


class WorkerAdapters:
    def __init__(self, settings, backend, sim: bool):
        self.settings = settings
        self.registry = AdapterRegistry(settings)
        self.sim = sim
        self._cache: AdapterCache | None = None
        self._lru: AdapterLRU | None = None
        self._backend = backend

    def _model_cache(self) -> AdapterCache:
        if self._cache is None:
            unet = self._backend.generator.pipe.unet
            self._cache = AdapterCache(unet, self.registry.read, self.settings.adapter_cache_bytes)
        return self._cache

    def _sim_load(self, key: str) -> tuple[Any, int]:
        from pipeline.cost_model import adapter_cost

        name = key.split("@", 1)[0]
        meta = self.registry.get(name)
        if meta is None:
            from pipeline.adapters import AdapterError

            raise AdapterError(f"adapter {name!r} is not in the registry ({self.registry.url})",
                               code="unknown_adapter")
        nbytes, seconds = adapter_cost([int(meta.get("bytes", 0))])
        time.sleep(seconds * self.settings.sim_time_scale)
        return meta, nbytes

    def _sim_lru(self) -> AdapterLRU:
        if self._lru is None:
            self._lru = AdapterLRU(self.settings.adapter_cache_bytes, self._sim_load)
        return self._lru

    @property
    def loaded(self) -> list[str]:
        """Keys (`name@sha256-prefix`) of the adapters held now, least recently used first."""
        if self.sim:
            return self._lru.keys if self._lru else []
        return self._cache.lru.keys if self._cache else []

    @contextlib.contextmanager
    def applied(self, params: GenerationParams) -> Iterator[CacheStats | None]:
        """The job's adapters loaded and active for the block (yields their `CacheStats`), none
        after it; a job without adapters yields None and touches nothing."""
        specs = [r.model_dump() for r in params.lora]
        if not specs:
            yield None
            return
        if self.sim:
            keys = [AdapterCache.key(s["name"], s.get("sha256")) for s in specs]
            yield self._sim_lru().ensure(keys)
            return
        with self._model_cache().applied(specs) as stats:
            yield stats
