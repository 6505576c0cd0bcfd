"""sniproxy.config: the shipped file parses, defaults apply, and every rejection names its key path."""

from __future__ import annotations

import pathlib
import os
import textwrap

import pytest

from sniproxy.config import (
    Address,
    Config,
    ConfigError,
    EbpfConfig,
    LimitsConfig,
    LogConfig,
    ResolverConfig,
    RouteConfig,
    load_config,
    parse_address,
    parse_config,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config.toml"

LISTENER = """
[[listener]]
bind = "127.0.0.1:8443"
table = "default"
"""
TABLE = """
[table.default]
routes = [{ match = "a.test", backend = "127.0.0.1:9443" }]
"""
MINIMAL = LISTENER + TABLE


def cfg(*parts: str) -> Config:
    return parse_config("\n".join(textwrap.dedent(p) for p in parts))


def error(*parts: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg(*parts)
    return info.value


def routes(*pairs: tuple[str, str]) -> str:
    """A [table.default] with the given (match, backend) routes, as TOML literal strings."""
    items = ",\n".join(f"  {{ match = '{m}', backend = '{b}' }}" for m, b in pairs)
    return f"[table.default]\nroutes = [\n{items}\n]\n"


# ---------------------------------------------------------------------------------------------------
# The shipped file and defaults


def test_shipped_config_parses():
    config = load_config(SHIPPED)
    assert config.source == str(SHIPPED)
    assert [lc.bind for lc in config.listeners] == [Address("127.0.0.1", 8443)]
    assert config.listeners[0].protocol == "tls"
    table = config.tables[config.listeners[0].table]
    assert [r.match for r in table.routes] == [
        "app.example.test",
        "*.example.test",
        r"~^(\w+)\.svc\.test$",
        "*",
    ]
    assert table.routes[2].backend == "$1.internal.test:443"
    assert table.fallback == Address("127.0.0.1", 10443)
    assert config.resolver.nameservers == ()  # system resolver: works without a local DNS server
    # The kernel path ships on (config.toml says what `make bench` measured).
    assert config.ebpf.splice is True and config.ebpf.splice_after == 1 << 20


def test_shipped_config_compiles_into_route_tables():
    from sniproxy.routing import RouteTable

    config = load_config(SHIPPED)
    for table in config.tables.values():
        RouteTable.from_config(table)


def test_defaults_applied():
    config = cfg(MINIMAL)
    assert config.resolver == ResolverConfig()
    assert config.resolver.nameservers == ()
    assert config.resolver.mode == "ipv4_first"
    assert config.limits == LimitsConfig()
    assert config.limits.idle_timeout == 300.0
    assert config.limits.max_client_hello_size == 16384
    assert config.log == LogConfig(format="json", level="info", access_log=True)
    assert config.ebpf == EbpfConfig(splice=True, pin_dir="/sys/fs/bpf/sniproxy")
    assert config.server.workers == 1  # one process unless asked
    assert config.server.user == "sniproxy"  # never uid 0 unless asked
    assert config.source == "<string>"
    assert config.listeners[0].protocol == "tls"
    assert config.tables["default"].fallback is None


def test_metrics_off_unless_bound():
    from sniproxy.config import Address

    assert cfg(MINIMAL).metrics.bind is None
    assert cfg(MINIMAL, "[metrics]").metrics.bind is None
    assert cfg(MINIMAL, "[metrics]\nbind = '[::1]:9180'").metrics.bind == Address("::1", 9180)


@pytest.mark.parametrize("text, expected", [("workers = 'auto'", "auto"), ("workers = 3", 3)])
def test_workers_setting(text, expected):
    assert cfg(MINIMAL, "[server]\n" + text).server.workers == expected


@pytest.mark.parametrize("name", ["sniproxy", "root", "_svc-proxy.1", "www-data"])
def test_user_setting(name):
    assert cfg(MINIMAL, f"[server]\nuser = '{name}'").server.user == name


def test_auto_workers_is_one_per_usable_cpu_within_the_ring_count():
    from sniproxy.config import MAX_WORKERS
    from sniproxy.workers import worker_count

    assert worker_count("auto") == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert worker_count(5) == 5


def test_listener_table_defaults_to_default():
    config = cfg('[[listener]]\nbind = "127.0.0.1:1"\n', TABLE)
    assert config.listeners[0].table == "default"


def test_table_without_routes_is_fallback_only():
    config = cfg(LISTENER, '[table.default]\nfallback = "backend.test:443"\n')
    assert config.tables["default"].routes == ()
    assert config.tables["default"].fallback == Address("backend.test", 443)


def test_values_are_read():
    config = cfg(
        MINIMAL,
        """
        [resolver]
        nameservers = ["10.0.0.1", "10.0.0.2:5353", "[2001:db8::1]:53", "2001:db8::2"]
        timeout = 1
        tries = 3
        min_ttl = 0
        max_ttl = 60
        negative_ttl = 0
        cache_size = 5
        mode = "ipv6_only"

        [limits]
        client_hello_timeout = 1.5
        connect_timeout = 2
        idle_timeout = 10
        max_connections = 7
        max_client_hello_size = 4096
        shutdown_grace = 0

        [log]
        format = "console"
        level = "debug"
        access_log = false

        [ebpf]
        splice = false
        pin_dir = "/sys/fs/bpf/other"
        """,
    )
    assert config.resolver == ResolverConfig(
        nameservers=(
            Address("10.0.0.1", 53),
            Address("10.0.0.2", 5353),
            Address("2001:db8::1", 53),
            Address("2001:db8::2", 53),
        ),
        timeout=1.0,
        tries=3,
        min_ttl=0.0,
        max_ttl=60.0,
        negative_ttl=0.0,
        cache_size=5,
        mode="ipv6_only",
    )
    assert isinstance(config.resolver.timeout, float)
    assert config.limits == LimitsConfig(client_hello_timeout=1.5, connect_timeout=2.0, idle_timeout=10.0, max_connections=7, max_client_hello_size=4096, shutdown_grace=0.0)
    assert config.log == LogConfig("console", "debug", False)
    assert config.ebpf == EbpfConfig(False, "/sys/fs/bpf/other")


@pytest.mark.parametrize(
    "bind, expected",
    [
        ("[::]:443", Address("::", 443)),
        ("[::1]:8443", Address("::1", 8443)),
        ("[2001:DB8:0::1]:1", Address("2001:db8::1", 1)),  # canonical form
        ("0.0.0.0:65535", Address("0.0.0.0", 65535)),
    ],
)
def test_bind_forms(bind, expected):
    config = cfg(f'[[listener]]\nbind = "{bind}"\n', TABLE)
    assert config.listeners[0].bind == expected


def test_several_listeners_and_tables():
    config = cfg(
        """
        [[listener]]
        bind = "127.0.0.1:8443"
        table = "a"
        [[listener]]
        bind = "[::1]:8443"
        table = "b-2"
        [table.a]
        fallback = "127.0.0.1:1"
        [table.b-2]
        routes = [{ match = "x.test", backend = "[::1]:9" }]
        """
    )
    assert [lc.table for lc in config.listeners] == ["a", "b-2"]
    assert list(config.tables) == ["a", "b-2"]
    assert config.tables["b-2"].routes == (RouteConfig("x.test", "[::1]:9"),)


def test_config_is_immutable():
    config = cfg(MINIMAL)
    with pytest.raises(AttributeError):
        config.limits = LimitsConfig()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.tables["new"] = config.tables["default"]  # type: ignore[index]
    assert isinstance(config.listeners, tuple)
    assert isinstance(config.tables["default"].routes, tuple)


# ---------------------------------------------------------------------------------------------------
# Rejections: (TOML parts, key_path, words in the reason)

ERROR_CASES = [
    # unknown keys, at every level
    pytest.param(["colour = 1", MINIMAL], "colour", "unknown key", id="unknown-top"),
    pytest.param([LISTENER + "port = 1\n", TABLE], "listener[0].port", "unknown key", id="unknown-listener"),
    pytest.param([LISTENER, TABLE, "extra = 1"], "table.default.extra", "unknown key", id="unknown-table"),
    pytest.param(
        [LISTENER, routes(("a.test", "b.test:1")).replace("backend = 'b.test:1'", "backend = 'b.test:1', weight = 2")],
        "table.default.routes[0].weight", "unknown key", id="unknown-route",
    ),
    pytest.param([MINIMAL, "[resolver]\nservers = []"], "resolver.servers", "unknown key", id="unknown-resolver"),
    pytest.param([MINIMAL, "[limits]\ntimeout = 1"], "limits.timeout", "unknown key", id="unknown-limits"),
    pytest.param([MINIMAL, "[log]\nfile = 'x'"], "log.file", "unknown key", id="unknown-log"),
    pytest.param([MINIMAL, "[ebpf]\nxdp = true"], "ebpf.xdp", "unknown key", id="unknown-ebpf"),
    pytest.param([LISTENER, TABLE, "weights = true"], "table.default.weights", "unknown key", id="unknown-table-extra"),
    pytest.param([MINIMAL, '[resolver]\n"two words" = 1'], 'resolver."two words"', "unknown key", id="unknown-quoted"),
    # listeners
    pytest.param([TABLE], "listener", "at least one", id="no-listener"),
    pytest.param(["listener = []", TABLE], "listener", "at least one", id="empty-listener"),
    pytest.param(["[listener]\nbind = '127.0.0.1:1'", TABLE], "listener", "array of tables", id="listener-not-array"),
    pytest.param(["listener = [1]", TABLE], "listener[0]", "expected a table", id="listener-item-not-table"),
    pytest.param(["[[listener]]\ntable = 'default'", TABLE], "listener[0].bind", "required", id="bind-missing"),
    pytest.param(["[[listener]]\nbind = 8443", TABLE], "listener[0].bind", "expected a string", id="bind-int"),
    pytest.param(["[[listener]]\nbind = 'localhost:8443'", TABLE], "listener[0].bind", "IP address", id="bind-hostname"),
    pytest.param(["[[listener]]\nbind = '127.0.0.1'", TABLE], "listener[0].bind", "missing port", id="bind-no-port"),
    pytest.param(["[[listener]]\nbind = '127.0.0.1:0'", TABLE], "listener[0].bind", "1..65535", id="bind-port-0"),
    pytest.param(["[[listener]]\nbind = '127.0.0.1:65536'", TABLE], "listener[0].bind", "1..65535", id="bind-port-big"),
    pytest.param(["[[listener]]\nbind = '127.0.0.1:https'", TABLE], "listener[0].bind", "port", id="bind-port-name"),
    pytest.param(["[[listener]]\nbind = '::1:443'", TABLE], "listener[0].bind", "brackets", id="bind-v6-no-brackets"),
    pytest.param(["[[listener]]\nbind = '[::1]'", TABLE], "listener[0].bind", "port", id="bind-v6-no-port"),
    pytest.param(["[[listener]]\nbind = '[1.2.3.4]:1'", TABLE], "listener[0].bind", "IPv6", id="bind-v4-in-brackets"),
    pytest.param(["[[listener]]\nbind = '[::1:443'", TABLE], "listener[0].bind", "]", id="bind-unclosed"),
    pytest.param([LISTENER + "protocol = 'udp'\n", TABLE], "listener[0].protocol", "one of tls, http", id="protocol"),
    pytest.param([MINIMAL, "[limits]\nhttp_head_timeout = 0"], "limits.http_head_timeout", "> 0", id="http-head-timeout-zero"),
    pytest.param([MINIMAL, "[limits]\nhttp_head_timeout = 'x'"], "limits.http_head_timeout", "number", id="http-head-timeout-str"),
    pytest.param([MINIMAL, "[limits]\nmax_http_head_size = 100"], "limits.max_http_head_size", "between 512 and 1048576", id="http-head-size-small"),
    pytest.param([MINIMAL, "[limits]\nmax_http_head_size = 2000000"], "limits.max_http_head_size", "between", id="http-head-size-big"),
    pytest.param([LISTENER + "protocol = true\n", TABLE], "listener[0].protocol", "string", id="protocol-bool"),
    pytest.param(["[[listener]]\nbind = '127.0.0.1:1'\ntable = 'nope'", TABLE], "listener[0].table", "no table named 'nope'", id="table-missing"),
    pytest.param(["[[listener]]\nbind = '127.0.0.1:1'"], "listener[0].table", "no table named 'default'", id="no-tables"),
    pytest.param([LISTENER, LISTENER, TABLE], "listener[1].bind", "already bound by listener[0]", id="duplicate-bind"),
    pytest.param(
        [LISTENER, "[[listener]]\nbind = '[0:0::1]:8443'\n[[listener]]\nbind = '[::1]:8443'", TABLE],
        "listener[2].bind", "listener[1]", id="duplicate-bind-v6-spelling",
    ),
    # tables
    pytest.param(["table = 1", LISTENER], "table", "expected a table", id="table-not-table"),
    pytest.param([LISTENER, TABLE, '[table."bad name"]'], 'table."bad name"', "table names", id="table-name"),
    pytest.param([LISTENER, "[table.default]\nroutes = {}"], "table.default.routes", "array", id="routes-not-array"),
    pytest.param([LISTENER, "[table.default]\nroutes = ['a.test']"], "table.default.routes[0]", "expected a table", id="route-not-table"),
    pytest.param([LISTENER, "[table.default]\nroutes = [{ backend = 'a.test:1' }]"], "table.default.routes[0].match", "required", id="match-missing"),
    pytest.param([LISTENER, "[table.default]\nroutes = [{ match = 'a.test' }]"], "table.default.routes[0].backend", "required", id="backend-missing"),
    pytest.param([LISTENER, "[table.default]\nroutes = [{ match = 1, backend = 'a.test:1' }]"], "table.default.routes[0].match", "string", id="match-int"),
    pytest.param([LISTENER, "[table.default]\nfallback = 'b.test'"], "table.default.fallback", "missing port", id="fallback-no-port"),
    pytest.param([LISTENER, "[table.default]\nfallback = [1]"], "table.default.fallback[0]", "string", id="fallback-array-of-int"),
    # route match forms
    pytest.param([LISTENER, routes(("", "b.test:1"))], "table.default.routes[0].match", "empty", id="match-empty"),
    pytest.param([LISTENER, routes(("a.test", "b.test:1"), ("~(unclosed", "b.test:1"))], "table.default.routes[1].match", "invalid regex", id="match-bad-regex"),
    pytest.param([LISTENER, routes(("~", "b.test:1"))], "table.default.routes[0].match", "empty regex", id="match-empty-regex"),
    pytest.param([LISTENER, routes(("a.*.test", "b.test:1"))], "table.default.routes[0].match", "'*'", id="match-inner-star"),
    pytest.param([LISTENER, routes(("*a.test", "b.test:1"))], "table.default.routes[0].match", "'*'", id="match-star-prefix"),
    pytest.param([LISTENER, routes(("*.*.test", "b.test:1"))], "table.default.routes[0].match", "wildcard", id="match-double-wildcard"),
    pytest.param([LISTENER, routes(("*.", "b.test:1"))], "table.default.routes[0].match", "wildcard", id="match-wildcard-empty"),
    pytest.param([LISTENER, routes(("a..test", "b.test:1"))], "table.default.routes[0].match", "hostname", id="match-empty-label"),
    pytest.param([LISTENER, routes(("a b.test", "b.test:1"))], "table.default.routes[0].match", "hostname", id="match-space"),
    pytest.param([LISTENER, routes(("-a.test", "b.test:1"))], "table.default.routes[0].match", "hostname", id="match-leading-hyphen"),
    pytest.param([LISTENER, routes(("a" * 64 + ".test", "b.test:1"))], "table.default.routes[0].match", "hostname", id="match-long-label"),
    pytest.param([LISTENER, routes(("10.0.0.1", "b.test:1"))], "table.default.routes[0].match", "RFC 6066", id="match-ip"),
    pytest.param([LISTENER, routes(("A.test", "b.test:1"), ("a.test.", "c.test:1"))], "table.default.routes[1].match", "duplicate of routes[0]", id="match-duplicate"),
    pytest.param([LISTENER, routes(("*", "b.test:1"), ("a.test", "c.test:1"))], "table.default.routes[1].match", "unreachable", id="after-catch-all"),
    # route backend forms
    pytest.param([LISTENER, routes(("a.test", "b.test"))], "table.default.routes[0].backend", "missing port", id="backend-no-port"),
    pytest.param([LISTENER, routes(("a.test", "b.test:0"))], "table.default.routes[0].backend", "1..65535", id="backend-port-0"),
    pytest.param([LISTENER, routes(("a.test", "b_.test:x"))], "table.default.routes[0].backend", "port", id="backend-port-name"),
    pytest.param([LISTENER, routes(("a.test", "::1:443"))], "table.default.routes[0].backend", "brackets", id="backend-v6-no-brackets"),
    pytest.param([LISTENER, routes(("a.test", "b..test:1"))], "table.default.routes[0].backend", "hostname", id="backend-bad-host"),
    pytest.param([LISTENER, routes(("a.test", ":443"))], "table.default.routes[0].backend", "missing host", id="backend-no-host"),
    pytest.param([LISTENER, routes(("a.test", "*:443"))], "table.default.routes[0].backend", "exact match", id="dynamic-with-exact"),
    pytest.param([LISTENER, routes(("*", "*"))], "table.default.routes[0].backend", "'*:port'", id="dynamic-no-port"),
    pytest.param([LISTENER, routes(("*", "*.test:443"))], "table.default.routes[0].backend", "'*:port'", id="dynamic-star-host"),
    pytest.param([LISTENER, routes(("*.b.test", "$1.c.test:443"))], "table.default.routes[0].backend", "regex", id="template-with-wildcard"),
    pytest.param([LISTENER, routes(("a.test", "$1.c.test:443"))], "table.default.routes[0].backend", "regex", id="template-with-exact"),
    pytest.param([LISTENER, routes(("~(a)\\.test", "$2.c.test:443"))], "table.default.routes[0].backend", "1 group", id="template-group-missing"),
    pytest.param([LISTENER, routes(("~a\\.test", "$1.c.test:443"))], "table.default.routes[0].backend", "0 group", id="template-no-groups"),
    pytest.param([LISTENER, routes(("~(a)\\.test", "$0.c.test:443"))], "table.default.routes[0].backend", "1..9", id="template-dollar-0"),
    pytest.param([LISTENER, routes(("~(a)\\.test", "$x.c.test:443"))], "table.default.routes[0].backend", "1..9", id="template-dollar-x"),
    pytest.param([LISTENER, routes(("~(a)\\.test", "$1.c.test"))], "table.default.routes[0].backend", "port", id="template-no-port"),
    pytest.param([LISTENER, routes(("~(a)\\.test", "$1.c.test:$1"))], "table.default.routes[0].backend", "port", id="template-in-port"),
    pytest.param([LISTENER, routes(("~(a)\\.test", "$1..test:1"))], "table.default.routes[0].backend", "hostname", id="template-bad-shape"),
    # Templates that some name the regex accepts turns into neither a hostname nor an IP (issue 15, 9).
    pytest.param([LISTENER, routes(("~^(\\w+)\\.test$", "$1:1"))], "table.default.routes[0].backend", "builds '1' from the name '1.test'", id="template-digits-only-host"),
    pytest.param([LISTENER, routes(("~a(-\\w+)\\.test", "$1.in.test:1"))], "table.default.routes[0].backend", "neither a hostname nor an IP", id="template-leading-hyphen"),
    pytest.param([LISTENER, routes(("~^v([a-z]+)\\.test$", "[fd00::$1]:1"))], "table.default.routes[0].backend", "neither a hostname nor an IP", id="template-ipv6-not-hex"),
    # wrong types: bool is not an int, and numbers have ranges
    pytest.param([MINIMAL, "[limits]\nmax_connections = true"], "limits.max_connections", "integer", id="bool-not-int"),
    pytest.param([MINIMAL, "[resolver]\ntries = false"], "resolver.tries", "integer", id="bool-not-int-tries"),
    pytest.param([MINIMAL, "[limits]\nidle_timeout = true"], "limits.idle_timeout", "number", id="bool-not-float"),
    pytest.param([MINIMAL, "[limits]\nmax_connections = 10.0"], "limits.max_connections", "integer", id="float-not-int"),
    pytest.param([MINIMAL, "[limits]\nidle_timeout = '300'"], "limits.idle_timeout", "number", id="string-not-float"),
    pytest.param([MINIMAL, "[limits]\nidle_timeout = 0"], "limits.idle_timeout", "> 0", id="idle-zero"),
    pytest.param([MINIMAL, "[limits]\nconnect_timeout = -1.0"], "limits.connect_timeout", "> 0", id="connect-negative"),
    pytest.param([MINIMAL, "[limits]\nclient_hello_timeout = inf"], "limits.client_hello_timeout", "finite", id="hello-inf"),
    pytest.param([MINIMAL, "[limits]\nshutdown_grace = nan"], "limits.shutdown_grace", "finite", id="grace-nan"),
    pytest.param([MINIMAL, "[limits]\nshutdown_grace = -1"], "limits.shutdown_grace", ">= 0", id="grace-negative"),
    pytest.param([MINIMAL, "[limits]\nmax_connections = 0"], "limits.max_connections", ">= 1", id="max-conn-zero"),
    pytest.param([MINIMAL, "[limits]\nmax_client_hello_size = 100"], "limits.max_client_hello_size", "between", id="hello-size-small"),
    pytest.param([MINIMAL, "[limits]\nmax_client_hello_size = 100000000"], "limits.max_client_hello_size", "between", id="hello-size-big"),
    pytest.param(["limits = 5", MINIMAL], "limits", "expected a table", id="limits-not-table"),
    pytest.param([MINIMAL, "[resolver]\ntimeout = 0"], "resolver.timeout", "> 0", id="resolver-timeout"),
    pytest.param([MINIMAL, "[resolver]\ntries = 0"], "resolver.tries", ">= 1", id="resolver-tries"),
    pytest.param([MINIMAL, "[resolver]\ncache_size = 0"], "resolver.cache_size", ">= 1", id="resolver-cache"),
    pytest.param([MINIMAL, "[resolver]\nnegative_ttl = -1"], "resolver.negative_ttl", ">= 0", id="resolver-negative-ttl"),
    pytest.param([MINIMAL, "[resolver]\nmin_ttl = 10\nmax_ttl = 5"], "resolver.max_ttl", "min_ttl", id="resolver-ttl-order"),
    pytest.param([MINIMAL, "[resolver]\nmode = 'ipv4'"], "resolver.mode", "ipv4_first", id="resolver-mode"),
    pytest.param([MINIMAL, "[resolver]\nnameservers = '1.1.1.1'"], "resolver.nameservers", "array", id="nameservers-string"),
    pytest.param([MINIMAL, "[resolver]\nnameservers = ['1.1.1.1', 'dns.test']"], "resolver.nameservers[1]", "IP address", id="nameserver-hostname"),
    pytest.param([MINIMAL, "[resolver]\nnameservers = [53]"], "resolver.nameservers[0]", "string", id="nameserver-int"),
    pytest.param([MINIMAL, "[resolver]\nnameservers = ['1.1.1.1:0']"], "resolver.nameservers[0]", "1..65535", id="nameserver-port"),
    pytest.param([MINIMAL, "[log]\nformat = 'text'"], "log.format", "json, console", id="log-format"),
    pytest.param([MINIMAL, "[log]\nlevel = 'INFO'"], "log.level", "debug", id="log-level-case"),
    pytest.param([MINIMAL, "[log]\naccess_log = 1"], "log.access_log", "true or false", id="int-not-bool"),
    pytest.param([MINIMAL, "[ebpf]\nsplice = 'yes'"], "ebpf.splice", "true or false", id="string-not-bool"),
    pytest.param([MINIMAL, "[ebpf]\npin_dir = 'sys/fs/bpf'"], "ebpf.pin_dir", "absolute", id="pin-dir-relative"),
    pytest.param([MINIMAL, "[ebpf]\nsplice_after = -1"], "ebpf.splice_after", "between 0 and", id="splice-after-negative"),
    pytest.param([MINIMAL, "[ebpf]\nsplice_after = '1M'"], "ebpf.splice_after", "integer", id="splice-after-string"),
    pytest.param([MINIMAL, "[ebpf]\nqueue_limit = 1000"], "ebpf.queue_limit", "between 65536 and", id="queue-limit-tiny"),
    pytest.param([MINIMAL, "[ebpf]\nqueue_limit = '24M'"], "ebpf.queue_limit", "integer", id="queue-limit-string"),
    pytest.param([MINIMAL, "[ebpf]\nshortcut_cgroup = 'system.slice'"], "ebpf.shortcut_cgroup", "absolute",
                 id="shortcut-cgroup-relative"),
    pytest.param([MINIMAL, "[ebpf]\nshortcut_cgroup = 1"], "ebpf.shortcut_cgroup", "string",
                 id="shortcut-cgroup-not-string"),
    pytest.param([MINIMAL, "[server]\nworkers = 0"], "server.workers", "between 1 and 16", id="workers-zero"),
    pytest.param([MINIMAL, "[server]\nworkers = 17"], "server.workers", "between 1 and 16", id="workers-above-rings"),
    pytest.param([MINIMAL, "[server]\nworkers = 'all'"], "server.workers", '"auto"', id="workers-word"),
    pytest.param([MINIMAL, "[server]\nworkers = 2.0"], "server.workers", "integer", id="workers-float"),
    pytest.param([MINIMAL, "[server]\nuser = ''"], "server.user", "user name", id="user-empty"),
    pytest.param([MINIMAL, "[server]\nuser = 'a b'"], "server.user", "user name", id="user-space"),
    pytest.param([MINIMAL, "[server]\nuser = 0"], "server.user", "string", id="user-uid-number"),
    pytest.param([MINIMAL, "[server]\nthreads = 2"], "server.threads", "unknown", id="server-unknown-key"),
    pytest.param([MINIMAL, "[metrics]\nport = 9180"], "metrics.port", "unknown", id="metrics-unknown-key"),
    pytest.param([MINIMAL, "[metrics]\nbind = 9180"], "metrics.bind", "string", id="metrics-bind-int"),
    pytest.param([MINIMAL, "[metrics]\nbind = 'localhost:9180'"], "metrics.bind", "IP address", id="metrics-bind-hostname"),
    pytest.param([MINIMAL, "[metrics]\nbind = '127.0.0.1'"], "metrics.bind", "port", id="metrics-bind-no-port"),
    pytest.param([MINIMAL, "[metrics]\nbind = '127.0.0.1:8443'"], "metrics.bind", "listener[0]", id="metrics-bind-listener"),
]


@pytest.mark.parametrize("parts, key_path, reason", ERROR_CASES)
def test_rejected(parts, key_path, reason):
    e = error(*parts)
    assert e.key_path == key_path
    assert reason in e.reason
    assert str(e) == f"{key_path}: {e.reason}"


@pytest.mark.parametrize(
    "pairs",
    [
        [("*.example.test", "*:443")],
        [("~.*", "*:443")],
        [("*", "*:443")],
        [("~^(\\w+)\\.svc\\.test$", "$1.internal.test:443")],
        [("~(a)(b)(c)(d)(e)(f)(g)(h)(i)", "$9-$1.x.test:1")],
        [("~(?P<n>\\w+)\\.test", "$1.x.test:1")],
        [("~^ip(\\d+)\\.lit\\.test$", "127.0.0.$1:443")],  # nginx-style IP literal (issue 15, 9)
        [("~^v6-([0-9a-f]{1,4})\\.test$", "[fd00::$1]:443")],
        [("APP.Example.Test.", "Backend.Test.:1")],
        [("_acme.test", "[2001:db8::1]:443")],
        [("*.test", "b.test:1"), ("*.a.test", "c.test:1")],  # reachable: the order decides, not an error
        [("a.test", "b.test:1"), ("*", "*:1")],
    ],
)
def test_accepted_routes(pairs):
    config = cfg(LISTENER, routes(*pairs))
    assert [(r.match, r.backend) for r in config.tables["default"].routes] == pairs


# ---------------------------------------------------------------------------------------------------
# TOML syntax and files


def test_toml_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as info:
        parse_config("[[listener]]\nbind = \n")
    e = info.value
    assert e.key_path == "line 2, column 8"
    assert e.reason.startswith("invalid TOML: ")
    assert "(at line" not in e.reason


def test_load_config_prefixes_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL + "\n[limits]\nidle_timeout = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    e = info.value
    assert e.key_path == "limits.idle_timeout"
    assert not e.reason.startswith(str(path))
    assert str(e) == f"{path}: limits.idle_timeout: {e.reason}"


def test_load_config_toml_error_prefixes_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("a = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: line 1, column ")


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    e = info.value
    assert e.key_path == ""
    assert "cannot read" in e.reason
    assert str(e) == f"{path}: {e.reason}"


def test_load_config_directory(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_load_config_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n" + MINIMAL.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "UTF-8" in info.value.reason


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL)
    assert load_config(path).source == str(path)


def test_parse_config_with_source_prefixes_errors():
    with pytest.raises(ConfigError) as info:
        parse_config("x = 1", source="inline.toml")
    assert str(info.value) == "inline.toml: x: " + info.value.reason


# ---------------------------------------------------------------------------------------------------
# parse_address


@pytest.mark.parametrize(
    "text, default_port, expected",
    [
        ("127.0.0.1:8443", None, Address("127.0.0.1", 8443)),
        ("[::1]:8443", None, Address("::1", 8443)),
        ("[::]:443", None, Address("::", 443)),
        ("host.test:443", None, Address("host.test", 443)),
        ("Host.Test.:443", None, Address("host.test", 443)),
        ("1.1.1.1", 53, Address("1.1.1.1", 53)),
        ("[2001:db8::1]", 53, Address("2001:db8::1", 53)),
        ("2001:db8::1", 53, Address("2001:db8::1", 53)),
        ("dns.test", 53, Address("dns.test", 53)),
        ("[fe80::1%eth0]:53", None, Address("fe80::1%eth0", 53)),
    ],
)
def test_parse_address(text, default_port, expected):
    assert parse_address(text, default_port=default_port) == expected


@pytest.mark.parametrize(
    "text",
    ["", "host.test", ":443", "host.test:", "host.test:-1", "host.test:+1", "host.test:99999",
     "::1", "::1:443", "[::1]", "[::1]443", "[::1", "[x]:1", "a b:1", "a..b:1", "1.2.3:1", "*:443",
     "host.test:443:1", "host.test:٣"],
)
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_address_str():
    assert str(Address("::1", 443)) == "[::1]:443"
    assert str(Address("127.0.0.1", 443)) == "127.0.0.1:443"


# -- hardening keys (issue: no open proxy, PROXY protocol, per-address limits) ----------------------

HARDENED = '''
[[listener]]
bind = "127.0.0.1:8443"
accept_proxy_protocol = true
trusted = ["10.0.0.0/8", "fd00::1"]

[table.default]
allow_private_backends = ["192.168.1.0/24"]
routes = [{ match = "*", backend = "*:443", proxy_protocol = "v2" }]

[limits]
max_connections_per_ip = 5
'''


def test_hardening_keys_parse():
    config = parse_config(HARDENED)
    (listener,) = config.listeners
    assert listener.accept_proxy_protocol and listener.trusted == ("10.0.0.0/8", "fd00::1/128")
    table = config.tables["default"]
    assert table.allow_private_backends == ("192.168.1.0/24",)
    assert table.routes[0].proxy_protocol == "v2"
    assert config.limits.max_connections_per_ip == 5


def test_allow_private_backends_true_means_every_network():
    config = parse_config(HARDENED.replace('["192.168.1.0/24"]', "true"))
    assert config.tables["default"].allow_private_backends == ("0.0.0.0/0", "::/0")


@pytest.mark.parametrize("old, new, key_path", [
    ('proxy_protocol = "v2"', 'proxy_protocol = "v3"', "table.default.routes[0].proxy_protocol"),
    ('["192.168.1.0/24"]', '["not-a-net"]', "table.default.allow_private_backends[0]"),
    ('["192.168.1.0/24"]', '"yes"', "table.default.allow_private_backends"),
    ('trusted = ["10.0.0.0/8", "fd00::1"]', "trusted = []", "listener[0].trusted"),
    ("accept_proxy_protocol = true", "accept_proxy_protocol = false", "listener[0].trusted"),
    ("max_connections_per_ip = 5", "max_connections_per_ip = -1", "limits.max_connections_per_ip"),
])
def test_hardening_key_errors_name_the_key(old, new, key_path):
    with pytest.raises(ConfigError) as info:
        parse_config(HARDENED.replace(old, new))
    assert info.value.key_path == key_path


# -- http listeners (issue 16) ----------------------------------------------------------------------


def test_http_listener_and_head_limits_parse():
    config = cfg(LISTENER + 'protocol = "http"\n', TABLE,
                 "[limits]\nhttp_head_timeout = 2.5\nmax_http_head_size = 8192\n")
    assert config.listeners[0].protocol == "http"
    assert (config.limits.http_head_timeout, config.limits.max_http_head_size) == (2.5, 8192)


def test_http_head_limits_default():
    config = cfg(MINIMAL)
    assert (config.limits.http_head_timeout, config.limits.max_http_head_size) == (5.0, 16384)


# -- issue 15, defect 11 ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, position", [
    ("a = [1,\n", "line 2, column 1 (end of file)"),
    ("[[listener]]\nbind = \"127.0.0.1:1\"\nroutes = [", "line 3, column 11 (end of file)"),
    ("x = = 1\n", "line 1, column 5"),
])
def test_toml_syntax_errors_name_line_and_column(text, position):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.toml")
    assert info.value.key_path == position
    assert str(info.value).startswith(f"f.toml: {position}: invalid TOML: ")


@pytest.mark.parametrize("snippet, key_path", [
    ('[[listener]]\nbind = "127.0.0.1:1"\naccept_proxy_protocol = true\ntrusted = ["10.0.0.1/8"]\n'
     '[table.default]\n', "listener[0].trusted[0]"),
    ('[[listener]]\nbind = "127.0.0.1:1"\n[table.default]\nallow_private_backends = ["10.1.2.3/8"]\n',
     "table.default.allow_private_backends[0]"),
])
def test_cidrs_with_host_bits_are_refused_like_xdp_allow(snippet, key_path):
    with pytest.raises(ConfigError) as info:
        parse_config(snippet)
    assert info.value.key_path == key_path
    assert "has host bits set" in info.value.reason and "did you mean 10.0.0.0/8?" in info.value.reason


def test_shortcut_cgroup_is_off_by_default_and_kept_as_given():
    assert cfg(MINIMAL).ebpf.shortcut_cgroup is None
    config = cfg(MINIMAL, "[ebpf]\nshortcut_cgroup = '/sys/fs/cgroup/system.slice/nginx.service'")
    assert config.ebpf.shortcut_cgroup == "/sys/fs/cgroup/system.slice/nginx.service"
