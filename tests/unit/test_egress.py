"""Egress rules (`serving.egress`) without servers: address classes, the allow-list, URL checks,
one lookup per hop (an injected resolver stands in for DNS; no connection leaves the machine)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import egress
from serving.egress import EgressPolicy, EgressRefused, FetchError, address_class


@pytest.mark.parametrize("ip, cls", [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("febf::1", "link-local"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("100.64.0.1", "private"), ("100.127.255.255", "private"),
    ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"),
    ("2001:db8::1", "reserved"), ("::7f00:1", "reserved"), ("2001::1", "reserved"),
    # IPv6 forms of IPv4 addresses are judged by the IPv4 address
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.2.3", "private"), ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0.0.0.0", "unspecified"), ("2002:7f00:1::", "loopback"), ("2002:a00:1::1", "private"),
    ("64:ff9b::127.0.0.1", "loopback"), ("64:ff9b::a9fe:a9fe", "metadata"),
    # public
    ("8.8.8.8", None), ("1.1.1.1", None), ("172.32.0.1", None), ("100.128.0.1", None), ("11.0.0.1", None),
    ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None), ("2002:808:808::", None), ("64:ff9b::808:808", None),
])
def test_address_classes(ip, cls):
    assert address_class(ip) == cls


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@settings(max_examples=300, deadline=None)
@given(ipv4)
def test_ipv4_mapped_and_6to4_forms_are_judged_like_the_ipv4_address(ip):
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80))
    assert address_class(mapped) == address_class(ip) == address_class(sixtofour)


@settings(max_examples=300, deadline=None)
@given(st.one_of(ipv4, st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_a_refused_address_passes_only_when_allowed_and_public_ones_always(ip):
    cls = address_class(ip)
    closed = EgressPolicy()
    if cls is None:
        assert ip.is_global or (ip.version == 6 and _embedded(ip) is not None)
        closed.check_address(str(ip), str(ip))
        return
    with pytest.raises(EgressRefused) as err:
        closed.check_address(str(ip), str(ip))
    assert err.value.address_class == cls and cls in err.value.message and "egress_allow" in err.value.message
    EgressPolicy([str(ip)]).check_address(str(ip), str(ip))  # listed exactly: allowed


def _embedded(ip):
    return ip.ipv4_mapped or ip.sixtofour or (ip in ipaddress.ip_network("64:ff9b::/96") or None)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**24 - 1))
def test_every_loopback_and_ten_slash_eight_address_is_refused(low):
    assert address_class(ipaddress.IPv4Address((127 << 24) | low)) == "loopback"
    assert address_class(ipaddress.IPv4Address((10 << 24) | low)) == "private"


def test_the_allow_list_takes_cidrs_addresses_names_and_wildcards_but_metadata_only_exactly(dns):
    policy = EgressPolicy(["10.0.0.0/8", "127.0.0.1", "images.internal", "*.corp.example", "169.254.0.0/16"])
    policy.check_address("10.2.3.4", "10.2.3.4")
    policy.check_address("127.0.0.1", "127.0.0.1")
    policy.check_address("::ffff:127.0.0.1", "::ffff:127.0.0.1")  # the mapped form of an allowed address
    policy.check_address("images.internal", "192.168.1.5")  # an allowed name may resolve anywhere...
    policy.check_address("a.b.corp.example", "172.16.0.9")
    policy.check_address("link", "169.254.1.1")
    for host, ip in (("127.0.0.2", "127.0.0.2"), ("other.internal", "192.168.1.5"),
                     ("corp.example.evil", "192.168.0.1"),
                     ("169.254.169.254", "169.254.169.254"),  # ...but a /16 does not open metadata
                     ("images.internal", "169.254.169.254"),  # ...nor does an allowed name resolving there
                     ("x.corp.example", "fd00:ec2::254")):
        with pytest.raises(EgressRefused):
            policy.check_address(host, ip)
    EgressPolicy(["169.254.169.254"]).check_address("169.254.169.254", "169.254.169.254")
    answers, _ = dns
    answers["metadata.google.internal"] = [["169.254.169.254"]]
    with pytest.raises(EgressRefused, match="cloud metadata service"):
        EgressPolicy(["*.google.internal"]).target("http://metadata.google.internal/")
    target = EgressPolicy(["metadata.google.internal"]).target("http://metadata.google.internal/")
    assert target.addresses == ("169.254.169.254",)
    with pytest.raises(ValueError, match="not a CIDR"):
        EgressPolicy(["http://x/"])


@pytest.mark.parametrize("url, words", [
    ("ftp://example.com/a.png", "only http:// and https://"),
    ("file:///etc/passwd", "only http:// and https://"),
    ("gopher://127.0.0.1:6379/_INFO", "only http:// and https://"),
    ("http:///a.png", "names no host"),
    ("http://127.0.0.1:8000/metrics", "127.0.0.1 is a loopback address"),
    ("http://[::1]:8265/api/jobs/", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/latest/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata service"),
    ("http://METADATA.GOOGLE.INTERNAL./", "cloud metadata service"),
    ("http://10.0.0.1:9000/bucket/x.png", "private-network"),
    ("http://100.64.0.1/", "private-network"),
    ("http://127.0.0.1:99999/", "bad URL"),
])
def test_urls_refused_before_any_lookup(dns, url, words):
    _, calls = dns
    with pytest.raises(EgressRefused) as err:
        EgressPolicy().target(url)
    assert words in err.value.message and err.value.code == "egress_refused"
    assert calls == []


def test_names_are_resolved_once_and_every_answer_checked(dns):
    answers, calls = dns
    answers["images.example"] = [["127.0.0.1"]]
    answers["mixed.example"] = [["8.8.8.8", "10.0.0.7"]]
    answers["cdn.example"] = [["8.8.8.8", "2606:4700::1"]]
    with pytest.raises(EgressRefused, match="images.example resolves to 127.0.0.1, a loopback address"):
        EgressPolicy().target("http://images.example/a.png")
    with pytest.raises(EgressRefused, match="10.0.0.7, a private-network address"):
        EgressPolicy().target("https://mixed.example/a.png")
    target = EgressPolicy().target("https://cdn.example:8443/a.png")
    assert (target.host, target.port, target.addresses) == ("cdn.example", 8443, ("8.8.8.8", "2606:4700::1"))
    assert EgressPolicy(["images.example"]).target("http://images.example/a.png").addresses == ("127.0.0.1",)
    assert EgressPolicy(["127.0.0.0/8"]).target("http://images.example:81/").port == 81  # any port
    assert calls == ["images.example", "mixed.example", "cdn.example", "images.example", "images.example"]
    with pytest.raises(FetchError, match="cannot resolve nowhere.example"):
        EgressPolicy().target("http://nowhere.example/")


def test_the_connection_goes_to_the_checked_address_not_a_second_answer(dns, monkeypatch):
    """DNS rebinding: the name answers a public address first and loopback after; the fetch
    connects to the address it checked and never asks again (no packet leaves: the connect is
    recorded and refused)."""
    answers, calls = dns
    answers["rebind.example"] = [["93.184.216.34"], ["127.0.0.1"]]
    connected = []

    def fake_connect(address, timeout=None, *args, **kwargs):
        connected.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(egress.socket, "create_connection", fake_connect)
    with pytest.raises(FetchError, match="Connection refused"):
        egress.fetch("http://rebind.example:8080/a.png", policy=EgressPolicy(), timeout=2)
    assert connected == [("93.184.216.34", 8080)]
    assert calls == ["rebind.example"]
