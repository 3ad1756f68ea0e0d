"""Egress rules: which addresses the farm may fetch from on a caller's behalf (batch image URLs,
webhooks), in one place.

A URL a caller hands the farm must not become a way into what only the farm can reach: its own
loopback services (`/metrics`, the Ray dashboard, a database), the private network around it, or a
cloud metadata service (credentials). So by default the farm refuses

    loopback      127.0.0.0/8, ::1
    link-local    169.254.0.0/16, fe80::/10
    private       10/8, 172.16/12, 192.168/16, fc00::/7, 100.64.0.0/10 (carrier-grade NAT)
    metadata      169.254.169.254, 169.254.170.2, fd00:ec2::254, metadata.google.internal, ...
    unspecified   0.0.0.0/8, ::
    multicast     224.0.0.0/4, ff00::/8
    reserved      everything else that is not globally routable (240/4, broadcast, documentation
                  and benchmarking ranges, IPv4-compatible IPv6, Teredo, ...)

IPv6 forms that carry an IPv4 address (`::ffff:a.b.c.d`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`)
are judged by the IPv4 address inside. `egress_allow` (`I2V_EGRESS_ALLOW`, comma-separated) lists
CIDRs, addresses or host names (`images.internal`, `*.corp.example`) the farm may reach anyway; a
metadata address is allowed only when listed exactly (`169.254.169.254`, or a metadata host name such
as `metadata.google.internal`); a `169.254.0.0/16` entry or another allowed name resolving there
does not open it.

How a fetch stays inside these rules (`fetch()`):
* only `http` and `https`; any port;
* the host is resolved **once**, every address it resolves to is checked, and the connection goes
  to a checked address (no second lookup a DNS-rebinding answer could change); the request still
  carries the name (`Host` header, and for https the SNI and certificate check are for the name);
* redirects are followed by hand (at most `max_redirects`), each hop resolved and checked again;
* environment proxies are not used (a proxy would do its own lookups, outside these rules).

A refusal raises `EgressRefused` (`code = "egress_refused"`) naming the host, the address and its
class, and how to allow it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: host, port -> the addresses the host resolves to (strings). Tests inject their own.
Resolver = Callable[[str, int], list[str]]

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",    # AWS ECS task metadata
    "169.254.169.253",  # AWS DNS resolver
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",    # AWS IMDS over IPv6
))
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
})

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
USER_AGENT = "i2v-farm"


class EgressRefused(Exception):
    """The farm will not connect there (or the URL is not one it fetches)."""

    code = "egress_refused"

    def __init__(self, message: str, *, url: str = "", host: str = "", address: str | None = None,
                 address_class: str | None = None):
        super().__init__(message)
        self.message, self.url, self.host = message, url, host
        self.address, self.address_class = address, address_class


class FetchError(Exception):
    """The fetch went wrong for another reason: no answer, an HTTP error status, too large, too slow."""

    def __init__(self, message: str, *, status: int | None = None, kind: str = "unreachable"):
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind


# --- address classes ---------------------------------------------------------------------------


def address_class(ip: str | IPAddress) -> str | None:
    """The class of an address the farm refuses by default (`loopback`, `link-local`, `private`,
    `metadata`, `unspecified`, `multicast`, `reserved`), or None for a public address."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return address_class(inner)
        if ip in _IPV4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
            return "reserved"  # deprecated IPv4-compatible ::a.b.c.d
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "unspecified"  # connecting to 0.0.0.0 reaches this host
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip in _CGNAT or any(ip in net for net in _PRIVATE if net.version == ip.version):
        return "private"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private or ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


_DESCRIPTIONS = {
    "loopback": "a loopback address (this machine)",
    "link-local": "a link-local address",
    "private": "a private-network address",
    "metadata": "a cloud metadata address",
    "unspecified": "an unspecified address (this machine)",
    "multicast": "a multicast address",
    "reserved": "a reserved, not globally routable address",
}


# --- the policy --------------------------------------------------------------------------------


def default_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (getaddrinfo, TCP), in the system's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = sockaddr[0]
        if isinstance(addr, str) and addr not in seen:
            seen.append(addr)
    return seen


_resolver_lock = threading.Lock()
_resolver: Resolver = default_resolver


