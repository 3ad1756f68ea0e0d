"""Webhooks: the farm calls the caller back when a job ends (docs/webhooks.md).

A job may carry `webhook` (an https URL; http only to a host `egress_allow` lists) and
`webhook_events` (`succeeded`, `failed`, `canceled`, or `all`, the default). When the job ends in
one of those, the farm POSTs the job's JSON (what `GET /v1/jobs/{id}` shows) to the URL with

    Content-Type: application/json
    X-I2V-Event: succeeded                      the job's final status
    X-I2V-Delivery: 17                          the delivery's id (the same on every retry)
    X-I2V-Timestamp: 1764130000                 unix seconds of this attempt
    X-I2V-Signature: sha256=<hex>               HMAC-SHA256(secret, timestamp + "." + body)

The secret is the caller's token's webhook secret (shown once by `i2v-farm token create`, or a
new one by `i2v-farm token webhook-secret NAME`); jobs of a farm without access control, and of
tokens made before webhooks existed, are signed with the farm's secret (`i2v-farm webhook-secret`).
Secrets are kept in `webhook_secrets.json` beside the tokens file, mode 0600 (the farm must be
able to sign, so they are stored, unlike the tokens, of which only a hash is kept).

Delivery: a 2xx answer delivers it. 5xx, 408, 429, timeouts and connection errors are retried with
exponential backoff (`webhook_backoff_s`, default 1 s, then 2 s, 4 s, ... at most `MAX_BACKOFF_S`)
until `webhook_retry_s` has passed since the job ended; any other answer (4xx, a redirect) or an
egress refusal gives up at once. Pending deliveries live in the job store (table
`webhook_deliveries`), so a farm restart does not lose them; each job records its deliveries
(`deliveries`: event, attempts, state, last_status, last_error, delivered_at). Delivery is at least
once: a receiver deduplicates by `X-I2V-Delivery`.

The URL obeys the farm's egress rules (`serving.egress`) at submission and again at every attempt
(DNS may have changed). Deliveries run in the job manager's replica, in an asyncio task with its
own small thread pool (at most `MAX_CONCURRENT` POSTs at once): never in a worker, never on the
manager's dispatch loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from pipeline.errors import InvalidRequest

from .egress import EgressPolicy, EgressRefused, FetchError, fetch

log = logging.getLogger(__name__)

EVENTS = ("succeeded", "failed", "canceled")
SIGNATURE_HEADER = "X-I2V-Signature"
TIMESTAMP_HEADER = "X-I2V-Timestamp"
EVENT_HEADER = "X-I2V-Event"
DELIVERY_HEADER = "X-I2V-Delivery"
MAX_URL_CHARS = 2048
MAX_CONCURRENT = 8
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0
#: A receiver should refuse a signature older than this (replay); `verify` uses it.
DEFAULT_TOLERANCE_S = 300
#: Answers worth retrying (besides every 5xx).
RETRY_STATUSES = frozenset({408, 429})
SECRETS_FILE = "webhook_secrets.json"
FARM_SECRET = "farm"


# --- the request fields --------------------------------------------------------------------------


def pop_webhook(fields: dict[str, Any], policy: EgressPolicy) -> dict[str, Any] | None:
    """Take `webhook` and `webhook_events` out of the request fields and check them (the URL
    against the egress rules: this resolves its host, so call it off the event loop). Returns
    `{"url", "events"}` or None without a webhook; `InvalidRequest` (422) names the bad field."""
    url = fields.pop("webhook", None)
    given = fields.pop("webhook_events", None)
    events = parse_events(given)
    if url is None or url == "":
        if given not in (None, "", []):
            raise InvalidRequest("'webhook_events' needs a 'webhook' URL", field="webhook_events")
        return None
    return {"url": check_url(url, policy), "events": events}


def parse_events(value: Any) -> list[str]:
    """`webhook_events`: a list, or text with commas (a form field); `all` or nothing: every event."""
    if value is None or value == "" or value == []:
        return list(EVENTS)
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise InvalidRequest("'webhook_events' must be a list of events (or comma-separated text): "
                             f"{', '.join(EVENTS)} or all", field="webhook_events")
    if "all" in items:
        return list(EVENTS)
    bad = [v for v in items if v not in EVENTS]
    if bad or not items:
        raise InvalidRequest(f"'webhook_events' must name events among {', '.join(EVENTS)} (or all), "
                             f"got {bad[0] if bad else value!r}", field="webhook_events")
    return [e for e in EVENTS if e in items]


def check_url(url: Any, policy: EgressPolicy) -> str:
    """The webhook URL, checked: https (http only to a host or address `egress_allow` lists), no
    credentials in it, and within the egress rules (its host resolved and every address checked)."""
    if not isinstance(url, str):
        raise InvalidRequest("'webhook' must be a URL (text)", field="webhook")
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest(f"'webhook' may be at most {MAX_URL_CHARS} characters", field="webhook")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise InvalidRequest(f"'webhook' is not a valid URL: {exc}", field="webhook") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("'webhook' must be an https:// URL (http:// only to hosts the farm's egress_allow "
                             "lists)", field="webhook")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("'webhook' must not carry credentials (user:password@); verify the "
                             f"{SIGNATURE_HEADER} header instead", field="webhook")
    try:
        target = policy.target(url)
    except EgressRefused as exc:
        raise InvalidRequest(f"'webhook': {exc.message}", field="webhook", code="egress_refused") from None
    except FetchError as exc:
        raise InvalidRequest(f"'webhook': {exc.message}", field="webhook") from None
    if scheme == "http" and not (policy.host_allowed(target.host)
                                 or all(policy.address_allowed(a) for a in target.addresses)):
        raise InvalidRequest(f"'webhook' must use https: http:// is allowed only to hosts the farm's egress_allow "
                             f"lists, and {target.host} is not one", field="webhook")
    return url


# --- signing -----------------------------------------------------------------------------------


def sign(secret: str, timestamp: str | int, body: bytes) -> str:
    """`X-I2V-Signature` of a body: `sha256=` + hex HMAC-SHA256(secret, f"{timestamp}." + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent (headers are
    looked up case-insensitively)."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    signature = lower.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class SecretStore:
    """`webhook_secrets.json`: `{"farm": SECRET, "tokens": {NAME: SECRET}}`, mode 0600, beside the
    tokens file. Re-read when it changes (the CLI writes it while the farm runs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, Any]) -> None:
        from .files import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=2), 0o600)

    def farm_secret(self) -> str:
        """The farm's secret (made on first use)."""
        with self._lock:
            data = self._read()
            if not data.get(FARM_SECRET):
                data[FARM_SECRET] = new_secret()
                self._write(data)
            return data[FARM_SECRET]

    def create(self, name: str) -> str:
        """A new secret for token `name` (replacing any it had); returns it."""
        with self._lock:
            data = self._read()
            secret = new_secret()
            data.setdefault("tokens", {})[name] = secret
            self._write(data)
            return secret

    def remove(self, name: str) -> bool:
        with self._lock:
            data = self._read()
            found = data.get("tokens", {}).pop(name, None) is not None
            if found:
                self._write(data)
            return found

    def secret_for(self, owner: str) -> str:
        """The secret that signs `owner`'s deliveries: its token's, else the farm's."""
        found = self._read().get("tokens", {}).get(owner)
        return found if isinstance(found, str) and found else self.farm_secret()


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def secrets_path(settings: Any) -> Path:
    """`webhook_secrets.json` beside the tokens file (default: beside the job store)."""
    from .auth import tokens_path

    return tokens_path(settings).parent / SECRETS_FILE


# --- delivery ----------------------------------------------------------------------------------


def backoff_s(attempts: int, first: float = FIRST_BACKOFF_S) -> float:
    """Seconds before the next try after `attempts` failed ones: `first` (the `webhook_backoff_s`
    setting; default 1), then doubling (2, 4, ...), at most MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, first * 2 ** max(0, attempts - 1))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


class Attempt:
    """How one POST went: `delivered`, `retry` (worth trying again) or `give_up`."""

    def __init__(self, outcome: str, status: int | None = None, error: str | None = None):
        self.outcome, self.status, self.error = outcome, status, error


def post(url: str, body: bytes, headers: dict[str, str], policy: EgressPolicy, timeout: float) -> Attempt:
    """One POST within the egress rules (checked again now), no redirects followed."""
    try:
        resp = fetch(url, policy=policy, timeout=timeout, total_timeout=2 * timeout, method="POST", body=body,
                     headers={"Content-Type": "application/json", **headers}, max_redirects=0, max_bytes=65536)
    except EgressRefused as exc:
        return Attempt("give_up", None, exc.message)
    except FetchError as exc:
        if exc.kind == "too_large":  # the answer came (status < 400), only its body was long
            return Attempt("delivered", None, None)
        if exc.kind == "http" and exc.status is not None:
            retry = exc.status >= 500 or exc.status in RETRY_STATUSES
            return Attempt("retry" if retry else "give_up", exc.status, exc.message)
        if exc.kind == "redirects":
            return Attempt("give_up", exc.status, "the receiver answered with a redirect (not followed)")
        return Attempt("retry", exc.status, exc.message)
    except Exception as exc:  # noqa: BLE001 - an unexpected error is worth another try
        return Attempt("retry", None, f"{type(exc).__name__}: {exc}")
    return Attempt("delivered", resp.status, None)


class WebhookDispatcher:
    """Sends the job store's pending deliveries from an asyncio task of the job manager.

    `payload(job_id)` gives the job's JSON (dict) as clients see it, or None when the job is gone;
    `on_attempt(outcome)` counts attempts (metrics)."""

    def __init__(self, store: Any, settings: Any, payload: Callable[[str], dict[str, Any] | None],
                 on_attempt: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time):
        self.store = store
        self.settings = settings
        self.payload = payload
        self.on_attempt = on_attempt or (lambda outcome: None)
        self.clock = clock
        self.policy = EgressPolicy.from_settings(settings)
        self.secrets = SecretStore(secrets_path(settings))
        self.pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="webhook")
        self._wake = asyncio.Event()
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        for rec in self.store.ended_without_delivery():  # ended just before the farm stopped
            self.job_ended(rec)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- queueing ---------------------------------------------------------------------------

    def job_ended(self, rec: dict[str, Any]) -> None:
        """A job reached a final status: queue its delivery if its webhook wants this event."""
        hook = rec.get("webhook")
        status = str(rec.get("status"))
        if not hook or status not in hook.get("events", EVENTS):
            return
        if any(d.get("event") == status for d in rec.get("deliveries") or []):
            return  # queued already (a job ends once; a second call must not send twice)
        now = self.clock()
        delivery_id = self.store.add_delivery(rec["id"], status, hook["url"], now)
        self._record(rec["id"], {"id": delivery_id, "event": status, "state": "pending", "attempts": 0,
                                 "last_status": None, "last_error": None, "delivered_at": None,
                                 "next_attempt_at": _iso(now)})
        self._wake.set()

    def _record(self, job_id: str, entry: dict[str, Any]) -> None:
        rec = self.store.get(job_id)
        if rec is None:
            return
        kept = [d for d in rec.get("deliveries") or [] if d.get("id") != entry["id"]]
        self.store.update(job_id, deliveries=sorted([*kept, entry], key=lambda d: d["id"]))

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            wait = 1.0
            try:
                now = self.clock()
                for row in self.store.due_deliveries(now, limit=4 * MAX_CONCURRENT):
                    if row["id"] in self._inflight or len(self._inflight) >= MAX_CONCURRENT:
                        continue
                    self._inflight.add(row["id"])
                    task = asyncio.get_running_loop().create_task(self._deliver(row))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                nxt = self.store.next_delivery_at()
                if nxt is not None:
                    wait = min(wait, max(0.05, nxt - self.clock()))
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("webhook loop error")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _deliver(self, row: dict[str, Any]) -> None:
        try:
            await self._attempt(row)
        except Exception:  # noqa: BLE001
            log.exception("webhook delivery %s failed unexpectedly", row["id"])
        finally:
            self._inflight.discard(row["id"])
            self._wake.set()

    async def _attempt(self, row: dict[str, Any]) -> None:
        job = self.payload(row["job_id"])
        attempts = row["attempts"] + 1
        if job is None:
            self.store.update_delivery(row["id"], state="failed", attempts=attempts, last_error="the job is gone")
            return
        owner = self.store.get(row["job_id"]).get("owner", "anonymous")
        body = json.dumps(job).encode()
        timestamp = str(int(self.clock()))
        secret = await asyncio.to_thread(self.secrets.secret_for, owner)
        headers = {EVENT_HEADER: row["event"], DELIVERY_HEADER: str(row["id"]), TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: sign(secret, timestamp, body)}
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.pool, post, row["url"], body, headers, self.policy,
                                            float(self.settings.webhook_timeout_s))
        now = self.clock()
        entry = {"id": row["id"], "event": row["event"], "attempts": attempts, "last_status": result.status,
                 "last_error": result.error, "delivered_at": None, "next_attempt_at": None}
        if result.outcome == "delivered":
            entry.update(state="delivered", delivered_at=_iso(now))
            self.store.update_delivery(row["id"], state="delivered", attempts=attempts, last_status=result.status,
                                       last_error=None, delivered_at=entry["delivered_at"])
        else:
            delay = backoff_s(attempts, float(self.settings.webhook_backoff_s))
            expired = now + delay - row["created_at"] > float(self.settings.webhook_retry_s)
            if result.outcome == "retry" and not expired:
                entry.update(state="pending", next_attempt_at=_iso(now + delay))
                self.store.update_delivery(row["id"], attempts=attempts, next_at=now + delay,
                                           last_status=result.status, last_error=result.error)
            else:
                if result.outcome == "retry":
                    entry["last_error"] = (f"{result.error}; gave up after {attempts} attempts in "
                                           f"{now - row['created_at']:.0f} s (webhook_retry_s)")
                entry.update(state="failed")
                self.store.update_delivery(row["id"], state="failed", attempts=attempts, last_status=result.status,
                                           last_error=entry["last_error"])
            log.warning("webhook %s of job %s: attempt %d %s (%s)", row["id"], row["job_id"], attempts,
                        entry["state"], result.error)
        self.on_attempt({"delivered": "delivered", "pending": "retried", "failed": "failed"}[entry["state"]])
        self._record(row["job_id"], entry)
