"""API tokens: who may use the farm, how fast, and whose jobs they see.

Access control is on whenever the farm listens beyond loopback (`auth: auto`), or forced with
`auth: on|off`. A caller sends `Authorization: Bearer <token>` (the web page exchanges the token
for an HttpOnly cookie at `POST /v1/login`). Tokens are random 32-byte strings shown once when
created (`i2v-farm token create NAME`); only their SHA-256 is stored, in the tokens file (a JSON
list, mode 0600) beside the job store. Each token has:

- `admin`: sees and cancels every job (others see only their own jobs: other jobs answer 404);
- `rate_per_min`: job submissions per minute (a token bucket; over it: 429 + Retry-After);
- `max_active`: queued + running jobs at once (over it: 429).

The tokens file is re-read when it changes, so tokens can be added or revoked while the farm runs.
With access control off every caller is the admin `anonymous`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOKEN_PREFIX = "i2v_"
COOKIE = "i2v_token"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool
    rate_per_min: float
    max_active: int


ANONYMOUS = Caller(name="anonymous", admin=True, rate_per_min=math.inf, max_active=1 << 30)


def auth_enabled(mode: str, host: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return host not in LOOPBACK_HOSTS


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The tokens file: `[{"name", "sha256", "admin", "rate_per_min", "max_active"}, ...]`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._by_hash: dict[str, Caller] = {}

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._by_hash, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        entries = json.loads(self.path.read_text() or "[]")
        self._by_hash = {
            e["sha256"]: Caller(e["name"], bool(e.get("admin")), float(e["rate_per_min"]), int(e["max_active"]))
            for e in entries
        }
        self._mtime = mtime

    def entries(self) -> list[dict]:
        try:
            return json.loads(self.path.read_text() or "[]")
        except FileNotFoundError:
            return []

    def verify(self, token: str | None) -> Caller | None:
        if not token:
            return None
        digest = hash_token(token)
        with self._lock:
            self._load()
            for known, caller in self._by_hash.items():
                if hmac.compare_digest(known, digest):
                    return caller
        return None

    def create(self, name: str, *, admin: bool = False, rate_per_min: float = 30, max_active: int = 20) -> str:
        """Add a token; returns it (the only time it is seen in clear)."""
        if not name or not all(c.isalnum() or c in "-_.@" for c in name) or len(name) > 64:
            raise ValueError("token name: 1-64 letters, digits, '-', '_', '.', '@'")
        entries = self.entries()
        if any(e["name"] == name for e in entries):
            raise ValueError(f"a token named {name!r} exists; revoke it first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entries.append(asdict(Caller(name, admin, rate_per_min, max_active)) | {"sha256": hash_token(token)})
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self.entries()
        kept = [e for e in entries if e["name"] != name]
        self._write(kept)
        return len(kept) != len(entries)

    def _write(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=2)
        os.replace(tmp, self.path)


class RateLimiter:
    """A token bucket per caller: `rate_per_min` per minute, bursts up to that many."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, caller: Caller) -> float:
        """0 when allowed; else the seconds until the next submission is."""
        if math.isinf(caller.rate_per_min):
            return 0.0
        now = time.monotonic()
        rate = caller.rate_per_min / 60.0
        with self._lock:
            level, last = self._buckets.get(caller.name, (caller.rate_per_min, now))
            level = min(caller.rate_per_min, level + (now - last) * rate)
            if level >= 1:
                self._buckets[caller.name] = (level - 1, now)
                return 0.0
            self._buckets[caller.name] = (level, now)
            return (1 - level) / rate if rate > 0 else math.inf


def add_commands(subparsers) -> None:
    tok = subparsers.add_parser("token", help="create, list or revoke API tokens",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = tok.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a token (printed once)")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true", help="sees and cancels every job")
    create.add_argument("--rate", type=float, default=30, help="job submissions per minute (default 30)")
    create.add_argument("--max-active", type=int, default=20, help="queued + running jobs at once (default 20)")
    create.set_defaults(func=cmd_token)
    sub.add_parser("list", help="list tokens (names and limits)").set_defaults(func=cmd_token)
    revoke = sub.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_token)


def tokens_path(settings) -> Path:
    return Path(settings.tokens_file) if settings.tokens_file else Path(settings.job_db).parent / "tokens.json"


def cmd_token(args) -> int:
    from pipeline.errors import I2VError

    from .config import load_settings

    store = TokenStore(tokens_path(load_settings().resolved()))
    if args.token_command == "create":
        try:
            token = store.create(args.name, admin=args.admin, rate_per_min=args.rate, max_active=args.max_active)
        except ValueError as exc:
            raise I2VError(str(exc), field="name") from None
        print(token)
        print(f"token {args.name!r} saved (hashed) in {store.path}; it is shown only now", file=sys.stderr)
    elif args.token_command == "list":
        for e in store.entries():
            print(f"{e['name']}\t{'admin' if e.get('admin') else 'user'}\t{e['rate_per_min']:g}/min\t"
                  f"max {e['max_active']} active")
    else:
        if not store.revoke(args.name):
            raise I2VError(f"no token named {args.name!r}", field="name")
        print(f"token {args.name!r} revoked")
    return 0
