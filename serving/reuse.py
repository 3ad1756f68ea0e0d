"""Result reuse: a request identical to one that already succeeded answers at once.

Identical means the same image bytes, every parameter that changes the video, an explicit seed,
and the same model (and dtype) and LoRA adapters. Such a request gets a new job, `succeeded` at
once, whose `result` is the earlier job's and whose `reused_from` names it; no GPU runs. The
caller opts out with `reuse: false`.

- The reuse key (`reuse_key`) is a SHA-256 over a canonical JSON of those inputs; it is stored with
  every job that has an explicit seed (the job store indexes it). A job without an explicit seed
  has no key: its seed was picked at random, so asking again means "another video".
- Caller isolation: only the caller's own jobs are reused (an admin token: anyone's).
- A result deleted from storage (`i2v-farm gc`) is never reused: the candidate's video is looked
  up in storage first.
- `priority`, `preset` and `preview` do not change the video (a preset only fills in the fields it
  names, which are part of the key; live previews only read the latents), so they are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.errors import InvalidRequest

#: Parameters that do not change the video.
NOT_IN_KEY = frozenset({"priority", "preset", "preview"})
#: Bumped when what goes into the key changes (old keys then stop matching).
KEY_VERSION = 1


def reuse_key(params: dict[str, Any], image: bytes, model: str, dtype: str = "auto") -> str | None:
    """The reuse key of a request (validated parameters with the seed the caller gave), or None
    when the caller gave no seed (such a job is never reused)."""
    if params.get("seed") is None:
        return None
    canon = {
        "v": KEY_VERSION,
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "model": model,
        "dtype": dtype,
        "params": {k: v for k, v in sorted(params.items()) if k not in NOT_IN_KEY and v is not None},
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def pop_reuse(fields: dict[str, Any]) -> bool:
    """Take the `reuse` field out of the request fields: True (default) or False. Form values
    come as text (`true`/`false`, `1`/`0`); anything else is a 422 naming the field."""
    value = fields.pop("reuse", None)
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidRequest(f"'reuse' must be true or false, got {value!r}", field="reuse")


def gpu_seconds(record: dict[str, Any]) -> float:
    """The GPU time a succeeded job took (what reusing its result saves): its worker's `total`
    (render + encode), else the manager's `run`, else 0."""
    timings = record.get("timings") or {}
    for name in ("total", "run"):
        value = timings.get(name)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return 0.0
