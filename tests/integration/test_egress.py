"""Egress rules against real loopback HTTP(S) servers (no Ray): refused by default, allowed by
`egress_allow`, every redirect hop checked, DNS resolved once (a rebinding answer never reaches a
connection), and https verified for the host name while connecting to the checked address.

127.0.0.2 stands in for a public host (allowed in the tests' policy); 127.0.0.1 is the "inside"
service the rules must protect. An injected resolver plays DNS."""

from __future__ import annotations

import datetime
import http.server
import ssl
import threading

import pytest

from serving.egress import EgressPolicy, EgressRefused, FetchError, fetch

PUBLIC = "127.0.0.2"  # the stand-in public address (allowed in these tests)
INSIDE = "127.0.0.1"


class Server:
    """A loopback HTTP server that records requests; `routes`: path -> (status, headers, body)."""

    def __init__(self, host: str, port: int = 0, routes=None, tls: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.posts: list[tuple[str, bytes, str | None]] = []  # (path, body, Authorization)
        self.auth: list[str | None] = []  # the Authorization header of each request
        self.routes = routes or {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                outer.posts.append((self.path, self.rfile.read(length), self.headers.get("Authorization")))
                self.do_GET()

            def do_GET(self):  # noqa: N802
                outer.requests.append((self.path, self.headers.get("Host", "")))
                outer.auth.append(self.headers.get("Authorization"))
                status, headers, body = outer.routes.get(self.path, (200, {}, b"inside:" + self.path.encode()))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()




@pytest.fixture
def pair():
    """A 'public' server on 127.0.0.2 and an 'inside' one on 127.0.0.1, on the same port."""
    for _ in range(20):
        public = Server(PUBLIC)
        try:
            inside = Server(INSIDE, public.port)
        except OSError:
            public.close()
            continue
        yield public, inside
        public.close()
        inside.close()
        return
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


ALLOW_PUBLIC = EgressPolicy([PUBLIC])


def test_loopback_is_refused_by_default_and_fetched_when_allowed(pair):
    _, inside = pair
    url = f"http://{INSIDE}:{inside.port}/secret"
    with pytest.raises(EgressRefused, match="127.0.0.1 is a loopback address") as err:
        fetch(url, policy=EgressPolicy(), timeout=5)
    assert err.value.address_class == "loopback"
    with pytest.raises(EgressRefused):
        fetch(f"http://localhost:{inside.port}/secret", policy=EgressPolicy(), timeout=5)
    assert inside.requests == []  # nothing reached it
    assert fetch(url, policy=EgressPolicy([INSIDE]), timeout=5).body == b"inside:/secret"


@pytest.mark.parametrize("location", [
    "http://127.0.0.1:{port}/secret",
    "http://localhost:{port}/secret",
    "http://[::ffff:127.0.0.1]:{port}/secret",
    "http://inside.example:{port}/secret",  # a name that resolves to loopback
    "http://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd",
])
def test_a_redirect_to_an_inside_address_is_refused(pair, dns, location):
    public, inside = pair
    answers, _ = dns
    answers["images.example"] = [[PUBLIC]]
    answers["inside.example"] = [[INSIDE]]
    answers["localhost"] = [[INSIDE]]
    public.routes["/a.png"] = (302, {"Location": location.format(port=inside.port)}, b"")
    with pytest.raises(EgressRefused) as err:
        fetch(f"http://images.example:{public.port}/a.png", policy=ALLOW_PUBLIC, timeout=5)
    assert public.requests == [("/a.png", f"images.example:{public.port}")]  # the Host header names the host
    assert inside.requests == []
    assert err.value.url != f"http://images.example:{public.port}/a.png"  # refused at the hop


def test_redirects_within_the_rules_are_followed_and_bounded(pair, dns):
    public, _ = pair
    answers, _ = dns
    answers["images.example"] = [[PUBLIC]]
    public.routes["/a"] = (301, {"Location": "/b"}, b"")
    public.routes["/b"] = (307, {"Location": f"http://{PUBLIC}:{public.port}/c.png"}, b"")
    public.routes["/c.png"] = (200, {}, b"PNG")
    resp = fetch(f"http://images.example:{public.port}/a", policy=ALLOW_PUBLIC, timeout=5)
    assert resp.body == b"PNG" and len(resp.hops) == 3
    public.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(f"http://{PUBLIC}:{public.port}/loop", policy=ALLOW_PUBLIC, timeout=5)
    public.routes["/gone"] = (404, {}, b"")
    with pytest.raises(FetchError) as err:
        fetch(f"http://{PUBLIC}:{public.port}/gone", policy=ALLOW_PUBLIC, timeout=5)
    assert err.value.status == 404


def test_a_name_resolving_to_loopback_is_refused_unless_allowed(pair, dns):
    _, inside = pair
    answers, _ = dns
    answers["images.example"] = [[INSIDE]]
    url = f"http://images.example:{inside.port}/x.png"
    with pytest.raises(EgressRefused, match="images.example resolves to 127.0.0.1, a loopback address"):
        fetch(url, policy=EgressPolicy(), timeout=5)
    assert inside.requests == []
    assert fetch(url, policy=EgressPolicy(["images.example"]), timeout=5).body == b"inside:/x.png"
    assert inside.requests == [("/x.png", f"images.example:{inside.port}")]


def test_dns_rebinding_cannot_swap_the_address_after_the_check(pair, dns):
    """The name answers the allowed address first and the inside one afterwards: the fetch uses
    its one checked answer, so the inside server never sees a request."""
    public, inside = pair
    answers, calls = dns
    answers["rebind.example"] = [[PUBLIC], [INSIDE]]
    resp = fetch(f"http://rebind.example:{public.port}/x.png", policy=ALLOW_PUBLIC, timeout=5)
    assert resp.body == b"inside:/x.png" and public.requests and inside.requests == []
    assert calls == ["rebind.example"]
    # the next fetch asks again, gets the inside address, and is refused
    with pytest.raises(EgressRefused):
        fetch(f"http://rebind.example:{public.port}/x.png", policy=ALLOW_PUBLIC, timeout=5)
    assert inside.requests == []


def test_a_webhook_post_keeps_its_credentials_on_its_origin_only(pair):
    """What a webhook sender would do: POST with a credential; a same-origin 307 keeps method,
    body and credential, a redirect to another origin gets neither the body nor the credential."""
    public, inside = pair
    public.routes["/hook"] = (307, {"Location": "/hook2"}, b"")
    public.routes["/hook2"] = (302, {"Location": f"http://{INSIDE}:{inside.port}/landed"}, b"")
    policy = EgressPolicy([PUBLIC, INSIDE])
    resp = fetch(f"http://{PUBLIC}:{public.port}/hook", policy=policy, timeout=5, method="POST", body=b'{"a": 1}',
                 headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"})
    assert resp.body == b"inside:/landed"
    assert public.posts == [("/hook", b'{"a": 1}', "Bearer s3cret"), ("/hook2", b'{"a": 1}', "Bearer s3cret")]
    assert inside.posts == [] and inside.auth == [None]


# --- https: connect to the checked address, verify the certificate for the name -----------------


def _tls_pair(tmp_path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return server_ctx, client_ctx


def test_https_connects_to_the_checked_address_and_verifies_the_certificate_for_the_name(tmp_path, dns):
    server_ctx, client_ctx = _tls_pair(tmp_path, "images.example")
    server = Server(PUBLIC, tls=server_ctx)
    try:
        answers, _ = dns
        answers["images.example"] = [[PUBLIC], [INSIDE]]
        answers["other.example"] = [[PUBLIC]]
        resp = fetch(f"https://images.example:{server.port}/a.png", policy=ALLOW_PUBLIC, timeout=5,
                     ssl_context=client_ctx)
        assert resp.body == b"inside:/a.png" and server.requests == [("/a.png", f"images.example:{server.port}")]
        # the same server under a name its certificate does not carry, or by address: refused by TLS
        for url in (f"https://other.example:{server.port}/a.png", f"https://{PUBLIC}:{server.port}/a.png"):
            with pytest.raises(FetchError, match="certificate"):
                fetch(url, policy=ALLOW_PUBLIC, timeout=5, ssl_context=client_ctx)
        # without the test CA the certificate is not trusted at all
        answers["images.example"] = [[PUBLIC]]
        with pytest.raises(FetchError, match="certificate"):
            fetch(f"https://images.example:{server.port}/a.png", policy=ALLOW_PUBLIC, timeout=5)
    finally:
        server.close()
