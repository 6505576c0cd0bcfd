# Owns the config language: TOML -> validated frozen dataclasses, and the route match/backend
# syntax (parse_match/parse_backend, reused by routing.py). Pure stdlib; only load_config does I/O.
# Invariant: a Config that exists is fully valid; each rejection is a ConfigError naming its key path.
from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Address",
    "BackendAddress",
    "BackendKind",
    "BackendsConfig",
    "BackendSpec",
    "Config",
    "ConfigError",
    "EbpfConfig",
    "XdpConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "MatchKind",
    "MatchSpec",
    "ResolverConfig",
    "RouteConfig",
    "TableConfig",
    "backend_host",
    "UnixAddress",
    "is_hostname",
    "load_config",
    "normalize_hostname",
    "parse_address",
    "parse_backend",
    "parse_backend_address",
    "parse_config",
    "parse_match",
    "template_host",
]


class ConfigError(Exception):
    """A configuration value was rejected. `key_path` names it ("" when no key applies)."""

    def __init__(self, key_path: str, reason: str, *, source: str | None = None) -> None:
        super().__init__(key_path, reason)
        self.key_path = key_path
        self.reason = reason
        self.source = source  # file path when the error came from load_config, else None

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key_path) if p]
        return ": ".join([*parts, self.reason])


# --------------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True)
class Address:
    host: str  # IP literal (canonical form, no brackets) or lower-case hostname
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """A unix stream socket a backend listens on (`backend = "unix:/run/app.sock"`)."""

    path: str  # absolute filesystem path

    def __str__(self) -> str:
        return f"unix:{self.path}"


BackendAddress = Address | UnixAddress


@dataclass(frozen=True)
class ListenerConfig:
    bind: Address
    protocol: str
    table: str
    accept_proxy_protocol: bool = False  # expect a PROXY v1/v2 header from a trusted load balancer
    trusted: tuple[str, ...] = ()  # CIDRs allowed to send that header (canonical network strings)


@dataclass(frozen=True)
class RouteConfig:
    match: str
    # One backend as written, or a tuple of them (`backend = ["a:443", "b:443"]`): the proxy picks
    # one per connection (sniproxy.balancer). Lists hold only static and unix backends.
    backend: str | tuple[str, ...]
    proxy_protocol: str | None = None  # "v1" | "v2": send a PROXY header to the backend first
    alpn: tuple[str, ...] = ()  # the client must offer one of these ALPN protocols; empty: any


@dataclass(frozen=True)
class TableConfig:
    name: str
    routes: tuple[RouteConfig, ...] = ()
    # One backend, or a tuple of them (chosen per connection like a route's list).
    fallback: BackendAddress | tuple[BackendAddress, ...] | None = None
    # Networks a dynamic route (backend built from the client's SNI) may connect to even though they
    # are private, loopback, link-local, multicast or unspecified. Empty: none (no open proxy).
    allow_private_backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResolverConfig:
    nameservers: tuple[Address, ...] = ()  # empty: use the system resolver (/etc/resolv.conf)
    timeout: float = 2.0
    tries: int = 2
    min_ttl: float = 1.0
    max_ttl: float = 3600.0
    negative_ttl: float = 5.0
    cache_size: int = 10000
    mode: str = "ipv4_first"
    kernel_cache: bool = True  # the pinned dns_cache map when BPF allows, else memory


@dataclass(frozen=True)
class LimitsConfig:
    client_hello_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_connections: int = 10000
    max_connections_per_ip: int = 0  # 0: no per-address limit
    max_client_hello_size: int = 16384
    shutdown_grace: float = 30.0
    # protocol = "http" listeners: the request head (request line and headers) instead of the hello
    http_head_timeout: float = 5.0
    max_http_head_size: int = 16384


@dataclass(frozen=True)
class LogConfig:
    format: str = "json"
    level: str = "info"
    access_log: bool = True


@dataclass(frozen=True)
class ServerConfig:
    # Processes serving the listeners (all accept on the same listening sockets): an int, or "auto"
    # for one per CPU this process may run on. 1 runs everything in one process, no fork.
    workers: int | str = 1
    # Every process of the proxy runs as this user once listeners are bound and BPF objects loaded
    # (when started as root); "root" keeps uid 0 (with no capabilities either way).
    user: str = "sniproxy"


@dataclass(frozen=True)
class BackendsConfig:
    """How a route with several backends treats them (sniproxy.balancer, sniproxy.health)."""

    hold_down: float = 10.0  # seconds a backend whose connect failed gets no new connections
    health_check_interval: float = 0.0  # seconds between TCP/unix connect checks; 0: no checks
    health_check_timeout: float = 2.0  # seconds one check may take to connect


@dataclass(frozen=True)
class EbpfConfig:
    splice: bool = True
    pin_dir: str = "/sys/fs/bpf/sniproxy"
    # Bytes a connection moves (either way) in userspace before it is handed to the kernel; 0: at
    # once. Below about 1 MB the hand-off costs more CPU than copying saves (docs/benchmarks.md).
    splice_after: int = 1 << 20
    # Bytes put toward one socket and not yet acknowledged by its remote end above which the splice
    # verdict leaves bytes to userspace (a "hold"): the kernel memory a pair may use. ebpf/sniproxy.h's
    # SNIPROXY_DEFAULT_QUEUE_LIMIT, kept in step by a test.
    queue_limit: int = 24 << 20
    # A cgroup v2 directory whose processes' accepted sockets may be short-circuited (the local
    # backend's replies sent straight to the client socket); None: the short-circuit is off.
    shortcut_cgroup: str | None = None


