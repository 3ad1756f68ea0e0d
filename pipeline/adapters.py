"""LoRA adapters for the I2VGen-XL UNet: check one against the UNet's layers, keep recently used
ones loaded (LRU bounded by bytes), and switch them per job without touching the base weights.

A LoRA file is a safetensors state dict in PEFT's layout, keyed by the UNet's module paths:

    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (rank, in_features)
    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out_features, rank)

(a `unet.` or `base_model.model.` prefix, as diffusers and PEFT save them, is accepted). The
safetensors metadata may carry `lora_alpha` (default: the rank).

How it is applied: diffusers' `load_lora_adapter` needs `PeftAdapterMixin`, which
`I2VGenXLUNet` does not have (diffusers 0.42.1), so PEFT is used directly:
`inject_adapter_in_model` wraps the targeted layers once per adapter (its own `lora_A`/`lora_B`
under the adapter's name), `set_peft_model_state_dict` fills them, and per job the wrapped
layers get the job's adapters as their active set with the job's scales (`set_scale`). The LoRA
is never merged into the base weights: after the job no adapter is active and each wrapped
layer computes `base_layer(x)` only, so a base job after a LoRA job is bit-identical to one on a
fresh model. One catch, found by that test: PEFT marks the base weights `requires_grad=False`,
and on CPU `torch.nn.functional.linear` takes another kernel for a frozen weight (the result
differs in the last bit, even under `inference_mode`), so `UnetAdapters` restores every base
parameter's `requires_grad` after each PEFT call.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import I2VError

#: Adapter names: lower-case letters, digits, `.`, `_`, `-`; what the registry, the API and the
#: Serve multiplexed model id use.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_ADAPTERS_PER_JOB = 3
#: A registry holds one adapter as `NAME/adapter.safetensors` + `NAME/adapter.json`.
WEIGHTS_NAME = "adapter.safetensors"
META_NAME = "adapter.json"
SCALE_MIN, SCALE_MAX = -2.0, 2.0
KEY_PREFIXES = ("base_model.model.", "unet.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class AdapterError(I2VError):
    """A LoRA that does not fit the UNet, a malformed file, or a registry problem."""

    code = "invalid_adapter"
    http_status = 422


@dataclass(frozen=True)
class LoraInfo:
    """What the registry records about a LoRA file (besides name, note, size, SHA-256)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # the UNet module paths it adapts
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules),
                "parameters": self.parameters}


def adapter_set_id(names: Iterable[str]) -> str:
    """The id of a set of adapters (sorted names joined by `+`; empty for none): the Serve
    multiplexed model id a job is routed by."""
    return "+".join(sorted(set(names)))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reading and checking -----------------------------------------------------------------------


