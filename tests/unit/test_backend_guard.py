"""sniproxy.backend_guard: the explicit deny list for dynamic routes, one case per range, the IPv4
address inside NAT64/6to4 checked, this host's own addresses, and allow_private_backends."""

from __future__ import annotations

import ipaddress

import pytest

from sniproxy.backend_guard import DENIED_NETWORKS, BackendGuard, denied_range, embedded_ipv4

# One address inside each denied range (issue 15: fec0::/10 was connected through is_global; NAT64,
# ::/96 and ::ffff:0:0:0/96 were attempted).
INSIDE = {
    "0.0.0.0/8": "0.1.2.3",
    "10.0.0.0/8": "10.1.2.3",
    "100.64.0.0/10": "100.127.0.1",
    "127.0.0.0/8": "127.9.9.9",
    "169.254.0.0/16": "169.254.169.254",
    "172.16.0.0/12": "172.31.255.1",
    "192.0.0.0/24": "192.0.0.9",
    "192.0.2.0/24": "192.0.2.7",
    "192.88.99.0/24": "192.88.99.1",
    "192.168.0.0/16": "192.168.1.1",
    "198.18.0.0/15": "198.19.0.1",
    "198.51.100.0/24": "198.51.100.1",
    "203.0.113.0/24": "203.0.113.9",
    "224.0.0.0/4": "239.1.1.1",
    "240.0.0.0/4": "255.255.255.255",
    "::/96": "::1.2.3.4",
    "::ffff:0:0/96": "::ffff:93.184.216.34",
    "::ffff:0:0:0/96": "::ffff:0:5db8:d822",
    "64:ff9b:1::/48": "64:ff9b:1::5db8:d822",
    "100::/64": "100::1",
    "2001::/23": "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "2001:db8::/32": "2001:db8::1",
    "3fff::/20": "3fff:fff::1",
    "5f00::/16": "5f00::1",
    "fc00::/7": "fd12::1",
    "fe80::/10": "fe80::1",
    "fec0::/10": "fec0::1",
    "ff00::/8": "ff02::1",
}


def test_every_denied_range_has_a_case():
    assert set(INSIDE) == {str(net) for net, _ in DENIED_NETWORKS}


@pytest.mark.parametrize("network", sorted(INSIDE))
def test_each_denied_range_is_refused(network):
    address = INSIDE[network]
    refusal = BackendGuard().refusal(address)
    assert refusal is not None and refusal.outcome == "backend_refused"
    assert network in refusal.reason and address in refusal.reason


@pytest.mark.parametrize("network", sorted(INSIDE))
def test_each_denied_range_can_be_allowed_explicitly(network):
    assert BackendGuard([network]).refusal(INSIDE[network]) is None


@pytest.mark.parametrize("address", ["::", "::1", "0.0.0.0", "fec0::1", "64:ff9b::a00:1"])
def test_special_addresses_python_calls_global_or_misses(address):
    assert BackendGuard().refusal(address) is not None


@pytest.mark.parametrize("address, inner", [
    ("64:ff9b::7f00:1", "127.0.0.1"),
    ("64:ff9b::a01:203", "10.1.2.3"),
    ("64:ff9b::c0a8:101", "192.168.1.1"),
    ("2002:a00:1::1", "10.0.0.1"),
    ("2002:7f00:1::", "127.0.0.1"),
])
def test_nat64_and_6to4_refuse_a_denied_ipv4_inside(address, inner):
    assert str(embedded_ipv4(ipaddress.ip_address(address))) == inner
    refusal = BackendGuard().refusal(address)
    assert refusal is not None and f"the IPv4 address {inner} inside {address}" in refusal.reason
    # Allowing the IPv4 network the gateway would forward to is allowing it.
    assert BackendGuard([f"{inner}/32"]).refusal(address) is None


@pytest.mark.parametrize("address", ["64:ff9b::5db8:d822", "2002:5db8:d822::1", "93.184.216.34",
                                     "2606:2800:220:1::1", "1.1.1.1"])
def test_global_addresses_pass(address):
    assert BackendGuard().refusal(address) is None
    assert denied_range(ipaddress.ip_address(address)) is None


def test_this_hosts_address_is_refused_as_self_unless_allowed():
    own = {ipaddress.ip_address("1.2.3.4")}
    refusal = BackendGuard().refusal("1.2.3.4", own.__contains__)
    assert refusal is not None and refusal.outcome == "backend_self" and "this host" in refusal.reason
    # Through NAT64 too: the gateway would send the proxy's connection back to it.
    refusal = BackendGuard().refusal("64:ff9b::102:304", own.__contains__)
    assert refusal is not None and refusal.outcome == "backend_self"
    assert BackendGuard(["1.2.3.4/32"]).refusal("1.2.3.4", own.__contains__) is None
    assert BackendGuard().refusal("1.2.3.5", own.__contains__) is None