@dataclass(frozen=True)
class XdpConfig:
    enabled: bool = False
    interfaces: tuple[str, ...] = ()
    mode: str = "auto"  # "native" | "generic" | "auto" (native, else generic)
    allow: tuple[str, ...] = ()  # canonical CIDR strings ("10.0.0.0/8"), no duplicates


@dataclass(frozen=True)
class MetricsConfig:
    bind: Address | None = None  # where /metrics is served; None: no endpoint, no metrics kept


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    tables: Mapping[str, TableConfig]  # read-only (MappingProxyType), in file order
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    backends: BackendsConfig = field(default_factory=BackendsConfig)
    ebpf: EbpfConfig = field(default_factory=EbpfConfig)
    xdp: XdpConfig = field(default_factory=XdpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<string>"


PROTOCOLS = ("tls", "http")
RESOLVER_MODES = ("ipv4_first", "ipv6_first", "ipv4_only", "ipv6_only")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_CLIENT_HELLO_SIZE = 512
MAX_CLIENT_HELLO_SIZE = 1 << 24  # a handshake message length is 24 bits
MIN_HTTP_HEAD_SIZE = 512
MAX_HTTP_HEAD_SIZE = 1 << 20  # nginx's large_client_header_buffers tops out far below this

# --------------------------------------------------------------------------------------------------
# Hostnames and addresses

# One label: letters, digits, '_' and '-', 1..63 characters, no leading or trailing '-'.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
_TABLE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)


