"""API tokens: who may use the farm, how fast, and whose jobs they see.

Access control is on whenever the farm listens beyond loopback (`auth: auto`), or forced with
`auth: on|off`. A caller sends `Authorization: Bearer <token>` (the web page exchanges the token
for an HttpOnly cookie at `POST /v1/login`). Tokens are random 32-byte strings shown once when
created (`i2v-farm token create NAME`); only their SHA-256 is stored, in the tokens file (a JSON
list, mode 0600) beside the job store. Each token has:

- `admin`: sees and cancels every job (others see only their own jobs: other jobs answer 404);
- `rate_per_min`: job submissions per minute (a token bucket; over it: 429 + Retry-After);
- `max_active`: queued + running jobs at once (over it: 429);
- `max_priority`: the highest queue priority its jobs may ask for (`low`, `normal`, `high`;
  default `normal`, an admin always `high`; above it: 403 `priority_not_allowed`);
- `expires_at` (optional, `--expires-days`): after it the token, its sessions and streams stop working.

The web page signs in at `POST /v1/login`: the farm answers with a cookie holding a random session
id (never the token); the session lives `session_ttl_s` in the ingress replica's memory and ends
with `POST /v1/logout`, when its token is revoked, or when the farm restarts.

The tokens file is re-read when it changes, so tokens can be added or revoked while the farm runs.
`token create` also makes the token's webhook secret (printed once; stored in clear, mode 0600,
in `webhook_secrets.json` beside the tokens file, since the farm signs with it: `serving.webhooks`).
With access control off every caller is the admin `anonymous`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlsplit

TOKEN_PREFIX = "i2v_"
#: The web page's session cookie: a random session id (the token itself never leaves the page).
COOKIE = "i2v_session"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
PRIORITIES = ("low", "normal", "high")


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool
    rate_per_min: float
    max_active: int
    max_priority: str = "normal"

    def may_use(self, priority: str | None) -> bool:
        """Whether this caller may ask for `priority` (an admin: any)."""
        if self.admin or priority is None:
            return True
        return PRIORITIES.index(priority) <= PRIORITIES.index(self.max_priority)


ANONYMOUS = Caller(name="anonymous", admin=True, rate_per_min=math.inf, max_active=1 << 30, max_priority="high")


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
        self._expires: dict[str, float] = {}  # sha256 -> unix time the token stops working

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._by_hash, self._expires, self._mtime = {}, {}, None
            return
        if mtime == self._mtime:
            return
        entries = json.loads(self.path.read_text() or "[]")
        self._by_hash = {e["sha256"]: _caller(e) for e in entries}
        self._expires = {e["sha256"]: float(e["expires_at"]) for e in entries if e.get("expires_at")}
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
                    return caller if self._live(known) else None
        return None

    def _live(self, digest: str) -> bool:
        expires = self._expires.get(digest)
        return expires is None or time.time() < expires

    def by_hash(self, digest: str) -> Caller | None:
        """The caller of a token known by its SHA-256 (a session's token): None once revoked."""
        with self._lock:
            self._load()
            caller = self._by_hash.get(digest)
            return caller if caller is not None and self._live(digest) else None

    def create(self, name: str, *, admin: bool = False, rate_per_min: float = 30, max_active: int = 20,
               max_priority: str = "normal", expires_in_s: float | None = None) -> str:
        """Add a token; returns it (the only time it is seen in clear)."""
        if not name or not all(c.isalnum() or c in "-_.@" for c in name) or len(name) > 64:
            raise ValueError("token name: 1-64 letters, digits, '-', '_', '.', '@'")
        entries = self.entries()
        if any(e["name"] == name for e in entries):
            raise ValueError(f"a token named {name!r} exists; revoke it first")
        if max_priority not in PRIORITIES:
            raise ValueError(f"max priority: one of {', '.join(PRIORITIES)}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        caller = Caller(name, admin, rate_per_min, max_active, "high" if admin else max_priority)
        entry = asdict(caller) | {"sha256": hash_token(token)}
        if expires_in_s is not None:
            if expires_in_s <= 0:
                raise ValueError("expiry: a positive number of days")
            entry["expires_at"] = round(time.time() + expires_in_s)
        entries.append(entry)
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self.entries()
        kept = [e for e in entries if e["name"] != name]
        self._write(kept)
        return len(kept) != len(entries)

    def _write(self, entries: list[dict]) -> None:
        from .files import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(entries, indent=2), 0o600)


def _caller(entry: dict) -> Caller:
    admin = bool(entry.get("admin"))
    priority = entry.get("max_priority") if entry.get("max_priority") in PRIORITIES else "normal"
    return Caller(entry["name"], admin, float(entry["rate_per_min"]), int(entry["max_active"]),
                  "high" if admin else priority)


class SessionStore:
    """Web page sessions: a random id in the cookie, its SHA-256 here -> (token's SHA-256, expiry).

    Kept in the memory of the ingress replica (the farm runs exactly one): a restart signs page users
    out (they paste their token again) and no session secret is ever written to disk. A session is
    valid while it has not expired (`ttl_s`), was not logged out, and its token is still in the tokens
    file. At most `per_token` sessions per token: a new one evicts that token's oldest.
    """

    def __init__(self, ttl_s: float, per_token: int = 64, clock=time.time):
        self.ttl_s = ttl_s
        self.per_token = per_token
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}  # sha256(session id) -> (sha256(token), expires)
        self._by_token: dict[str, collections.deque[str]] = {}

    def create(self, token_hash: str) -> str:
        """A new session for a (verified) token; returns the session id for the cookie."""
        sid = secrets.token_urlsafe(32)
        key = hash_token(sid)
        now = self._clock()
        with self._lock:
            self._prune(now)
            queue = self._by_token.setdefault(token_hash, collections.deque())
            while len(queue) >= self.per_token:
                self._sessions.pop(queue.popleft(), None)
            queue.append(key)
            self._sessions[key] = (token_hash, now + self.ttl_s)
        return sid

    def token_hash(self, sid: str | None) -> str | None:
        """The SHA-256 of the session's token, or None (unknown, logged out or expired)."""
        if not sid:
            return None
        key = hash_token(sid)
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                return None
            if found[1] <= self._clock():
                self._drop(key)
                return None
            return found[0]

    def revoke(self, sid: str | None) -> bool:
        if not sid:
            return False
        with self._lock:
            return self._drop(hash_token(sid))

    def revoke_token(self, token_hash: str) -> int:
        """End every session of a token (it was revoked)."""
        with self._lock:
            keys = list(self._by_token.pop(token_hash, ()))
            for key in keys:
                self._sessions.pop(key, None)
            return len(keys)

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop(self, key: str) -> bool:
        found = self._sessions.pop(key, None)
        if found is None:
            return False
        queue = self._by_token.get(found[0])
        if queue is not None:
            try:
                queue.remove(key)
            except ValueError:
                pass
            if not queue:
                del self._by_token[found[0]]
        return True

    def _prune(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._sessions.items() if exp <= now]:
            self._drop(key)


