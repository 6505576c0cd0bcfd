"""The [xdp] section: defaults, validation of every key, and the refusal of an allow-list that would
drop every client."""

from __future__ import annotations

import textwrap

import pytest

from sniproxy.config import XDP_MAX_ALLOW, ConfigError, XdpConfig, parse_config

BASE = """
[[listener]]
bind = "127.0.0.1:8443"

[table.default]
routes = [{ match = "a.test", backend = "127.0.0.1:9443" }]
"""


def xdp(body: str):
    return parse_config(BASE + "\n[xdp]\n" + textwrap.dedent(body)).xdp


def error(body: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        xdp(body)
    return info.value


def test_absent_section_is_disabled():
    assert parse_config(BASE).xdp == XdpConfig(enabled=False, interfaces=(), mode="auto", allow=())


def test_full_section():
    config = xdp("""
        enabled = true
        interfaces = ["eth0", "veth-a.100"]
        mode = "generic"
        allow = ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "FD00::/8", "192.0.2.7"]
    """)
    assert config.enabled and config.mode == "generic"
    assert config.interfaces == ("eth0", "veth-a.100")
    # Canonical forms: lower-case IPv6, a bare address becomes a /32 or /128.
    assert config.allow == ("127.0.0.0/8", "10.0.0.0/8", "::1/128", "fd00::/8", "192.0.2.7/32")


@pytest.mark.parametrize("mode", ["auto", "native", "generic"])
def test_modes(mode):
    assert xdp(f'mode = "{mode}"').mode == mode


def test_empty_allow_with_enabled_is_an_error_naming_xdp_allow():
    e = error('enabled = true\ninterfaces = ["eth0"]\nallow = []')
    assert e.key_path == "xdp.allow"
    assert "drop" in e.reason


def test_missing_allow_with_enabled_is_an_error_naming_xdp_allow():
    assert error('enabled = true\ninterfaces = ["eth0"]').key_path == "xdp.allow"


def test_empty_allow_is_fine_while_disabled():
    assert xdp("enabled = false\nallow = []").allow == ()


def test_enabled_needs_interfaces():
    assert error('enabled = true\nallow = ["10.0.0.0/8"]').key_path == "xdp.interfaces"


@pytest.mark.parametrize(
    "body, key_path, reason",
    [
        ('allow = ["10.0.0.1/8"]', "xdp.allow[0]", "did you mean 10.0.0.0/8"),  # host bits set
        ('allow = ["10.0.0.0/8", "10.0.0.0/33"]', "xdp.allow[1]", "not a CIDR"),
        ('allow = ["fd00::/129"]', "xdp.allow[0]", "not a CIDR"),
        ('allow = ["example.test"]', "xdp.allow[0]", "not a CIDR"),
        ('allow = [""]', "xdp.allow[0]", "not a CIDR"),
        ('allow = [10]', "xdp.allow[0]", "expected a CIDR string"),
        ('allow = "10.0.0.0/8"', "xdp.allow", "expected an array"),
        ('allow = ["10.0.0.0/8", "10.0.0.0/8"]', "xdp.allow[1]", "duplicate of xdp.allow[0]"),
        ('allow = ["::1", "0::1/128"]', "xdp.allow[1]", "duplicate of xdp.allow[0]"),
        ('enabled = "yes"', "xdp.enabled", "expected true or false"),
        ('mode = "offload"', "xdp.mode", "must be one of"),
        ('interfaces = "eth0"', "xdp.interfaces", "expected an array"),
        ('interfaces = [""]', "xdp.interfaces[0]", "not a valid interface name"),
        ('interfaces = ["a-name-longer-than-15"]', "xdp.interfaces[0]", "not a valid interface name"),
        ('interfaces = ["eth0/1"]', "xdp.interfaces[0]", "not a valid interface name"),
        ('interfaces = ["eth0", "eth0"]', "xdp.interfaces[1]", "duplicate"),
        ("interfaces = [1]", "xdp.interfaces[0]", "expected an interface name"),
        ("allowed = []", "xdp.allowed", "unknown key"),
    ],
)
def test_rejections_name_their_key(body, key_path, reason):
    e = error(body)
    assert e.key_path == key_path
    assert reason in e.reason, e.reason


def test_allow_size_is_capped():
    many = ", ".join(f'"10.{i >> 8}.{i & 255}.0/24"' for i in range(XDP_MAX_ALLOW + 1))
    assert error(f"allow = [{many}]").key_path == "xdp.allow"


def test_xdp_must_be_a_table():
    with pytest.raises(ConfigError) as info:
        parse_config("xdp = 1\n" + BASE)
    assert info.value.key_path == "xdp"