def read_lora(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """(state dict with normalized keys, safetensors metadata) of a LoRA file's bytes."""
    from safetensors import safe_open
    from safetensors.torch import load as load_tensors

    try:
        tensors = load_tensors(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one clear error
        raise AdapterError(f"not a safetensors file ({type(exc).__name__}: {str(exc)[:200]})") from None
    metadata: dict[str, str] = {}
    try:  # the metadata needs the file API; a temporary file costs little next to the tensors
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
            tmp.write(data)
            tmp.flush()
            with safe_open(tmp.name, framework="pt") as f:
                metadata = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - metadata is optional
        metadata = {}
    out: dict[str, Any] = {}
    for key, tensor in tensors.items():
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        match = _LORA_KEY.match(key)
        if match is None:
            raise AdapterError(f"'{key}' is not a LoRA weight (expected '<module>.lora_A.weight' "
                               "or '<module>.lora_B.weight')")
        out[f"{match['module']}.lora_{match['part']}.weight"] = tensor
    if not out:
        raise AdapterError("the file holds no tensors")
    return out, metadata


def check_lora(state: Mapping[str, Any], unet, metadata: Mapping[str, str] | None = None) -> LoraInfo:
    """Check a LoRA state dict against `unet` (real or on the meta device): every adapted module
    exists and is a Linear or Conv2d, both halves are there with matching shapes and one rank.
    Raises `AdapterError` saying what does not fit."""
    import torch

    modules = dict(unet.named_modules())
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        assert match is not None
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    ranks: set[int] = set()
    params = 0
    for path, pair in sorted(pairs.items()):
        module = modules.get(path)
        if hasattr(module, "get_base_layer"):  # already wrapped by PEFT (another adapter)
            module = module.get_base_layer()
        if module is None:
            raise AdapterError(f"the UNet has no layer '{path}' (this LoRA is for another model)")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer '{path}' has only lora_{''.join(pair)}; both lora_A and lora_B are needed")
        a, b = pair["A"], pair["B"]
        if isinstance(module, torch.nn.Linear):
            want_a, want_b = (a.shape[0], module.in_features), (module.out_features, a.shape[0])
            ok = tuple(a.shape) == want_a and tuple(b.shape) == want_b
        elif isinstance(module, torch.nn.Conv2d):
            ok = (a.ndim == 4 and b.ndim == 4 and a.shape[1] == module.in_channels
                  and b.shape[0] == module.out_channels and b.shape[1] == a.shape[0])
            want_a, want_b = (a.shape[0], module.in_channels, "k", "k"), (module.out_channels, a.shape[0], 1, 1)
        else:
            raise AdapterError(f"layer '{path}' is a {type(module).__name__}; LoRA adapts Linear and Conv2d layers")
        if not ok:
            raise AdapterError(
                f"layer '{path}': lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the UNet's "
                f"{type(module).__name__} (expected {want_a} / {want_b})")
        ranks.add(int(a.shape[0]))
        params += a.numel() + b.numel()
    if len(ranks) != 1:
        raise AdapterError(f"the layers have different ranks {sorted(ranks)}; one rank per adapter")
    rank = ranks.pop()
    try:
        alpha = float((metadata or {}).get("lora_alpha", rank))
    except ValueError:
        raise AdapterError(f"metadata lora_alpha={metadata.get('lora_alpha')!r} is not a number") from None
    return LoraInfo(rank=rank, alpha=alpha, target_modules=tuple(sorted(pairs)), parameters=params)


@functools.lru_cache(maxsize=4)
def meta_unet(model: str):
    """The UNet of the configured model (`tiny-random`, `sim` = the full-size architecture, a
    diffusers directory, or a hub id in the local cache), built on the meta device: no weights,
    no memory; what registration checks a LoRA against."""
    import torch
    from diffusers.models.unets.unet_i2vgen_xl import I2VGenXLUNet

    from .architecture import FULL_SIZE, TINY

    if model == "tiny-random":
        config: dict[str, Any] = dict(TINY.unet)
    elif model in ("sim", "", "i2vgen-xl"):
        config = dict(FULL_SIZE.unet)
    elif (Path(model).expanduser() / "unet" / "config.json").is_file():
        config = json.loads((Path(model).expanduser() / "unet" / "config.json").read_text())
    else:
        try:
            config = dict(I2VGenXLUNet.load_config(model, subfolder="unet", local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the published architecture
            config = dict(FULL_SIZE.unet)
    with torch.device("meta"):
        return I2VGenXLUNet.from_config(config)


def random_lora(unet, *, rank: int = 4, seed: int = 0, std: float = 0.02,
                targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")) -> dict[str, Any]:
    """A LoRA state dict with random non-zero weights for every Linear of `unet` whose path ends
    with one of `targets` (made with PEFT's own layout; for tests, benches and demos)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(path == t or path.endswith("." + t) for t in targets):
            out[f"{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * std
            out[f"{path}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * std
    return out


def lora_bytes(state: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """A state dict as safetensors bytes."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=dict(metadata or {}))


# --- an LRU bounded by bytes ----------------------------------------------------------------------


@dataclass
class CacheStats:
    """Adapter loads of one job: hits (already loaded), misses (loaded now), load seconds."""

    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0
    evicted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "load_seconds": round(self.load_seconds, 4),
                "evicted": list(self.evicted)}


class AdapterLRU:
    """Keeps loaded adapters, least recently used evicted first, so their bytes stay within
    `capacity_bytes`. The adapters a job needs are pinned while it loads them (a set larger than
    the capacity still runs; the others are evicted). `load(key) -> (value, nbytes)` and
    `unload(key, value)` do the real work (PEFT on a UNet, or a sleep in the `sim` model)."""

    def __init__(self, capacity_bytes: int, load: Callable[[str], tuple[Any, int]],
                 unload: Callable[[str, Any], None] | None = None):
        self.capacity = int(capacity_bytes)
        self._load, self._unload = load, unload
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[str]:
        """Loaded keys, least recently used first."""
        return list(self._items)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self._items.values())

    def ensure(self, keys: Sequence[str]) -> CacheStats:
        """Load what of `keys` is not loaded (evicting others as needed); mark all as used."""
        stats = CacheStats()
        with self._lock:
            for key in keys:
                if key in self._items:
                    self._items.move_to_end(key)
                    stats.hits += 1
                    continue
                started = time.perf_counter()
                value, nbytes = self._load(key)
                stats.load_seconds += time.perf_counter() - started
                stats.misses += 1
                self._items[key] = (value, int(nbytes))
            pinned = set(keys)
            for key in list(self._items):
                if self.bytes <= self.capacity:
                    break
                if key in pinned:
                    continue
                value, _ = self._items.pop(key)
                stats.evicted.append(key)
                if self._unload is not None:
                    self._unload(key, value)
        return stats


# --- PEFT on a UNet -------------------------------------------------------------------------------


class UnetAdapters:
    """LoRA adapters injected into one UNet under their own names; per job, some are active with
    their scales; between jobs none is (the base model, bit for bit)."""

    def __init__(self, unet):
        self.unet = unet
        self._info: dict[str, LoraInfo] = {}
        self._base_grad = {name: p.requires_grad for name, p in unet.named_parameters()}

    @property
    def loaded(self) -> list[str]:
        return list(self._info)

    def _tuner_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    def _restore_grad_flags(self) -> None:
        # Keys of base parameters move under `.base_layer.` once a layer is wrapped.
        for name, p in self.unet.named_parameters():
            if ".lora_" in name:
                continue
            base = name.replace(".base_layer.", ".")
            if base in self._base_grad:
                p.requires_grad_(self._base_grad[base])

    def load(self, name: str, state: Mapping[str, Any], info: LoraInfo) -> None:
        import torch
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        if name in self._info:
            return
        param = next(self.unet.parameters())
        state = {k: v.to(device=param.device, dtype=param.dtype) for k, v in state.items()}
        config = LoraConfig(r=info.rank, lora_alpha=info.alpha, target_modules=list(info.target_modules),
                            init_lora_weights=False)
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # "Already found a `peft_config`": several adapters, on purpose
            inject_adapter_in_model(config, self.unet, adapter_name=name)
            result = set_peft_model_state_dict(self.unet, dict(state), adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            self.unload(name)
            raise AdapterError(f"adapter '{name}': {len(unexpected)} weights did not load ({unexpected[0]}, ...)")
        self._info[name] = info
        self.deactivate()

    def unload(self, name: str) -> None:
        for layer in self._tuner_layers():
            if name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {}):
                layer.delete_adapter(name)
        peft_config = getattr(self.unet, "peft_config", None)
        if isinstance(peft_config, dict):
            peft_config.pop(name, None)
        self._info.pop(name, None)
        self.deactivate()

    def activate(self, adapters: Sequence[tuple[str, float]]) -> None:
        """Make exactly these adapters active, each with its scale."""
        names = [n for n, _ in adapters]
        scales = dict(adapters)
        for layer in self._tuner_layers():
            present = [n for n in names if n in layer.lora_A]
            layer.set_adapter(present or names[:1])
            for n in present:
                layer.set_scale(n, scales[n])
            layer.enable_adapters(bool(present))
        self._restore_grad_flags()

    def deactivate(self) -> None:
        """No adapter active: every wrapped layer computes its base layer only."""
        for layer in self._tuner_layers():
            layer.enable_adapters(False)
        self._restore_grad_flags()


class AdapterCache:
    """The adapters a worker keeps for its UNet: `fetch(name, sha256) -> bytes` reads a LoRA file
    (the registry), the LRU bounds what stays loaded, `applied(specs)` runs a job with them."""

    def __init__(self, unet, fetch: Callable[[str, str | None], bytes], capacity_bytes: int):
        self.adapters = UnetAdapters(unet)
        self._fetch = fetch
        self._sha: dict[str, str | None] = {}
        self.lru = AdapterLRU(capacity_bytes, self._load, self._unload)

    @staticmethod
    def key(name: str, sha256: str | None) -> str:
        """Cache key: the name and content hash (a re-registered name is another adapter)."""
        return f"{name}@{(sha256 or '')[:16]}"

    def _load(self, key: str) -> tuple[Any, int]:
        name = key.split("@", 1)[0]
        data = self._fetch(name, self._sha.get(key))
        state, metadata = read_lora(data)
        info = check_lora(state, self.adapters.unet, metadata)
        self.adapters.load(key, state, info)
        param = next(self.adapters.unet.parameters())
        return info, info.parameters * param.element_size()

    def _unload(self, key: str, _info) -> None:
        self.adapters.unload(key)

    def prepare(self, specs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, float]], CacheStats]:
        keys = []
        for spec in specs:
            key = self.key(spec["name"], spec.get("sha256"))
            self._sha[key] = spec.get("sha256")
            keys.append(key)
        stats = self.lru.ensure(keys)
        return [(k, float(s["scale"])) for k, s in zip(keys, specs)], stats

    def applied(self, specs: Sequence[Mapping[str, Any]]):
        """Context manager: these adapters loaded and active for the block, none after it.
        Yields the `CacheStats` of loading them."""
        import contextlib

        @contextlib.contextmanager
        def run():
            active, stats = self.prepare(specs)
            try:
                if active:
                    self.adapters.activate(active)
                yield stats
            finally:
                self.adapters.deactivate()

        return run()