class StreamLimiter:
    """Open server-sent event streams per caller: at most `limit` at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        with self._lock:
            if self._open.get(key, 0) >= self.limit:
                return False
            self._open[key] = self._open.get(key, 0) + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)

    def count(self, key: str) -> int:
        return self._open.get(key, 0)


# --- who is asking, and from where ---------------------------------------------------------------

#: Headers a reverse proxy adds: their presence means the farm is not reached directly.
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def parse_networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """`trusted_proxies`: addresses or CIDRs (`localhost` means both loopback addresses)."""
    nets = []
    for entry in entries:
        entry = str(entry).strip()
        if not entry:
            continue
        if entry == "localhost":
            nets += [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")]
            continue
        nets.append(ipaddress.ip_network(entry, strict=False))
    return nets


def in_networks(address: str | None, nets) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in nets)


def _forwarded_for(headers: Mapping[str, str]) -> list[str]:
    return [a.strip() for a in headers.get("x-forwarded-for", "").split(",") if a.strip()]


def direct_peer(client_host: str | None, headers: Mapping[str, str]) -> str | None:
    """The address that opened the connection to Serve's proxy.

    Serve's proxy is uvicorn, which already replaces the client address with `X-Forwarded-For`'s
    when the peer is 127.0.0.1 (its `forwarded_allow_ips` default). So when the address the request
    carries is one of the `X-Forwarded-For` entries, the connection came from loopback."""
    if client_host and client_host in _forwarded_for(headers):
        return "127.0.0.1"
    return client_host


def client_address(client_host: str | None, headers: Mapping[str, str], trusted) -> str | None:
    """The caller's address: the direct peer, or, when that is a trusted proxy, the right-most
    `X-Forwarded-For` entry that is not itself a trusted proxy."""
    peer = direct_peer(client_host, headers)
    if not in_networks(peer, trusted):
        return peer
    for hop in reversed(_forwarded_for(headers)):
        if not in_networks(hop, trusted):
            return hop
    return peer


def _trusted_header(client_host, headers, trusted, name) -> str | None:
    if not in_networks(direct_peer(client_host, headers), trusted):
        return None
    value = headers.get(name, "").split(",")[0].strip()
    return value or None


def request_scheme(scheme: str, client_host: str | None, headers: Mapping[str, str], trusted) -> str:
    """`https` or `http` as the browser sees the farm: `X-Forwarded-Proto` only from a trusted proxy
    (Serve's uvicorn may already have applied it from any loopback peer: undone here)."""
    proto = _trusted_header(client_host, headers, trusted, "x-forwarded-proto")
    if proto in ("http", "https"):
        return proto
    if "x-forwarded-proto" in headers:  # said by someone not trusted: the connection's own scheme is unknown
        return "http"
    return "https" if scheme in ("https", "wss") else "http"


def request_host(client_host: str | None, headers: Mapping[str, str], trusted) -> str:
    """`host[:port]` as the browser sees the farm (`X-Forwarded-Host` only from a trusted proxy)."""
    return (_trusted_header(client_host, headers, trusted, "x-forwarded-host") or headers.get("host", "")).lower()


def origin_allowed(origin: str | None, sec_fetch_site: str | None, scheme: str, host: str) -> bool:
    """Whether a state-changing request may come from where the browser says it comes from: its
    `Origin` (when sent) must be the farm's own `scheme://host[:port]`, and `Sec-Fetch-Site` (when
    sent) must not be `cross-site` or `same-site` (another port or subdomain is another origin).
    Clients that are not browsers send neither and are let through (they authenticate by token)."""
    if sec_fetch_site and sec_fetch_site.lower() not in ("same-origin", "none"):
        return False
    if origin is None:
        return True
    if origin == "null" or not host:
        return False
    return _origin_of(origin) == _origin_of(f"{scheme}://{host}")


def _origin_of(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs have the same scheme, host and port."""
    oa = _origin_of(a)
    return oa is not None and oa == _origin_of(b)


def security_headers(*, media_origins: Iterable[str] = (), docs: bool = False) -> dict[str, str]:
    """The headers every response of the farm carries. The page has no inline script or style;
    videos and posters may come from the S3 public endpoint (presigned redirects). The API docs
    page (swagger-ui, bundled) needs inline styles and data: images."""
    media = " ".join(["'self'", "blob:", "data:", *media_origins])
    style = "'self' 'unsafe-inline'" if docs else "'self'"
    csp = (f"default-src 'self'; script-src 'self'; style-src {style}; img-src {media}; media-src {media}; "
           "connect-src 'self'; font-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
           "frame-ancestors 'none'")
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }


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
    create.add_argument("--max-priority", choices=PRIORITIES, default="normal",
                        help="highest queue priority its jobs may use (default normal; --admin: high)")
    create.add_argument("--expires-days", type=float, default=None,
                        help="the token stops working after this many days (default: never)")
    create.set_defaults(func=cmd_token)
    sub.add_parser("list", help="list tokens (names and limits)").set_defaults(func=cmd_token)
    revoke = sub.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_token)
    secret = sub.add_parser("webhook-secret", help="print the farm's webhook secret, or make a new one for a token",
                            description="Without NAME: print the farm's webhook secret (it signs the webhooks of jobs "
                                        "sent without a token, and of tokens that have no secret of their own). With "
                                        "NAME: make a new webhook secret for that token (the old one stops signing) "
                                        "and print it once. See docs/webhooks.md.")
    secret.add_argument("name", nargs="?")
    secret.set_defaults(func=cmd_token)


def tokens_path(settings) -> Path:
    return Path(settings.tokens_file) if settings.tokens_file else Path(settings.job_db).parent / "tokens.json"


def cmd_token(args) -> int:
    from pipeline.errors import I2VError

    from .config import load_settings
    from .files import apply_umask

    settings = load_settings().resolved()
    apply_umask(settings)  # the tokens file and its directory stay the farm user's
    store = TokenStore(tokens_path(settings))
    if args.token_command == "create":
        try:
            token = store.create(args.name, admin=args.admin, rate_per_min=args.rate, max_active=args.max_active,
                                 max_priority=args.max_priority,
                                 expires_in_s=args.expires_days * 86400 if args.expires_days is not None else None)
        except ValueError as exc:
            raise I2VError(str(exc), field="name") from None
        print(token)
        print(f"token {args.name!r} saved (hashed) in {store.path}; it is shown only now", file=sys.stderr)
        hook_secret = _webhook_secrets(settings).create(args.name)  # stored: the farm signs with it
        print(f"webhook secret of {args.name!r} (verifies the X-I2V-Signature of its jobs' webhooks; shown only "
              f"now): {hook_secret}", file=sys.stderr)
    elif args.token_command == "webhook-secret":
        secrets_store = _webhook_secrets(settings)
        if args.name is None:
            print(secrets_store.farm_secret())
            print(f"the farm's webhook secret ({secrets_store.path}): it signs webhooks of jobs sent without a token "
                  "and of tokens without a secret of their own", file=sys.stderr)
        else:
            if not any(e["name"] == args.name for e in store.entries()):
                raise I2VError(f"no token named {args.name!r}", field="name")
            print(secrets_store.create(args.name))
            print(f"new webhook secret of {args.name!r} (the old one no longer signs); it is shown only now",
                  file=sys.stderr)
    elif args.token_command == "list":
        for e in store.entries():
            print(f"{e['name']}\t{'admin' if e.get('admin') else 'user'}\t{e['rate_per_min']:g}/min\t"
                  f"max {e['max_active']} active\tpriority up to {_caller(e).max_priority}"
                  + (f"\texpires {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(e['expires_at']))}"
                     if e.get("expires_at") else ""))
    else:
        if not store.revoke(args.name):
            raise I2VError(f"no token named {args.name!r}", field="name")
        _webhook_secrets(settings).remove(args.name)
        print(f"token {args.name!r} revoked (its web sessions and event streams end within a second)")
    return 0


def _webhook_secrets(settings):
    """The webhook secrets beside the tokens file (`serving.webhooks.SecretStore`)."""
    from .webhooks import SecretStore, secrets_path

    return SecretStore(secrets_path(settings))
