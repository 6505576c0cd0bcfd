"""sniproxy.routing: SNI -> Route for every rule kind, in config order, with fallback."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniproxy.config import Address, RouteConfig, TableConfig, load_config
from sniproxy.routing import Route, RouteTable


def table(*pairs: tuple[str, str], fallback: str | None = None) -> RouteTable:
    fb = None
    if fallback is not None:
        host, _, port = fallback.rpartition(":")
        fb = Address(host, int(port))
    routes = tuple(RouteConfig(m, b) for m, b in pairs)
    return RouteTable.from_config(TableConfig(name="t", routes=routes, fallback=fb))


REGEX = r"~^(\w+)\.svc\.test$"

# (rules, sni, expected Route or None)
CASES = [
    # exact
    pytest.param([("app.test", "10.0.0.1:443")], "app.test", Route("10.0.0.1", 443, "app.test", False), id="exact"),
    pytest.param([("app.test", "10.0.0.1:443")], "APP.Test", Route("10.0.0.1", 443, "app.test", False), id="exact-case"),
    pytest.param([("app.test", "10.0.0.1:443")], "app.test.", Route("10.0.0.1", 443, "app.test", False), id="exact-trailing-dot"),
    pytest.param([("App.Test.", "10.0.0.1:443")], "app.test", Route("10.0.0.1", 443, "App.Test.", False), id="exact-pattern-normalised"),
    pytest.param([("app.test", "10.0.0.1:443")], "app.test..", None, id="exact-two-dots"),
    pytest.param([("app.test", "10.0.0.1:443")], "x.app.test", None, id="exact-no-subdomain"),
    pytest.param([("app.test", "10.0.0.1:443")], "pp.test", None, id="exact-no-suffix"),
    pytest.param([("app.test", "Backend.Test:443")], "app.test", Route("backend.test", 443, "app.test", False), id="backend-lowercased"),
    pytest.param([("app.test", "[2001:DB8::1]:443")], "app.test", Route("2001:db8::1", 443, "app.test", False), id="backend-v6"),
    # wildcard
    pytest.param([("*.example.test", "b.test:443")], "a.example.test", Route("b.test", 443, "*.example.test", False), id="wildcard-one-label"),
    pytest.param([("*.example.test", "b.test:443")], "a.b.example.test", Route("b.test", 443, "*.example.test", False), id="wildcard-two-labels"),
    pytest.param([("*.example.test", "b.test:443")], "A.EXAMPLE.TEST.", Route("b.test", 443, "*.example.test", False), id="wildcard-case-dot"),
    pytest.param([("*.example.test", "b.test:443")], "example.test", None, id="wildcard-not-apex"),
    pytest.param([("*.example.test", "b.test:443")], "aexample.test", None, id="wildcard-label-boundary"),
    pytest.param([("*.example.test", "b.test:443")], "a.example.test.evil", None, id="wildcard-suffix-only"),
    pytest.param([("*.example.test", "*:8443")], "a.example.test", Route("a.example.test", 8443, "*.example.test", True), id="wildcard-dynamic"),
    # catch-all
    pytest.param([("*", "b.test:443")], "anything.test", Route("b.test", 443, "*", False), id="catch-all-static"),
    pytest.param([("*", "*:443")], "Other.Org.", Route("other.org", 443, "*", True), id="catch-all-dynamic"),
    pytest.param([("*", "*:443")], "localhost", Route("localhost", 443, "*", True), id="catch-all-single-label"),
    # regex
    pytest.param([(REGEX, "$1.internal.test:443")], "foo.svc.test", Route("foo.internal.test", 443, REGEX, True), id="regex-capture"),
    pytest.param([(REGEX, "$1.internal.test:443")], "FOO.svc.test.", Route("foo.internal.test", 443, REGEX, True), id="regex-case-dot"),
    pytest.param([(REGEX, "$1.internal.test:443")], "a.b.svc.test", None, id="regex-no-match"),
    pytest.param([(r"~(\w+)\.svc\.test", "$1.internal.test:443")], "x.foo.svc.test", None, id="regex-fullmatch-without-anchors"),
    pytest.param([(r"~svc", "b.test:1")], "svc.test", None, id="regex-search-is-not-enough"),
    pytest.param([(r"~[A-Z]+\.test", "b.test:1")], "abc.test", Route("b.test", 1, r"~[A-Z]+\.test", False), id="regex-ignorecase"),
    pytest.param([(r"~(.+)\.svc\.test", "$1.internal.test:1")], "a.b.svc.test", Route("a.b.internal.test", 1, r"~(.+)\.svc\.test", True), id="regex-capture-with-dots"),
    pytest.param([(r"~(\w+)-(\w+)\.test", "$2-$1.x.test:1")], "ab-cd.test", Route("cd-ab.x.test", 1, r"~(\w+)-(\w+)\.test", True), id="regex-two-captures"),
    pytest.param([(r"~(\w+)\.test", "*:1")], "ab.test", Route("ab.test", 1, r"~(\w+)\.test", True), id="regex-dynamic-sni"),
    pytest.param([(r"~(\w+)\.test", "b.test:1")], "ab.test", Route("b.test", 1, r"~(\w+)\.test", False), id="regex-static"),
    # captures that cannot form a host fall through to the next rule
    pytest.param([(r"~(\w*)x\.test", "$1.in.test:1"), ("*", "c.test:2")], "x.test", Route("c.test", 2, "*", False), id="capture-empty"),
    pytest.param([(r"~(a)?b\.test", "$1.in.test:1"), ("*", "c.test:2")], "b.test", Route("c.test", 2, "*", False), id="capture-not-taken"),
    pytest.param([(r"~([a-z.]+)\.x\.test", "$1.in.test:1")], "a.x.test", Route("a.in.test", 1, r"~([a-z.]+)\.x\.test", True), id="capture-ok"),
    pytest.param([(r"~(.*)", "$1:1"), ("*", "c.test:2")], "10.0.0.1", None, id="ip-sni-never-matches"),
    pytest.param([(r"~([a-z]+)(\d*)\.test", "h$2.x:1"), ("*", "c.test:2")], "ab.test", Route("c.test", 2, "*", False), id="template-optional-empty"),
    # IP literals built from captures route as nginx's map + proxy_pass does (issue 15, defect 9).
    pytest.param([(r"~^ip(\d+)\.lit\.test$", "127.0.0.$1:443")], "ip5.lit.test", Route("127.0.0.5", 443, r"~^ip(\d+)\.lit\.test$", True), id="template-builds-ipv4"),
    pytest.param([(r"~(\d+)\.(.*)", "10.0.0.$1:1"), ("*", "c.test:2")], "5.a.test", Route("10.0.0.5", 1, r"~(\d+)\.(.*)", True), id="template-builds-ipv4-first-label"),
    pytest.param([(r"~^v6-([0-9a-f]{1,4})\.test$", "[fd00::$1]:443")], "v6-BEEF.test", Route("fd00::beef", 443, r"~^v6-([0-9a-f]{1,4})\.test$", True), id="template-builds-ipv6"),
    pytest.param([(r"~^ip(\d+)\.lit\.test$", "127.0.0.$1:443"), ("*", "c.test:2")], "ip999.lit.test", Route("c.test", 2, "*", False), id="template-ip-out-of-range-next-rule"),
    # precedence: first match in config order, whatever the kind
    pytest.param([("*.example.test", "w.test:1"), ("a.example.test", "e.test:1")], "a.example.test", Route("w.test", 1, "*.example.test", False), id="wildcard-before-exact"),
    pytest.param([("a.example.test", "e.test:1"), ("*.example.test", "w.test:1")], "a.example.test", Route("e.test", 1, "a.example.test", False), id="exact-before-wildcard"),
    pytest.param([("*.test", "outer.test:1"), ("*.a.test", "inner.test:1")], "x.a.test", Route("outer.test", 1, "*.test", False), id="wider-wildcard-first"),
    pytest.param([("*.a.test", "inner.test:1"), ("*.test", "outer.test:1")], "x.a.test", Route("inner.test", 1, "*.a.test", False), id="narrow-wildcard-first"),
    pytest.param([(r"~.*\.test", "r.test:1"), ("a.test", "e.test:1")], "a.test", Route("r.test", 1, r"~.*\.test", False), id="regex-before-exact"),
    pytest.param([("a.test", "e.test:1"), (r"~.*\.test", "r.test:1")], "a.test", Route("e.test", 1, "a.test", False), id="exact-before-regex"),
    pytest.param([("b.test", "e.test:1"), (r"~.*\.test", "r.test:1"), ("*", "c.test:1")], "a.test", Route("r.test", 1, r"~.*\.test", False), id="regex-before-catch-all"),
    pytest.param([("*", "c.test:1"),], "a.test", Route("c.test", 1, "*", False), id="catch-all-alone"),
    pytest.param([("x.test", "e.test:1"), ("*.x.test", "w.test:1"), ("*", "c.test:1")], "y.test", Route("c.test", 1, "*", False), id="falls-to-catch-all"),
    # no SNI and junk SNI: only the fallback applies
    pytest.param([("*", "*:443")], None, None, id="no-sni-no-fallback"),
    pytest.param([("*", "*:443")], "", None, id="empty-sni"),
    pytest.param([("*", "*:443")], ".", None, id="dot-sni"),
    pytest.param([("*", "*:443")], "a b.test", None, id="space-sni"),
    pytest.param([("*", "*:443")], "a/b.test", None, id="slash-sni"),
    pytest.param([("*", "*:443")], "::1", None, id="v6-sni"),
    pytest.param([("*", "*:443")], "a" * 64 + ".test", None, id="long-label-sni"),
    pytest.param([("*", "*:443")], "ünï.test", None, id="non-ascii-sni"),
    pytest.param([], "a.test", None, id="empty-table"),
]


@pytest.mark.parametrize("rules, sni, expected", CASES)
def test_route(rules, sni, expected):
    assert table(*rules).route(sni) == expected


FALLBACK = Route("127.0.0.1", 10443, "fallback", False)


@pytest.mark.parametrize(
    "rules, sni, expected",
    [
        ([("a.test", "e.test:1")], None, FALLBACK),
        ([("*", "*:443")], None, FALLBACK),
        ([("a.test", "e.test:1")], "b.test", FALLBACK),
        ([("a.test", "e.test:1")], "a.test", Route("e.test", 1, "a.test", False)),
        ([("*", "*:443")], "10.0.0.1", FALLBACK),
        ([("*", "*:443")], "bad name", FALLBACK),
        ([(r"~(a)?b\.test", "$1.in.test:1")], "b.test", FALLBACK),
        ([], "a.test", FALLBACK),
        ([], None, FALLBACK),
    ],
)
def test_fallback(rules, sni, expected):
    assert table(*rules, fallback="127.0.0.1:10443").route(sni) == expected


def test_fallback_host_lowercased():
    rt = RouteTable.from_config(TableConfig("t", (), Address("Backend.Test", 1)))
    assert rt.route(None) == Route("backend.test", 1, "fallback", False)
    assert rt.fallback == Route("backend.test", 1, "fallback", False)


def test_shipped_table():
    config = load_config(__import__("pathlib").Path(__file__).resolve().parents[2] / "config.toml")
    rt = RouteTable.from_config(config.tables["default"])
    assert rt.route("app.example.test") == Route("127.0.0.1", 9443, "app.example.test", False)
    assert rt.route("x.example.test").host == "backend.test"
    assert rt.route("db.svc.test").host == "db.internal.test"
    assert rt.route("elsewhere.test") == Route("elsewhere.test", 443, "*", True)
    assert rt.route(None) == Route("127.0.0.1", 10443, "fallback", False)


def test_from_config_rejects_invalid_routes():
    with pytest.raises(ValueError):
        RouteTable.from_config(TableConfig("t", (RouteConfig("a.test", "*:1"),)))
    with pytest.raises(ValueError):
        RouteTable.from_config(TableConfig("t", (RouteConfig("~(", "b.test:1"),)))


def test_big_table_is_fast():
    n = 20000
    rules = tuple(RouteConfig(f"host{i}.test", f"10.0.{i // 256 % 256}.{i % 256}:443") for i in range(n))
    rules += tuple(RouteConfig(f"*.zone{i}.test", "w.test:443") for i in range(n))
    rt = RouteTable.from_config(TableConfig("big", rules))
    assert len(rt) == 2 * n
    assert rt.route(f"host{n - 1}.test").rule == f"host{n - 1}.test"
    assert rt.route(f"a.b.zone{n - 1}.test").rule == f"*.zone{n - 1}.test"
    assert rt.route("missing.test") is None
    import time

    start = time.perf_counter()
    for i in range(10000):
        rt.route(f"host{i}.test")
        rt.route(f"x.zone{i}.test")
    assert time.perf_counter() - start < 1.0  # lookups, not scans of 40000 rules


# ---------------------------------------------------------------------------------------------------
# route() is total

_EVERY_KIND = table(
    ("app.example.test", "10.0.0.1:443"),
    ("*.example.test", "*:443"),
    (r"~^(\w+)\.svc\.test$", "$1.internal.test:443"),
    (r"~(.*)\.(.*)\.(.*)", "$3.$1.$2:1"),
    (r"~([^.]*)-(.*)", "$2-x.$1.test:1"),
    ("*", "*:443"),
    fallback="127.0.0.1:1",
)
_NO_FALLBACK = table((r"~(.*)", "$1:1"), (r"~(.)(.*)", "$2$1.test:1"))

hostnameish = st.from_regex(r"[A-Za-z0-9_.\-]{0,80}\.?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(), hostnameish))
def test_route_never_raises(sni):
    for rt in (_EVERY_KIND, _NO_FALLBACK):
        result = rt.route(sni)
        assert result is None or isinstance(result, Route)
    result = _EVERY_KIND.route(sni)
    assert result is not None  # there is a fallback
    if result.dynamic:
        assert result.host == result.host.lower()
        assert result.host and ".." not in result.host and " " not in result.host


# -- no open proxy: dynamic routes and private addresses ---------------------------------------------

def _table(allow=()):
    from sniproxy.config import RouteConfig, TableConfig
    return RouteTable.from_config(TableConfig(
        name="t",
        routes=(RouteConfig("static.test", "127.0.0.1:443"), RouteConfig("*", "*:443", "v1")),
        allow_private_backends=tuple(allow)))


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.1.1", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "::1", "fe80::1", "fd00::1", "::", "ff02::1", "::ffff:127.0.0.1", "fec0::1",
    "64:ff9b::7f00:1", "::1.2.3.4", "::ffff:0:102:304",
])
def test_dynamic_route_refuses_non_global_addresses(address):
    table = _table()
    route = table.route("anything.test")
    assert route is not None and route.dynamic and route.proxy_protocol == "v1"
    assert not table.backend_allowed(route, address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1::1"])
def test_dynamic_route_allows_global_addresses(address):
    table = _table()
    assert table.backend_allowed(table.route("anything.test"), address)


def test_static_route_may_use_any_address():
    table = _table()
    route = table.route("static.test")
    assert route is not None and not route.dynamic and route.proxy_protocol is None
    assert table.backend_allowed(route, "127.0.0.1")


def test_allowed_private_networks_are_honoured():
    table = _table(["127.0.0.0/8"])
    route = table.route("anything.test")
    assert table.backend_allowed(route, "127.0.0.5")
    assert not table.backend_allowed(route, "10.0.0.1")


def test_a_rule_passed_over_says_why():
    """A connection that lands on a later rule or the fallback carries why the first rule could not
    route it: never a silent re-route (issue 15, defect 9)."""
    rt = table((r"~^ip(\d+)\.lit\.test$", "127.0.0.$1:443"), fallback="192.0.2.1:443")
    route, skipped = rt.lookup("ip999.lit.test")
    assert route == rt.fallback
    assert len(skipped) == 1 and "'127.0.0.999'" in skipped[0] and "neither a hostname nor an IP" in skipped[0]
    assert rt.lookup("ip7.lit.test") == (Route("127.0.0.7", 443, r"~^ip(\d+)\.lit\.test$", True), ())
    route, skipped = table((r"~(a)?b\.test", "$1.in.test:1"), fallback="192.0.2.1:1").lookup("b.test")
    assert route is not None and route.rule == "fallback" and "captured nothing" in skipped[0]


def test_an_ip_literal_built_by_a_template_meets_the_open_proxy_guard():
    from sniproxy.config import RouteConfig, TableConfig
    routes = (RouteConfig(r"~^ip(\d+)\.lit\.test$", "127.0.0.$1:443"),)
    closed = RouteTable.from_config(TableConfig(name="t", routes=routes))
    route = closed.route("ip1.lit.test")
    assert route is not None and route.dynamic and route.host == "127.0.0.1"
    refusal = closed.backend_refusal(route, "127.0.0.1")
    assert refusal is not None and refusal.outcome == "backend_refused" and "127.0.0.0/8" in refusal.reason
    opened = RouteTable.from_config(TableConfig(name="t", routes=routes, allow_private_backends=("127.0.0.0/8",)))
    assert opened.backend_allowed(opened.route("ip1.lit.test"), "127.0.0.1")


def test_lookup_answers_stay_right_past_the_memo_bound() -> None:
    """lookup() remembers its answers per (name, alpn); past the bound it forgets, never answers
    from a stale entry, and stays bounded."""
    from sniproxy import routing

    t = table(("*.example.test", "b.test:443"), (REGEX, "$1.backend.test:443"), fallback="f.test:443")
    for i in range(routing._LOOKUP_CACHE_SIZE + 10):
        assert t.route(f"h{i}.example.test") == Route("b.test", 443, "*.example.test", False)
        route = t.route(f"s{i}.svc.test")
        assert route is not None and route.host == f"s{i}.backend.test"
        assert len(t._looked_up) <= routing._LOOKUP_CACHE_SIZE
    assert t.route("other.test") == Route("f.test", 443, "fallback", False)
    assert t.lookup("h1.example.test", ["h2"]) == t.lookup("h1.example.test", ("h2",))