def normalize_hostname(name: str) -> str:
    """Lower-case and drop one trailing dot. Does not validate."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def is_hostname(name: str) -> bool:
    """True for a normalised (lower-case, no trailing dot) DNS hostname.

    IP literals are not hostnames: a name whose last label is all digits is refused, so "10.0.0.1"
    and "10.1" never pass as names (RFC 6066 also forbids IP literals in SNI).
    """
    if not 0 < len(name) <= 253 or _HOSTNAME_RE.fullmatch(name) is None:
        return False
    return not name.rpartition(".")[2].isdigit()


def _ip_literal(text: str) -> str | None:
    """Canonical form of an IPv4/IPv6 literal, or None when `text` is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _parse_port(text: str) -> int:
    if _PORT_RE.fullmatch(text) is None:
        raise ValueError(f"port must be a number 1..65535, got {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    return port


def _parse_host(text: str) -> str:
    ip = _ip_literal(text)
    if ip is not None:
        return ip
    name = normalize_hostname(text)
    if not is_hostname(name):
        raise ValueError(f"{text!r} is neither an IP address nor a valid hostname")
    return name


def parse_address(text: str, *, default_port: int | None = None) -> Address:
    """Parse "host:port", "[v6]:port" (or "host" / "[v6]" / bare v6 when default_port is given).

    The host is an IP literal (returned in canonical form) or a hostname (lower-cased, one trailing
    dot dropped). Raises ValueError with a human reason.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string address, got {type(text).__name__}")
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if rest == "" and default_port is not None:
            return Address(host, default_port)
        if not rest.startswith(":"):
            raise ValueError(f"expected '[{host}]:port', got {text!r}")
        return Address(host, _parse_port(rest[1:]))
    if text.count(":") > 1:
        # Unbracketed IPv6: only unambiguous when no port follows.
        ip = _ip_literal(text)
        if ip is not None and default_port is not None:
            return Address(ip, default_port)
        raise ValueError(f"IPv6 addresses need brackets and a port, like '[::1]:443', got {text!r}")
    host, sep, port = text.partition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (expected host:port)")
        return Address(_parse_host(text), default_port)
    if not host:
        raise ValueError(f"missing host in {text!r}")
    return Address(_parse_host(host), _parse_port(port))


# --------------------------------------------------------------------------------------------------
# Route syntax (shared with routing.py)


class MatchKind(enum.Enum):
    EXACT = "exact"  # "app.example.test"
    WILDCARD = "wildcard"  # "*.example.test": one or more labels before the suffix
    REGEX = "regex"  # "~pattern": fullmatch against the normalised name
    CATCH_ALL = "catch_all"  # "*"


@dataclass(frozen=True)
class MatchSpec:
    kind: MatchKind
    # EXACT: the name; WILDCARD: the suffix without "*."; REGEX: the source; CATCH_ALL: "*"
    value: str
    regex: re.Pattern[str] | None = None


class BackendKind(enum.Enum):
    STATIC = "static"  # "host:port" / "[v6]:port"
    SNI = "sni"  # "*:port": connect to the client's SNI name
    TEMPLATE = "template"  # "$1.internal.test:port": regex captures substituted
    UNIX = "unix"  # "unix:/run/app.sock": a unix stream socket


@dataclass(frozen=True)
class BackendSpec:
    kind: BackendKind
    port: int
    host: str = ""  # STATIC only
    template: tuple[str | int, ...] = ()  # TEMPLATE only: literal text and capture group numbers
    path: str = ""  # UNIX only (port is 0)

    def address(self) -> BackendAddress:
        """The fixed address of a STATIC or UNIX backend."""
        if self.kind is BackendKind.UNIX:
            return UnixAddress(self.path)
        assert self.kind is BackendKind.STATIC
        return Address(self.host, self.port)


def parse_match(text: str) -> MatchSpec:
    """Parse a route `match` string. Raises ValueError with a reason."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    if text == "":
        raise ValueError("empty match")
    if text == "*":
        return MatchSpec(MatchKind.CATCH_ALL, "*")
    if text.startswith("~"):
        source = text[1:]
        if source == "":
            raise ValueError("empty regex after '~'")
        try:
            regex = re.compile(source, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"invalid regex {source!r}: {e}") from None
        return MatchSpec(MatchKind.REGEX, source, regex)
    if text.startswith("*."):
        suffix = normalize_hostname(text[2:])
        if "*" in suffix or not is_hostname(suffix):
            raise ValueError(f"wildcard suffix {text[2:]!r} is not a valid hostname")
        return MatchSpec(MatchKind.WILDCARD, suffix)
    if "*" in text:
        raise ValueError(f"'*' is only allowed alone or as a leading '*.' label, got {text!r}")
    name = normalize_hostname(text)
    if _ip_literal(name) is not None:
        raise ValueError(f"{text!r} is an IP address; SNI never carries IP addresses (RFC 6066)")
    if not is_hostname(name):
        raise ValueError(f"{text!r} is not a valid hostname")
    return MatchSpec(MatchKind.EXACT, name)


_CAPTURE_RE = re.compile(r"\$(.?)", re.DOTALL)


def _parse_template(host: str, match: MatchSpec) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    pos = 0
    for m in _CAPTURE_RE.finditer(host):
        if m.start() > pos:
            parts.append(host[pos : m.start()].lower())
        digit = m.group(1)
        if not ("1" <= digit <= "9" and len(digit) == 1):
            raise ValueError(f"'$' must be followed by a capture number 1..9 in {host!r}")
        parts.append(int(digit))
        pos = m.end()
    if pos < len(host):
        parts.append(host[pos:].lower())
    if match.kind is not MatchKind.REGEX or match.regex is None:
        raise ValueError("'$N' captures are only allowed when match is a '~regex'")
    groups = match.regex.groups
    for part in parts:
        if isinstance(part, int) and part > groups:
            raise ValueError(
                f"${part} refers to capture group {part}, but the regex has {groups} group(s)"
            )
    # Every name the regex accepts may be a client's: build sample names from the regex itself (once
    # preferring letters, once digits) and refuse a template that turns one into neither a hostname
    # nor an IP literal. Real captures are still checked per connection (`(\d+)` may give 999).
    sampled = False
    for sample in _sample_names(match.regex):
        m = match.regex.fullmatch(sample)
        if m is None or not is_hostname(sample):
            continue  # not a name a client could send (or the sampler guessed wrong)
        built = template_host(parts, m.groups())
        if built is None:
            continue
        sampled = True
        if backend_host(built) is None:
            raise ValueError(f"template {host!r} builds {built!r} from the name {sample!r}, which is "
                             f"neither a hostname nor an IP address; narrow the regex's groups")
    if not sampled and all(backend_host("".join(stand_in if isinstance(p, int) else p for p in parts))
                           is None for stand_in in ("x", "1")):
        raise ValueError(f"template {host!r} cannot produce a valid hostname or IP address")
    return tuple(parts)


def template_host(template: tuple[str | int, ...] | list[str | int],
                  captures: tuple[str | None, ...]) -> str | None:
    """The template with its captures substituted (lower-case), or None when a group it uses did
    not take part in the match or captured nothing."""
    pieces: list[str] = []
    for part in template:
        if isinstance(part, int):
            value = captures[part - 1] if part <= len(captures) else None
            if not value:
                return None
            pieces.append(value.lower())
        else:
            pieces.append(part)
    return "".join(pieces)


def backend_host(text: str) -> str | None:
    """A backend host built by a template: the canonical IP literal ("[v6]" or a bare IPv4/IPv6
    address, as nginx's proxy_pass takes from a map) or the normalised hostname; None if neither."""
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            return None
    ip = _ip_literal(text)
    if ip is not None:
        return ip
    name = normalize_hostname(text)
    return name if is_hostname(name) else None


class _NoSample(Exception):
    pass


def _sample_names(regex: re.Pattern[str]) -> list[str]:
    """Up to two names `regex` should accept: one choosing letters wherever the regex allows them,
    one choosing digits. Empty when the regex uses something this small sampler does not model."""
    import re._constants as c  # the stdlib's own regex parse tree
    import re._parser as parser

    def one_of(items: list[tuple[Any, Any]], digits: bool) -> str:
        choices: list[str] = []
        for op, av in items:
            if op is c.NEGATE:
                raise _NoSample
            if op is c.LITERAL:
                choices.append(chr(av))
            elif op is c.RANGE:
                choices.extend(chr(x) for x in range(av[0], min(av[1], av[0] + 256) + 1))
            elif op is c.CATEGORY and av is c.CATEGORY_DIGIT:
                choices.append("1")
            elif op is c.CATEGORY and av is c.CATEGORY_WORD:
                choices.extend(("x", "1"))
            else:
                raise _NoSample
        preferred = [ch for ch in choices if ch.isdigit() == digits]
        if not preferred:
            return choices[0] if choices else ""
        # Letters: the last one allowed (for [a-z], 'z' is no hex digit, so "[fd00::$1]" shows).
        return preferred[0] if digits else max(preferred)

    def build(tree: Any, digits: bool) -> str:
        out: list[str] = []
        for op, av in tree:
            if op is c.LITERAL:
                out.append(chr(av))
            elif op is c.NOT_LITERAL:
                out.append(next(ch for ch in ("1", "x", "y") if ch != chr(av)) if digits
                           else next(ch for ch in ("x", "y") if ch != chr(av)))
            elif op is c.ANY:
                out.append("1" if digits else "x")
            elif op is c.IN:
                out.append(one_of(av, digits))
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
                low, high, sub = av
                out.append(build(sub, digits) * (max(low, 1) if high else 0))
            elif op is c.SUBPATTERN:
                out.append(build(av[-1], digits))
            elif op is c.BRANCH:
                out.append(build(av[1][0], digits))
            elif op is c.AT:
                continue
            else:
                raise _NoSample
        return "".join(out)

    try:
        tree = parser.parse(regex.pattern, regex.flags)
        return list(dict.fromkeys(normalize_hostname(build(tree, digits)) for digits in (False, True)))
    except (_NoSample, re.error, RecursionError, TypeError, ValueError):
        return []
UNIX_PREFIX = "unix:"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL


def _parse_unix(text: str) -> str:
    path = text[len(UNIX_PREFIX):]
    if not path.startswith("/"):
        raise ValueError(f"a unix socket path must be absolute, like 'unix:/run/app.sock', got {text!r}")
    if "\x00" in path:
        raise ValueError(f"a unix socket path may not contain NUL, got {text!r}")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(f"unix socket path is {len(os.fsencode(path))} bytes; the kernel takes at "
                         f"most {_SUN_PATH_MAX}")
    return path


def parse_backend_address(text: str) -> BackendAddress:
    """Parse a fixed backend: "host:port", "[v6]:port" or "unix:/path". Raises ValueError."""
    if isinstance(text, str) and text.startswith(UNIX_PREFIX):
        return UnixAddress(_parse_unix(text))
    return parse_address(text)


def parse_backend(text: str, match: MatchSpec) -> BackendSpec:
    """Parse a route `backend` string for a route whose match is `match`. Raises ValueError.

    "*:port" (connect to the SNI name) is allowed with every match kind except an exact name,
    where the name is known and should be written out. "$N" templates need a regex match.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    if text.startswith(UNIX_PREFIX):
        return BackendSpec(BackendKind.UNIX, 0, path=_parse_unix(text))
    if text.startswith("*"):
        host, sep, port = text.partition(":")
        if host != "*" or not sep:
            raise ValueError(f"dynamic backend must be '*:port', got {text!r}")
        if match.kind is MatchKind.EXACT:
            raise ValueError(
                f"'*:port' is not allowed with an exact match; write '{match.value}:{port}'"
            )
        return BackendSpec(BackendKind.SNI, _parse_port(port))
    if "$" in text:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"missing port in {text!r} (expected host:port)")
        template = _parse_template(host, match)
        return BackendSpec(BackendKind.TEMPLATE, _parse_port(port), template=template)
    address = parse_address(text)
    return BackendSpec(BackendKind.STATIC, address.port, host=address.host)


# --------------------------------------------------------------------------------------------------
# TOML -> Config

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    if _BARE_KEY_RE.fullmatch(key) is None:
        key = json.dumps(key)
    return f"{path}.{key}" if path else key


_MISSING: Any = object()


class _Section:
    """One TOML table being read: typed getters that know their key path, and unknown-key checks."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a table, got {_type_name(data)}")
        self.data: dict[str, Any] = data
        self.path = path

    def key(self, key: str) -> str:
        return _join(self.path, key)

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                raise ConfigError(
                    self.key(key), f"unknown key (expected one of: {', '.join(allowed)})"
                )

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ConfigError(self.key(key), "required key is missing")
        return default

    def string(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(self.key(key), f"expected a string, got {_type_name(value)}")
        if choices and value not in choices:
            raise ConfigError(self.key(key), f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(key), f"expected true or false, got {_type_name(value)}")
        return value

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(key), f"expected an integer, got {_type_name(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(self.key(key), f"must be {bound}, got {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool) -> float:
        """A finite float (integers accepted); > 0 when `positive`, else >= 0."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.key(key), f"expected a number, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(self.key(key), f"must be a finite number, got {value}")
        if positive and value <= 0:
            raise ConfigError(self.key(key), f"must be > 0, got {value:g}")
        if not positive and value < 0:
            raise ConfigError(self.key(key), f"must be >= 0, got {value:g}")
        return value

    def array(self, key: str, default: Any = _MISSING) -> list[Any]:
        value = self.get(key, default)
        if not isinstance(value, list):
            raise ConfigError(self.key(key), f"expected an array, got {_type_name(value)}")
        return value


def _address(value: object, key_path: str, *, default_port: int | None = None) -> Address:
    if not isinstance(value, str):
        raise ConfigError(key_path, f"expected a string address, got {_type_name(value)}")
    try:
        return parse_address(value, default_port=default_port)
    except ValueError as e:
        raise ConfigError(key_path, str(e)) from None


_TOP_KEYS = ("listener", "table", "resolver", "limits", "log", "server", "backends", "ebpf", "xdp", "metrics")
_LISTENER_KEYS = ("bind", "protocol", "table", "accept_proxy_protocol", "trusted")
_TABLE_KEYS = ("routes", "fallback", "allow_private_backends")
_ROUTE_KEYS = ("match", "backend", "alpn", "proxy_protocol")
_BACKENDS_KEYS = ("hold_down", "health_check_interval", "health_check_timeout")
_ALPN_MAX = 255  # a protocol name's length is one byte (RFC 7301)
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
_RESOLVER_KEYS = (
    "nameservers", "timeout", "tries", "min_ttl", "max_ttl", "negative_ttl", "cache_size", "mode",
    "kernel_cache",
)  # fmt: skip
_LIMITS_KEYS = (
    "client_hello_timeout", "connect_timeout", "idle_timeout", "max_connections",
    "max_connections_per_ip", "max_client_hello_size", "shutdown_grace", "http_head_timeout",
    "max_http_head_size",
)  # fmt: skip
_LOG_KEYS = ("format", "level", "access_log")
_SERVER_KEYS = ("workers", "user")
# One splice_events ring per worker in ebpf/splice.c (SNIPROXY_MAX_WORKERS): kept in step by a test.
MAX_WORKERS = 16
_EBPF_KEYS = ("splice", "pin_dir", "splice_after", "queue_limit", "shortcut_cgroup")
_XDP_KEYS = ("enabled", "interfaces", "mode", "allow")
_METRICS_KEYS = ("bind",)
XDP_MODES = ("auto", "native", "generic")
XDP_MAX_ALLOW = 16384  # ebpf/xdp_filter.h XDP_MAX_ALLOW
_IFNAME_RE = re.compile(r"[^\s/:]{1,15}", re.ASCII)  # Linux IFNAMSIZ - 1, no '/', ':' or spaces


def _alpn(section: _Section) -> tuple[str, ...]:
    """`alpn`: one protocol name or a non-empty list of them, as a client sends them (RFC 7301)."""
    value = section.get("alpn", ())
    key = section.key("alpn")
    if isinstance(value, str):
        items, paths = [value], [key]
    elif isinstance(value, list):
        if not value:
            raise ConfigError(key, "empty list: a route with no acceptable protocol would match no "
                              "client; leave alpn out to match any")
        items, paths = value, [f"{key}[{i}]" for i in range(len(value))]
    else:
        raise ConfigError(key, f"expected a string or an array of strings, got {_type_name(value)}")
    names: list[str] = []
    for item, item_path in zip(items, paths, strict=True):
        if not isinstance(item, str):
            raise ConfigError(item_path, f"expected a string, got {_type_name(item)}")
        if not 1 <= len(item) <= _ALPN_MAX or not all("\x21" <= c <= "\x7e" for c in item):
            raise ConfigError(item_path, f"an ALPN protocol name is 1..{_ALPN_MAX} visible ASCII "
                              f"characters (like 'h2', 'http/1.1', 'acme-tls/1'), got {item!r}")
        if item in names:
            raise ConfigError(item_path, f"duplicate of {paths[names.index(item)]}")
        names.append(item)
    return tuple(names)


def _backends(section: _Section, key: str, match: MatchSpec) -> str | tuple[str, ...]:
    """`backend`: one backend string, or a non-empty list of fixed ones (host:port, unix:/path)."""
    value = section.get(key)
    path = section.key(key)
    if isinstance(value, str):
        try:
            parse_backend(value, match)
        except ValueError as e:
            raise ConfigError(path, str(e)) from None
        return value
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a string or an array of strings, got {_type_name(value)}")
    if not value:
        raise ConfigError(path, "empty list: name at least one backend")
    seen: dict[BackendAddress, int] = {}
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(item_path, f"expected a string, got {_type_name(item)}")
        try:
            spec = parse_backend(item, match)
        except ValueError as e:
            raise ConfigError(item_path, str(e)) from None
        if spec.kind not in (BackendKind.STATIC, BackendKind.UNIX):
            raise ConfigError(item_path, "a list holds only fixed backends ('host:port', "
                              f"'unix:/path'); {item!r} takes its host from the client")
        address = spec.address()
        if address in seen:
            raise ConfigError(item_path, f"duplicate of {path}[{seen[address]}] ({address})")
        seen[address] = i
    return tuple(value)


def _route(data: object, path: str) -> tuple[RouteConfig, MatchSpec]:
    section = _Section(data, path)
    section.check_keys(_ROUTE_KEYS)
    match_text = section.string("match")
    section.get("backend")  # "required key is missing" comes before any other complaint
    proxy_protocol = None
    if "proxy_protocol" in section.data:
        proxy_protocol = section.string("proxy_protocol", choices=PROXY_PROTOCOL_VERSIONS)
    try:
        match = parse_match(match_text)
    except ValueError as e:
        raise ConfigError(section.key("match"), str(e)) from None
    backend = _backends(section, "backend", match)
    alpn = _alpn(section) if "alpn" in section.data else ()
    return RouteConfig(match_text, backend, proxy_protocol, alpn), match


def _shadowed_by(earlier: tuple[str, ...], later: tuple[str, ...]) -> bool:
    """Does a route with ALPN set `earlier` (empty: any) take every client a later route with the
    same match and ALPN set `later` would get?"""
    return not earlier or (bool(later) and set(later) <= set(earlier))


def _fallback(value: object, path: str) -> BackendAddress | tuple[BackendAddress, ...]:
    if isinstance(value, list):
        if not value:
            raise ConfigError(path, "empty list: name at least one backend, or leave fallback out")
        out: list[BackendAddress] = []
        for i, item in enumerate(value):
            address = _backend_address(item, f"{path}[{i}]")
            if address in out:
                raise ConfigError(f"{path}[{i}]", f"duplicate of {path}[{out.index(address)}] ({address})")
            out.append(address)
        return tuple(out)
    return _backend_address(value, path)


def _backend_address(value: object, key_path: str) -> BackendAddress:
    if not isinstance(value, str):
        raise ConfigError(key_path, f"expected a string address, got {_type_name(value)}")
    try:
        return parse_backend_address(value)
    except ValueError as e:
        raise ConfigError(key_path, str(e)) from None


def _table(name: str, data: object, path: str) -> TableConfig:
    if _TABLE_NAME_RE.fullmatch(name) is None:
        raise ConfigError(path, "table names may only use letters, digits, '_' and '-'")
    section = _Section(data, path)
    section.check_keys(_TABLE_KEYS)
    routes: list[RouteConfig] = []
    # Earlier routes per match: (index, alpn). A later one with the same match is unreachable when an
    # earlier one accepts every client it would (no alpn, or a superset of its protocols).
    seen: dict[tuple[MatchKind, str], list[tuple[int, tuple[str, ...]]]] = {}
    catch_all: int | None = None
    for i, item in enumerate(section.array("routes", [])):
        route_path = f"{section.key('routes')}[{i}]"
        route, match = _route(item, route_path)
        if catch_all is not None:
            raise ConfigError(
                f"{route_path}.match",
                f"unreachable: routes[{catch_all}] is '*' and matches every name first",
            )
        key = (match.kind, match.value)
        for j, alpn in seen.get(key, []):
            if set(alpn) == set(route.alpn):
                raise ConfigError(f"{route_path}.match", f"duplicate of routes[{j}]")
            if _shadowed_by(alpn, route.alpn):
                why = "any ALPN" if not alpn else f"ALPN {list(alpn)}"
                raise ConfigError(f"{route_path}.match", f"unreachable: routes[{j}] has the same match "
                                  f"and accepts {why} first")
        seen.setdefault(key, []).append((i, route.alpn))
        if match.kind is MatchKind.CATCH_ALL and not route.alpn:
            catch_all = i
        routes.append(route)
    fallback = None
    if "fallback" in section.data:
        fallback = _fallback(section.data["fallback"], section.key("fallback"))
    private: tuple[str, ...] = ()
    value = section.get("allow_private_backends", False)
    if value is True:
        private = ("0.0.0.0/0", "::/0")
    elif isinstance(value, list):
        private = _networks(value, section.key("allow_private_backends"))
    elif value is not False:
        raise ConfigError(section.key("allow_private_backends"),
                          f"expected true, false or a list of CIDRs, got {_type_name(value)}")
    return TableConfig(name=name, routes=tuple(routes), fallback=fallback,
                       allow_private_backends=private)


def _networks(values: list[object], key_path: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(values):
        if not isinstance(item, str):
            raise ConfigError(f"{key_path}[{i}]", f"expected a CIDR string, got {_type_name(item)}")
        try:
            # strict: "10.0.0.1/8" is refused like in xdp.allow, not silently widened to 10.0.0.0/8.
            out.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as e:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(item.strip(), strict=False)}?"
            raise ConfigError(f"{key_path}[{i}]", f"not a CIDR: {e}{hint}") from None
    return tuple(out)


def _listener(data: object, path: str, tables: Mapping[str, TableConfig]) -> ListenerConfig:
    section = _Section(data, path)
    section.check_keys(_LISTENER_KEYS)
    bind = _address(section.string("bind"), section.key("bind"))
    if _ip_literal(bind.host) is None:
        raise ConfigError(section.key("bind"), f"must be an IP address, got host {bind.host!r}")
    protocol = section.string("protocol", "tls", choices=PROTOCOLS)
    table = section.string("table", "default")
    if table not in tables:
        known = ", ".join(tables) or "none defined"
        raise ConfigError(section.key("table"), f"no table named {table!r} (tables: {known})")
    accept_proxy = section.boolean("accept_proxy_protocol", False)
    trusted = _networks(section.array("trusted", []), section.key("trusted"))
    if accept_proxy and not trusted:
        raise ConfigError(section.key("trusted"),
                          "accept_proxy_protocol = true needs the load balancers' CIDRs here; "
                          "anyone else could forge client addresses")
    if trusted and not accept_proxy:
        raise ConfigError(section.key("trusted"), "only meaningful with accept_proxy_protocol = true")
    return ListenerConfig(bind=bind, protocol=protocol, table=table,
                          accept_proxy_protocol=accept_proxy, trusted=trusted)


def _resolver(data: object) -> ResolverConfig:
    s = _Section(data, "resolver")
    s.check_keys(_RESOLVER_KEYS)
    nameservers = []
    for i, item in enumerate(s.array("nameservers", [])):
        key_path = f"resolver.nameservers[{i}]"
        address = _address(item, key_path, default_port=53)
        if _ip_literal(address.host) is None:
            raise ConfigError(key_path, f"must be an IP address, got host {address.host!r}")
        nameservers.append(address)
    min_ttl = s.number("min_ttl", 1.0, positive=False)
    max_ttl = s.number("max_ttl", 3600.0, positive=True)
    if min_ttl > max_ttl:
        raise ConfigError("resolver.max_ttl", f"must be >= min_ttl ({min_ttl:g}), got {max_ttl:g}")
    return ResolverConfig(
        nameservers=tuple(nameservers),
        timeout=s.number("timeout", 2.0, positive=True),
        tries=s.integer("tries", 2, minimum=1),
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        negative_ttl=s.number("negative_ttl", 5.0, positive=False),
        cache_size=s.integer("cache_size", 10000, minimum=1),
        mode=s.string("mode", "ipv4_first", choices=RESOLVER_MODES),
        kernel_cache=s.boolean("kernel_cache", True),
    )


def _limits(data: object) -> LimitsConfig:
    s = _Section(data, "limits")
    s.check_keys(_LIMITS_KEYS)
    return LimitsConfig(
        client_hello_timeout=s.number("client_hello_timeout", 5.0, positive=True),
        connect_timeout=s.number("connect_timeout", 5.0, positive=True),
        idle_timeout=s.number("idle_timeout", 300.0, positive=True),
        max_connections=s.integer("max_connections", 10000, minimum=1),
        max_connections_per_ip=s.integer("max_connections_per_ip", 0, minimum=0),
        max_client_hello_size=s.integer(
            "max_client_hello_size", 16384, MIN_CLIENT_HELLO_SIZE, MAX_CLIENT_HELLO_SIZE
        ),
        shutdown_grace=s.number("shutdown_grace", 30.0, positive=False),
        http_head_timeout=s.number("http_head_timeout", 5.0, positive=True),
        max_http_head_size=s.integer(
            "max_http_head_size", 16384, MIN_HTTP_HEAD_SIZE, MAX_HTTP_HEAD_SIZE
        ),
    )


def _log(data: object) -> LogConfig:
    s = _Section(data, "log")
    s.check_keys(_LOG_KEYS)
    return LogConfig(
        format=s.string("format", "json", choices=LOG_FORMATS),
        level=s.string("level", "info", choices=LOG_LEVELS),
        access_log=s.boolean("access_log", True),
    )


def _server(data: object) -> ServerConfig:
    s = _Section(data, "server")
    s.check_keys(_SERVER_KEYS)
    user = s.string("user", "sniproxy")
    # A name for getpwnam(): whether it exists is checked where the proxy runs (`sniproxy run`).
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", user):
        raise ConfigError("server.user", f"expected a user name, got {user!r}")
    workers = s.get("workers", 1)
    if workers == "auto":
        return ServerConfig(workers="auto", user=user)
    if isinstance(workers, str):
        raise ConfigError("server.workers", f'expected an integer or "auto", got {workers!r}')
    return ServerConfig(workers=s.integer("workers", 1, minimum=1, maximum=MAX_WORKERS), user=user)


def _backends_section(data: object) -> BackendsConfig:
    s = _Section(data, "backends")
    s.check_keys(_BACKENDS_KEYS)
    interval = s.number("health_check_interval", 0.0, positive=False)
    timeout = s.number("health_check_timeout", 2.0, positive=True)
    if interval and timeout > interval:
        raise ConfigError("backends.health_check_timeout", f"must be <= health_check_interval "
                          f"({interval:g}), got {timeout:g}: checks would overlap")
    return BackendsConfig(hold_down=s.number("hold_down", 10.0, positive=False),
                          health_check_interval=interval, health_check_timeout=timeout)


def _ebpf(data: object) -> EbpfConfig:
    s = _Section(data, "ebpf")
    s.check_keys(_EBPF_KEYS)
    pin_dir = s.string("pin_dir", "/sys/fs/bpf/sniproxy")
    if not pin_dir.startswith("/"):
        raise ConfigError("ebpf.pin_dir", f"must be an absolute path, got {pin_dir!r}")
    shortcut_cgroup = s.string("shortcut_cgroup", "") or None
    if shortcut_cgroup is not None and not shortcut_cgroup.startswith("/"):
        raise ConfigError("ebpf.shortcut_cgroup", f"must be an absolute path, got {shortcut_cgroup!r}")
    return EbpfConfig(splice=s.boolean("splice", True), pin_dir=pin_dir,
                      splice_after=s.integer("splice_after", 1 << 20, minimum=0, maximum=1 << 40),
                      queue_limit=s.integer("queue_limit", 24 << 20, minimum=64 << 10, maximum=1 << 40),
                      shortcut_cgroup=shortcut_cgroup)


def _xdp(data: object) -> XdpConfig:
    s = _Section(data, "xdp")
    s.check_keys(_XDP_KEYS)
    enabled = s.boolean("enabled", False)
    interfaces: list[str] = []
    for i, name in enumerate(s.array("interfaces", [])):
        key_path = f"xdp.interfaces[{i}]"
        if not isinstance(name, str):
            raise ConfigError(key_path, f"expected an interface name, got {_type_name(name)}")
        if _IFNAME_RE.fullmatch(name) is None or name in (".", ".."):
            raise ConfigError(key_path, f"{name!r} is not a valid interface name")
        if name in interfaces:
            raise ConfigError(key_path, f"duplicate of xdp.interfaces[{interfaces.index(name)}]")
        interfaces.append(name)
    allow: list[str] = []
    for i, item in enumerate(s.array("allow", [])):
        key_path = f"xdp.allow[{i}]"
        if not isinstance(item, str):
            raise ConfigError(key_path, f"expected a CIDR string, got {_type_name(item)}")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as e:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(item.strip(), strict=False)}?"
            raise ConfigError(key_path, f"not a CIDR: {e}{hint}") from None
        if str(net) in allow:
            raise ConfigError(key_path, f"duplicate of xdp.allow[{allow.index(str(net))}] ({net})")
        allow.append(str(net))
    if len(allow) > XDP_MAX_ALLOW:
        raise ConfigError("xdp.allow", f"at most {XDP_MAX_ALLOW} entries, got {len(allow)}")
    if enabled and not allow:
        raise ConfigError("xdp.allow", "empty, but enabled = true: every client of the listening "
                          "ports would be dropped; list the CIDRs to let in, or set enabled = false")
    if enabled and not interfaces:
        raise ConfigError("xdp.interfaces", "empty, but enabled = true: name the interfaces to "
                          "filter (e.g. [\"eth0\"])")
    return XdpConfig(enabled=enabled, interfaces=tuple(interfaces),
                     mode=s.string("mode", "auto", choices=XDP_MODES), allow=tuple(allow))


def _metrics(data: object, binds: Mapping[Address, int]) -> MetricsConfig:
    s = _Section(data, "metrics")
    s.check_keys(_METRICS_KEYS)
    if "bind" not in s.data:
        return MetricsConfig()
    bind = _address(s.string("bind"), "metrics.bind")
    if _ip_literal(bind.host) is None:
        raise ConfigError("metrics.bind", f"must be an IP address, got host {bind.host!r}")
    if bind in binds:
        raise ConfigError("metrics.bind", f"{bind} is already bound by listener[{binds[bind]}]")
    return MetricsConfig(bind=bind)


def _build(doc: dict[str, Any], source: str) -> Config:
    top = _Section(doc, "")
    top.check_keys(_TOP_KEYS)

    tables_section = _Section(top.get("table", {}), "table")
    tables: dict[str, TableConfig] = {}
    for name, data in tables_section.data.items():
        tables[name] = _table(name, data, tables_section.key(name))

    raw_listeners = top.get("listener", [])
    if not isinstance(raw_listeners, list):
        got = _type_name(raw_listeners)
        raise ConfigError("listener", f"expected an array of tables ([[listener]]), got {got}")
    if not raw_listeners:
        raise ConfigError("listener", "at least one [[listener]] is required")
    listeners: list[ListenerConfig] = []
    binds: dict[Address, int] = {}
    for i, item in enumerate(raw_listeners):
        listener = _listener(item, f"listener[{i}]", tables)
        if listener.bind in binds:
            first = binds[listener.bind]
            reason = f"{listener.bind} is already bound by listener[{first}]"
            raise ConfigError(f"listener[{i}].bind", reason)
        binds[listener.bind] = i
        listeners.append(listener)

    return Config(
        listeners=tuple(listeners),
        tables=types.MappingProxyType(tables),
        resolver=_resolver(top.get("resolver", {})),
        limits=_limits(top.get("limits", {})),
        log=_log(top.get("log", {})),
        server=_server(top.get("server", {})),
        backends=_backends_section(top.get("backends", {})),
        ebpf=_ebpf(top.get("ebpf", {})),
        xdp=_xdp(top.get("xdp", {})),
        metrics=_metrics(top.get("metrics", {}), binds),
        source=source,
    )


_TOML_POSITION_RE = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)$")


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text. Raises ConfigError.

    When `source` is not "<string>", errors carry it and their message is prefixed with it.
    """
    error_source = None if source == "<string>" else source
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = _TOML_POSITION_RE.search(message)
        key_path = ""
        if m is not None:
            message = message[: m.start()]
            key_path = m.group(1)
            if not key_path.startswith("line"):
                # "end of document" (e.g. an unclosed array): the position of the file's last byte.
                lines = text.split("\n")
                key_path = f"line {len(lines)}, column {len(lines[-1]) + 1} (end of file)"
        raise ConfigError(key_path, f"invalid TOML: {message}", source=error_source) from None
    try:
        return _build(doc, source)
    except ConfigError as e:
        e.source = error_source
        raise


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file. Every failure, including I/O, is a ConfigError."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = f"cannot read config file: {e.strerror or e}"
        raise ConfigError("", reason, source=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not valid UTF-8 (byte {e.start})", source=source) from None
    return parse_config(text, source)