def set_resolver(resolver: Resolver | None) -> Resolver:
    """Replace how host names are resolved (tests simulate DNS); None restores the system's.
    Returns the previous resolver."""
    global _resolver
    with _resolver_lock:
        old, _resolver = _resolver, resolver or default_resolver
    return old


def resolve(host: str, port: int) -> list[str]:
    return list(_resolver(host, port))


def _norm_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True)
class Target:
    """Where one hop of a fetch connects: the name it asks for and the checked addresses."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


@dataclass
class EgressPolicy:
    """The egress rules with an operator's allow-list (`egress_allow`)."""

    allow: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._networks: list[IPNetwork] = []
        self._hosts: set[str] = set()
        self._suffixes: list[str] = []
        for entry in self.allow:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _norm_host(entry)
            if name.startswith("*."):
                self._suffixes.append(name[1:])  # ".corp.example"
            elif name and all(c.isalnum() or c in "-._" for c in name):
                self._hosts.add(name)
            else:
                raise ValueError(f"egress_allow: {entry!r} is not a CIDR, an address or a host name")

    @classmethod
    def from_settings(cls, settings: Any) -> "EgressPolicy":
        return cls(list(getattr(settings, "egress_allow", None) or []))

    # --- checks ---------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        name = _norm_host(host)
        return name in self._hosts or any(name.endswith(s) for s in self._suffixes)

    def address_allowed(self, ip: str | IPAddress) -> bool:
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip.split("%", 1)[0])
        forms = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            forms.append(ip.ipv4_mapped)
        exact_only = any(f in METADATA_ADDRESSES for f in forms)
        for net in self._networks:
            for f in forms:
                if f.version == net.version and f in net and (not exact_only or net.num_addresses == 1):
                    return True
        return False

    def check_address(self, host: str, ip: str, url: str = "") -> None:
        """Raise `EgressRefused` unless the farm may connect to `ip` (which `host` resolved to)."""
        cls = address_class(ip)
        if cls is None or self.address_allowed(ip):
            return
        name = _norm_host(host)
        if cls == "metadata" and name in METADATA_HOSTS and name in self._hosts:
            return  # metadata: only a metadata host listed by its name (never a wildcard, a CIDR or another name)
        if cls != "metadata" and self.host_allowed(host):
            return
        where = f"{ip} is" if host == ip else f"{host} resolves to {ip},"
        raise EgressRefused(
            f"egress refused: {where} {_DESCRIPTIONS[cls]}; the farm does not fetch from {cls} addresses "
            "unless the operator allows them (egress_allow / I2V_EGRESS_ALLOW)",
            url=url, host=host, address=ip, address_class=cls)

    def target(self, url: str) -> Target:
        """Check a URL and resolve its host once: the addresses a connection may use."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise EgressRefused(f"egress refused: bad URL {url!r}: {exc}", url=url) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise EgressRefused(f"egress refused: only http:// and https:// URLs are fetched, not {scheme or 'no'}"
                                f" scheme ({url!r})", url=url)
        host = parts.hostname or ""
        if not host:
            raise EgressRefused(f"egress refused: the URL {url!r} names no host", url=url)
        try:
            host.encode("ascii")
        except UnicodeEncodeError:
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise EgressRefused(f"egress refused: bad host name {host!r}", url=url, host=host) from None
        port = port or (443 if scheme == "https" else 80)
        name = _norm_host(host)
        try:
            literal = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            self.check_address(str(literal), str(literal), url)
            return Target(scheme, host, port, (host,))
        if name in METADATA_HOSTS and name not in self._hosts:
            raise EgressRefused(
                f"egress refused: {host} is a cloud metadata service; the farm does not fetch from metadata "
                "addresses unless the operator allows that host by name (egress_allow / I2V_EGRESS_ALLOW)",
                url=url, host=host, address_class="metadata")
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise FetchError(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
        if not addresses:
            raise FetchError(f"cannot resolve {host}: no addresses")
        checked = []
        for ip in addresses:
            try:
                ipaddress.ip_address(ip.split("%", 1)[0])
            except ValueError:
                raise EgressRefused(f"egress refused: {host} resolved to {ip!r}, not an address", url=url,
                                    host=host) from None
            self.check_address(host, ip, url)  # every answer: a mixed answer is refused as a whole
            checked.append(ip)
        return Target(scheme, host, port, tuple(checked))


# --- fetching ----------------------------------------------------------------------------------


def _connect(addresses: Iterable[str], port: int, timeout: float) -> socket.socket:
    """A TCP connection to the first of these (already checked) addresses that answers."""
    last: OSError | None = None
    for ip in addresses:
        try:
            return socket.create_connection((ip, port), timeout=timeout)  # numeric: no lookup
        except OSError as exc:
            last = exc
    raise last or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a checked address; the Host header names the host."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._addresses = target.addresses

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self.port, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address; SNI and the certificate check are for the host name."""

    def __init__(self, target: Target, timeout: float, context: ssl.SSLContext):
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._addresses = target.addresses
        self._ctx = context

    def connect(self) -> None:
        sock = _connect(self._addresses, self.port, self.timeout)
        try:
            self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


