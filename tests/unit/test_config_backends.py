"""sniproxy.config, issue 16's keys: route `alpn`, lists of backends (routes and fallback), unix-socket
backends and the [backends] section. Each is accepted in its documented forms and each rejection
names its key path."""

from __future__ import annotations

import pytest

from sniproxy.config import (
    Address,
    BackendsConfig,
    ConfigError,
    RouteConfig,
    UnixAddress,
    parse_config,
)

LISTENER = """
[[listener]]
bind = "127.0.0.1:8443"
table = "default"
"""


def cfg(*parts: str):
    return parse_config("\n".join(parts))


def table(*routes: str, extra: str = "") -> str:
    return "[table.default]\nroutes = [\n" + ",\n".join(f"  {r}" for r in routes) + "\n]\n" + extra


# ---------------------------------------------------------------------------------------------------
# Accepted


def test_alpn_string_and_list():
    config = cfg(LISTENER, table(
        "{ match = 'a.test', alpn = 'acme-tls/1', backend = '127.0.0.1:1' }",
        "{ match = 'a.test', alpn = ['h2', 'http/1.1'], backend = '127.0.0.1:2' }",
        "{ match = 'a.test', backend = '127.0.0.1:3' }",
    ))
    routes = config.tables["default"].routes
    assert [r.alpn for r in routes] == [("acme-tls/1",), ("h2", "http/1.1"), ()]


def test_alpn_on_catch_all_keeps_later_routes_reachable():
    config = cfg(LISTENER, table(
        "{ match = '*', alpn = 'acme-tls/1', backend = '127.0.0.1:1' }",
        "{ match = 'a.test', backend = '127.0.0.1:2' }",
    ))
    assert len(config.tables["default"].routes) == 2


def test_backend_list_and_unix():
    config = cfg(LISTENER, table(
        "{ match = 'a.test', backend = ['127.0.0.1:1', 'b.test:2', 'unix:/run/app.sock'] }",
        "{ match = 'u.test', backend = 'unix:/run/u.sock', proxy_protocol = 'v2' }",
        "{ match = 'one.test', backend = ['127.0.0.1:3'] }",
    ))
    routes = config.tables["default"].routes
    assert routes[0] == RouteConfig("a.test", ("127.0.0.1:1", "b.test:2", "unix:/run/app.sock"))
    assert routes[1] == RouteConfig("u.test", "unix:/run/u.sock", "v2")
    assert routes[2].backend == ("127.0.0.1:3",)


def test_fallback_forms():
    one = cfg(LISTENER, table(extra="fallback = 'unix:/run/fb.sock'\n"))
    assert one.tables["default"].fallback == UnixAddress("/run/fb.sock")
    many = cfg(LISTENER, table(extra="fallback = ['127.0.0.1:1', '[::1]:2', 'unix:/run/fb.sock']\n"))
    assert many.tables["default"].fallback == (
        Address("127.0.0.1", 1), Address("::1", 2), UnixAddress("/run/fb.sock"))


def test_backends_section_defaults_and_values():
    assert cfg(LISTENER, table()).backends == BackendsConfig(10.0, 0.0, 2.0)
    config = cfg(LISTENER, table(), "[backends]\nhold_down = 3\nhealth_check_interval = 1.5\n"
                 "health_check_timeout = 0.5\n")
    assert config.backends == BackendsConfig(hold_down=3.0, health_check_interval=1.5,
                                             health_check_timeout=0.5)
    assert cfg(LISTENER, table(), "[backends]\nhold_down = 0\n").backends.hold_down == 0.0


# ---------------------------------------------------------------------------------------------------
# Rejected, with the key path

