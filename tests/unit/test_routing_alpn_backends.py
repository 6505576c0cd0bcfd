"""sniproxy.routing, issue 16: routes that also require an ALPN protocol (first rule whose name *and*
ALPN match wins, for every match kind), and routes/fallbacks with several or unix-socket backends."""

from __future__ import annotations

import pytest

from sniproxy.config import Address, RouteConfig, TableConfig, UnixAddress, parse_config
from sniproxy.routing import Route, RouteTable


def rt(*routes: RouteConfig, fallback=None) -> RouteTable:
    return RouteTable.from_config(TableConfig("t", tuple(routes), fallback))


ACME = RouteConfig("a.test", "127.0.0.1:8444", alpn=("acme-tls/1",))
WEB = RouteConfig("a.test", "127.0.0.1:8443")

# (routes, sni, client alpn, expected rule index or None)
CASES = [
    pytest.param((ACME, WEB), "a.test", ("acme-tls/1",), 0, id="exact-acme"),
    pytest.param((ACME, WEB), "a.test", ("h2", "http/1.1"), 1, id="exact-web"),
    pytest.param((ACME, WEB), "a.test", (), 1, id="exact-no-alpn"),
    pytest.param((ACME,), "a.test", ("h2",), None, id="exact-only-acme-refuses-h2"),
    pytest.param((ACME,), "a.test", (), None, id="exact-only-acme-refuses-none"),
    pytest.param((RouteConfig("a.test", "10.0.0.1:1", alpn=("h2", "http/1.1")),), "a.test", ("http/1.1",), 0, id="list-any-of"),
    pytest.param((RouteConfig("a.test", "10.0.0.1:1", alpn=("h2",)),), "a.test", ("H2",), None, id="case-sensitive"),
    pytest.param((RouteConfig("a.test", "10.0.0.1:1", alpn=("h2",)),), "a.test", ("http/1.1", "h2"), 0, id="client-order-irrelevant"),
    # wildcard, regex and catch-all honour alpn too, and order still decides across kinds
    pytest.param((RouteConfig("*.b.test", "10.0.0.1:1", alpn=("acme-tls/1",)), RouteConfig("*.b.test", "10.0.0.2:1")), "x.b.test", ("acme-tls/1",), 0, id="wildcard-acme"),
    pytest.param((RouteConfig("*.b.test", "10.0.0.1:1", alpn=("acme-tls/1",)), RouteConfig("*.b.test", "10.0.0.2:1")), "x.b.test", ("h2",), 1, id="wildcard-web"),
    pytest.param((RouteConfig("*", "10.0.0.1:1", alpn=("acme-tls/1",)), RouteConfig("a.test", "10.0.0.2:1")), "a.test", ("acme-tls/1",), 0, id="catch-all-acme-first"),
    pytest.param((RouteConfig("*", "10.0.0.1:1", alpn=("acme-tls/1",)), RouteConfig("a.test", "10.0.0.2:1")), "a.test", ("h2",), 1, id="catch-all-acme-skipped"),
    pytest.param((RouteConfig(r"~a\.test", "10.0.0.1:1", alpn=("x",)), RouteConfig("a.test", "10.0.0.2:1")), "a.test", ("h2",), 1, id="regex-skipped"),
    pytest.param((RouteConfig("a.test", "10.0.0.1:1", alpn=("x",)), RouteConfig("*.test", "10.0.0.2:1"), RouteConfig("a.test", "10.0.0.3:1")), "a.test", ("h2",), 1, id="exact-miss-wildcard-earlier-than-second-exact"),
    pytest.param((RouteConfig("*.test", "10.0.0.2:1", alpn=("x",)), RouteConfig("a.test", "10.0.0.3:1")), "a.test", ("x",), 0, id="wildcard-alpn-before-exact"),
]


@pytest.mark.parametrize("routes, sni, alpn, expected", CASES)
def test_alpn_routing(routes, sni, alpn, expected):
    table = rt(*routes)
    route = table.route(sni, alpn)
    if expected is None:
        assert route is None
    else:
        assert route is not None and route.rule == routes[expected].match
        assert route.backends == table.route(sni, alpn).backends  # total and repeatable
        assert str(route.backends[0]) == routes[expected].backend


def test_alpn_default_argument_is_no_alpn():
    assert rt(ACME, WEB).route("a.test").port == 8443


def test_no_alpn_match_goes_to_fallback():
    table = rt(ACME, fallback=Address("127.0.0.1", 9))
    assert table.route("a.test", ("h2",)) == Route("127.0.0.1", 9, "fallback", False)


def test_several_backends_in_config_order():
    table = rt(RouteConfig("a.test", ("10.0.0.1:443", "Back.Test:443", "unix:/run/app.sock"), "v1"))
    route = table.route("a.test")
    assert route.backends == (Address("10.0.0.1", 443), Address("back.test", 443), UnixAddress("/run/app.sock"))
    assert (route.host, route.port, route.dynamic, route.proxy_protocol) == ("10.0.0.1", 443, False, "v1")


def test_unix_backend_route():
    route = rt(RouteConfig("a.test", "unix:/run/app.sock")).route("a.test")
    assert route.backends == (UnixAddress("/run/app.sock"),)
    assert (route.host, route.port, route.dynamic) == ("", 0, False)


def test_fallback_list_and_unix():
    table = rt(fallback=(Address("B.test", 1), UnixAddress("/run/fb.sock")))
    assert table.route(None).backends == (Address("b.test", 1), UnixAddress("/run/fb.sock"))
    assert rt(fallback=UnixAddress("/run/fb.sock")).route("x.test").backends == (UnixAddress("/run/fb.sock"),)


def test_from_a_parsed_file():
    config = parse_config("""
[[listener]]
bind = "127.0.0.1:8443"
[table.default]
routes = [
  { match = "a.test", alpn = "acme-tls/1", backend = "unix:/run/acme.sock" },
  { match = "a.test", backend = ["127.0.0.1:1", "127.0.0.1:2"] },
]
fallback = ["127.0.0.1:3", "127.0.0.1:4"]
""")
    table = RouteTable.from_config(config.tables["default"])
    assert table.route("a.test", ("acme-tls/1",)).backends == (UnixAddress("/run/acme.sock"),)
    assert table.route("a.test", ("h2",)).backends == (Address("127.0.0.1", 1), Address("127.0.0.1", 2))
    assert table.route("b.test", ("h2",)).backends == (Address("127.0.0.1", 3), Address("127.0.0.1", 4))


def test_from_config_refuses_a_dynamic_backend_in_a_list():
    with pytest.raises(ValueError):
        rt(RouteConfig("*.a.test", ("10.0.0.1:1", "*:443")))