@dataclass
class Response:
    url: str  # the last hop's URL
    status: int
    headers: dict[str, str]
    body: bytes
    hops: list[str]  # every URL requested, redirects included


#: Request headers that carry a credential: not sent along a redirect to another origin.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # refused by the next hop's check
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or (443 if parts.scheme == "https" else 80)


def fetch(url: str, *, policy: EgressPolicy, timeout: float = 30.0, max_bytes: int = 20 * 2**20,
          max_redirects: int = MAX_REDIRECTS, total_timeout: float | None = None,
          headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None,
          too_large: Callable[[int], Exception] | None = None, method: str = "GET",
          body: bytes | None = None) -> Response:
    """`method` (GET; POST for a webhook) `url` within the egress rules (see the module doc),
    following redirects by hand (303, and 301/302 after a POST, continue as a GET without the
    body; credential headers are dropped when a redirect leaves the origin).

    Raises `EgressRefused` for a URL or hop the rules refuse, `FetchError` for anything else
    (no answer, HTTP status >= 400, more than `max_bytes`, slower than `total_timeout`), or what
    `too_large(size)` returns when the body is over `max_bytes`.
    """
    context = ssl_context or ssl.create_default_context()
    headers = dict(headers or {})
    deadline = time.monotonic() + (total_timeout if total_timeout is not None else 4 * timeout)
    hops: list[str] = []
    current = url
    while True:
        target = policy.target(current)
        hops.append(current)
        parts = urlsplit(current)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = _PinnedHTTPSConnection(target, timeout, context)
        else:
            conn = _PinnedHTTPConnection(target, timeout)
        try:
            try:
                conn.request(method, path, body=body, headers={"User-Agent": USER_AGENT, "Accept": "*/*",
                                                                "Connection": "close", **headers})
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                raise FetchError(f"cannot download {current}: TLS certificate: {exc.verify_message or exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                raise FetchError(f"cannot download {current}: {getattr(exc, 'strerror', None) or exc}") from None
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"cannot download {current}: HTTP {resp.status} without a Location",
                                     status=resp.status)
                if len(hops) > max_redirects:
                    raise FetchError(f"cannot download {url}: more than {max_redirects} redirects",
                                     status=resp.status, kind="redirects")
                following = urljoin(current, location.strip())
                if _origin(following) != _origin(current):
                    headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
                if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                    method, body = "GET", None
                current = following
                continue
            if resp.status >= 400:
                raise FetchError(f"cannot download {current}: HTTP {resp.status} {resp.reason}", status=resp.status,
                                 kind="http")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise (too_large(int(length)) if too_large else
                       FetchError(f"{current} is {length} bytes, over {max_bytes}", kind="too_large"))
            chunks, size = [], 0
            while True:
                try:
                    chunk = resp.read(2**16)
                except (OSError, http.client.HTTPException) as exc:
                    raise FetchError(f"cannot download {current}: {getattr(exc, 'strerror', None) or exc}") from None
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise (too_large(size) if too_large else
                           FetchError(f"{current} is over {max_bytes} bytes", kind="too_large"))
                if time.monotonic() > deadline:
                    raise FetchError(f"downloading {url} took longer than "
                                     f"{(total_timeout if total_timeout is not None else 4 * timeout):.0f} s",
                                     kind="timeout")
            return Response(current, resp.status, {k: v for k, v in resp.getheaders()}, b"".join(chunks), hops)
        finally:
            conn.close()