R = "table.default.routes[0]"
ERROR_CASES = [
    # alpn
    pytest.param(table("{ match = 'a.test', alpn = 1, backend = 'b.test:1' }"), f"{R}.alpn", "string or an array", id="alpn-int"),
    pytest.param(table("{ match = 'a.test', alpn = [], backend = 'b.test:1' }"), f"{R}.alpn", "empty list", id="alpn-empty-list"),
    pytest.param(table("{ match = 'a.test', alpn = '', backend = 'b.test:1' }"), f"{R}.alpn", "1..255", id="alpn-empty-name"),
    pytest.param(table("{ match = 'a.test', alpn = ['h2', 2], backend = 'b.test:1' }"), f"{R}.alpn[1]", "string", id="alpn-item-int"),
    pytest.param(table("{ match = 'a.test', alpn = ['h2', 'h 2'], backend = 'b.test:1' }"), f"{R}.alpn[1]", "visible ASCII", id="alpn-space"),
    pytest.param(table("{ match = 'a.test', alpn = ['h2', 'é'], backend = 'b.test:1' }"), f"{R}.alpn[1]", "visible ASCII", id="alpn-non-ascii"),
    pytest.param(table("{ match = 'a.test', alpn = '" + "x" * 256 + "', backend = 'b.test:1' }"), f"{R}.alpn", "1..255", id="alpn-too-long"),
    pytest.param(table("{ match = 'a.test', alpn = ['h2', 'h2'], backend = 'b.test:1' }"), f"{R}.alpn[1]", "duplicate of table.default.routes[0].alpn[0]", id="alpn-duplicate"),
    pytest.param(table("{ match = 'a.test', alpn = 'h2', backend = 'b.test:1' }", "{ match = 'a.test', alpn = ['h2'], backend = 'c.test:1' }"),
                 "table.default.routes[1].match", "duplicate of routes[0]", id="alpn-same-route-twice"),
    pytest.param(table("{ match = 'a.test', backend = 'b.test:1' }", "{ match = 'a.test', alpn = 'h2', backend = 'c.test:1' }"),
                 "table.default.routes[1].match", "unreachable: routes[0] has the same match and accepts any ALPN", id="alpn-after-same-match-without"),
    pytest.param(table("{ match = 'a.test', alpn = ['h2', 'http/1.1'], backend = 'b.test:1' }", "{ match = 'a.test', alpn = 'h2', backend = 'c.test:1' }"),
                 "table.default.routes[1].match", "unreachable", id="alpn-subset-after-superset"),
    pytest.param(table("{ match = '*', backend = 'b.test:1' }", "{ match = 'a.test', alpn = 'h2', backend = 'c.test:1' }"),
                 "table.default.routes[1].match", "unreachable", id="alpn-after-catch-all"),
    # lists of backends
    pytest.param(table("{ match = 'a.test', backend = [] }"), f"{R}.backend", "empty list", id="backend-empty-list"),
    pytest.param(table("{ match = 'a.test', backend = 5 }"), f"{R}.backend", "string or an array", id="backend-int"),
    pytest.param(table("{ match = 'a.test', backend = ['b.test:1', 2] }"), f"{R}.backend[1]", "string", id="backend-item-int"),
    pytest.param(table("{ match = 'a.test', backend = ['b.test:1', 'c.test'] }"), f"{R}.backend[1]", "missing port", id="backend-item-no-port"),
    pytest.param(table("{ match = '*.a.test', backend = ['b.test:1', '*:443'] }"), f"{R}.backend[1]", "fixed backends", id="backend-list-dynamic"),
    pytest.param(table("{ match = '~(a)\\\\.test', backend = ['$1.b.test:1', 'c.test:1'] }"), f"{R}.backend[0]", "fixed backends", id="backend-list-template"),
    pytest.param(table("{ match = 'a.test', backend = ['B.test:1', 'b.test.:1'] }"), f"{R}.backend[1]", "duplicate of table.default.routes[0].backend[0]", id="backend-list-duplicate"),
    pytest.param(table("{ match = 'a.test', backend = ['unix:/s', 'unix:/s'] }"), f"{R}.backend[1]", "duplicate", id="backend-list-duplicate-unix"),
    # unix sockets
    pytest.param(table("{ match = 'a.test', backend = 'unix:run/app.sock' }"), f"{R}.backend", "absolute", id="unix-relative"),
    pytest.param(table("{ match = 'a.test', backend = 'unix:' }"), f"{R}.backend", "absolute", id="unix-empty"),
    pytest.param(table("{ match = 'a.test', backend = 'unix:/" + "d" * 107 + "' }"), f"{R}.backend", "at most 107", id="unix-too-long"),
    pytest.param(table("{ match = 'a.test', backend = \"unix:/a\\u0000b\" }"), f"{R}.backend", "NUL", id="unix-nul"),
    pytest.param(table("{ match = 'a.test', backend = ['b.test:1', 'unix:x'] }"), f"{R}.backend[1]", "absolute", id="unix-in-list-relative"),
    # fallback lists
    pytest.param(table(extra="fallback = []\n"), "table.default.fallback", "empty list", id="fallback-empty-list"),
    pytest.param(table(extra="fallback = ['b.test:1', 'b.test:1']\n"), "table.default.fallback[1]", "duplicate of table.default.fallback[0]", id="fallback-duplicate"),
    pytest.param(table(extra="fallback = ['b.test:1', 'unix:rel']\n"), "table.default.fallback[1]", "absolute", id="fallback-unix-relative"),
    pytest.param(table(extra="fallback = ['b.test:1', '*:443']\n"), "table.default.fallback[1]", "", id="fallback-dynamic"),
    # [backends]
    pytest.param(table() + "[backends]\nhold_down = -1\n", "backends.hold_down", ">= 0", id="hold-down-negative"),
    pytest.param(table() + "[backends]\nhold_down = '10s'\n", "backends.hold_down", "number", id="hold-down-string"),
    pytest.param(table() + "[backends]\nhealth_check_interval = -2\n", "backends.health_check_interval", ">= 0", id="interval-negative"),
    pytest.param(table() + "[backends]\nhealth_check_interval = true\n", "backends.health_check_interval", "number", id="interval-bool"),
    pytest.param(table() + "[backends]\nhealth_check_timeout = 0\n", "backends.health_check_timeout", "> 0", id="check-timeout-zero"),
    pytest.param(table() + "[backends]\nhealth_check_interval = 1\nhealth_check_timeout = 2\n", "backends.health_check_timeout", "<= health_check_interval", id="check-timeout-above-interval"),
    pytest.param(table() + "[backends]\nbalance = 'rr'\n", "backends.balance", "unknown key", id="backends-unknown-key"),
]


@pytest.mark.parametrize("text, key_path, reason", ERROR_CASES)
def test_rejected(text, key_path, reason):
    with pytest.raises(ConfigError) as info:
        cfg(LISTENER, text)
    e = info.value
    assert e.key_path == key_path, str(e)
    assert reason in e.reason
    assert str(e) == f"{key_path}: {e.reason}"


def test_backends_not_a_table():
    with pytest.raises(ConfigError) as info:
        cfg("backends = 1", LISTENER, table())
    assert info.value.key_path == "backends" and "expected a table" in info.value.reason


def test_the_documented_example_parses():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    example = re.search(r"## Example\n\n```toml\n(.*?)```", doc, re.S)
    assert example is not None
    config = parse_config(example.group(1))
    web = config.tables["web"].routes
    assert web[0].alpn == ("acme-tls/1",) and web[0].backend == "unix:/run/acme.sock"
    assert web[1].backend == ("10.0.0.1:443", "10.0.0.2:443")
