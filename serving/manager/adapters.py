"""LoRA adapters in the job manager (issue 18; docs/adapters.md): the registry's listing, a job's
`lora` checked against the registry, the adapters' share of a job's cost, the worker call's
routing by adapter affinity, and the adapter cache metrics from a worker's `done` event."""

from __future__ import annotations

import asyncio
from typing import Any

from monitoring.metrics import FarmMetrics
from pipeline.errors import I2VError
from pipeline.request import parse_params

from ..config import FarmSettings


class Adapters:
    """The job manager's view of the adapter registry (opened on first use)."""

    def __init__(self, settings: FarmSettings, metrics: FarmMetrics):
        self.settings = settings
        self.metrics = metrics
        self._registry = None
        self._sizes: dict[str, int] = {}  # adapter SHA-256 -> bytes, as resolved (the cost model's input)

    def registry(self):
        if self._registry is None:
            from ..adapter_registry import AdapterRegistry

            self._registry = AdapterRegistry(self.settings)
        return self._registry

    async def listing(self) -> dict[str, Any]:
        """`GET /v1/adapters`: the registered adapters' metadata (an error reply when the registry
        is unreachable: a 503, not a crash)."""
        try:
            return {"adapters": await asyncio.to_thread(self.registry().list), "url": self.registry().url}
        except Exception as exc:  # noqa: BLE001
            return I2VError(f"the adapter registry is unreachable: {exc}", code="registry_unavailable",
                            http_status=503).reply()

    async def resolve(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`lora` checked against the registry: unknown names are a 422 (field `lora`); each entry
        gets its adapter's SHA-256 (recorded in `params.json`, part of the result-reuse key)."""
        if not fields.get("lora"):
            return fields
        refs = [r.model_dump() for r in parse_params(fields).lora]
        resolved = await asyncio.to_thread(self.registry().resolve, refs)
        self._sizes.update({r["sha256"]: r["bytes"] for r in resolved})
        return {**fields, "lora": [{k: r[k] for k in ("name", "scale", "sha256")} for r in resolved]}

    def with_cost(self, params, vram: int, seconds: dict[str, float]) -> tuple[int, dict[str, float]]:
        """The cost model's share of a job's adapters: their memory, and a load on a miss."""
        if not params.lora:
            return vram, seconds
        from pipeline.cost_model import adapter_cost

        extra_vram, load_s = adapter_cost([self._sizes.get(r.sha256, 0) for r in params.lora])
        return vram + extra_vram, {k: v + load_s for k, v in seconds.items()}

    def route(self, params: dict[str, Any]) -> dict[str, Any]:
        """Handle options of a job's worker call. With adapters (and `adapter_affinity`), Serve's
        model multiplexing routes it to a replica of the class that holds the same adapter set
        when one is free (the set is the multiplexed model id; see docs/adapters.md)."""
        from pipeline.adapters import adapter_set_id

        names = [r["name"] for r in params.get("lora") or ()]
        if names and self.settings.adapter_affinity:
            return {"stream": True, "multiplexed_model_id": adapter_set_id(names)}
        return {"stream": True}

    def count_loads(self, vram_class: str, event: dict[str, Any]) -> None:
        """A worker's `done` event: its adapter cache hits, misses and load time, as metrics."""
        stats = event.get("adapters") if event.get("event") == "done" else None
        if stats:
            self.metrics.adapter_loads(vram_class, stats.get("hits", 0), stats.get("misses", 0),
                                       stats.get("load_seconds", 0.0))
