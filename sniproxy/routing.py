# Owns route selection: a TableConfig compiled into a RouteTable that maps an SNI name (and the
# client's ALPN protocols) to a Route. Invariant: pure and total: route() never raises, the first rule
# in config order whose name and ALPN both match wins, and a dynamic Route's host is always a valid
# hostname or an IP literal built by a `$N` template (as nginx's map + proxy_pass would; never an SNI
# that is an IP literal), checked like any resolved one. Which of a Route's backends serves a
# connection is sniproxy.balancer's business, not this module's.
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sniproxy.backend_guard import BackendGuard, IPAddress, Refusal

from sniproxy.config import (
    Address,
    BackendAddress,
    BackendKind,
    BackendSpec,
    MatchKind,
    MatchSpec,
    TableConfig,
    UnixAddress,
    backend_host,
    is_hostname,
    normalize_hostname,
    parse_backend,
    parse_match,
    template_host,
)

__all__ = ["Route", "RouteTable"]

FALLBACK_RULE = "fallback"


@dataclass(frozen=True)
class Route:
    host: str  # first backend's host (IP literal or hostname), SNI/captures substituted; "" for unix
    port: int  # first backend's port; 0 for unix
    rule: str  # the `match` string that selected it, or "fallback"
    dynamic: bool  # host came from the client's SNI ("*:port" or "$N" captures)
    proxy_protocol: str | None = None  # "v1" | "v2": PROXY header to send the backend first
    # Every backend, in config order (one unless the config listed several); (host:port) when omitted.
    backends: tuple[BackendAddress, ...] = ()

    def __post_init__(self) -> None:
        if not self.backends:
            object.__setattr__(self, "backends", (Address(self.host, self.port),))


def _fixed_route(addresses: tuple[BackendAddress, ...], rule: str, proxy_protocol: str | None) -> Route:
    first = addresses[0]
    host, port = (first.host, first.port) if isinstance(first, Address) else ("", 0)
    return Route(host, port, rule, False, proxy_protocol, addresses)


@dataclass(frozen=True)
class _Rule:
    index: int  # position in the table: lower wins
    pattern: str  # the raw `match` string, reported as Route.rule
    match: MatchSpec
    backend: BackendSpec  # the first (for a list, every one is STATIC or UNIX)
    proxy_protocol: str | None = None
    alpn: frozenset[str] = frozenset()  # empty: any client
    fixed: Route | None = None  # the Route of a rule whose backends never depend on the name

    def accepts(self, alpn: Sequence[str]) -> bool:
        return not self.alpn or any(p in self.alpn for p in alpn)

    def target(self, name: str, captures: tuple[str | None, ...] = ()) -> Route | str:
        """The Route for `name` (already matched), or why this rule cannot route it."""
        if self.fixed is not None:
            return self.fixed
        backend = self.backend
        if backend.kind is BackendKind.SNI:
            return Route(name, backend.port, self.pattern, True, self.proxy_protocol)
        built = template_host(backend.template, captures)
        if built is None:
            return f"rule {self.pattern!r}: a group its backend uses captured nothing from {name!r}"
        host = backend_host(built)
        if host is None:
            return (f"rule {self.pattern!r}: {name!r} builds backend host {built!r}, neither a "
                    f"hostname nor an IP address")
        return Route(host, backend.port, self.pattern, True, self.proxy_protocol)


_LOOKUP_CACHE_SIZE = 4096


class RouteTable:
    """Compiled routes of one table. Exact names and wildcard suffixes are dict lookups; regex and
    catch-all rules are scanned in order, but only those that come before the best lookup hit."""

    def __init__(self, name: str, rules: tuple[_Rule, ...], fallback: Route | None,
                 allow_private: tuple[str, ...] = ()) -> None:
        self.name = name
        self._guard = BackendGuard(allow_private)
        self._rules = rules
        self._fallback = fallback
        # name / suffix ("example.test") -> its rules in order (several only when they differ in ALPN)
        self._exact: dict[str, list[_Rule]] = {}
        self._wildcard: dict[str, list[_Rule]] = {}
        self._scanned: list[_Rule] = []  # regex and catch-all rules, in order
        # lookup()'s answers by (sni, alpn): a pure function of the table, and most connections ask
        # about a handful of names (~170 bytecodes per connection saved). Bounded: emptied when
        # full, so names a client makes up cost memory only up to _LOOKUP_CACHE_SIZE entries.
        self._looked_up: dict[tuple[object, tuple[str, ...]], tuple[Route | None, tuple[str, ...]]] = {}
        for rule in rules:
            kind = rule.match.kind
            if kind is MatchKind.EXACT:
                self._exact.setdefault(rule.match.value, []).append(rule)
            elif kind is MatchKind.WILDCARD:
                self._wildcard.setdefault(rule.match.value, []).append(rule)
            else:
                self._scanned.append(rule)

    @classmethod
    def from_config(cls, table: TableConfig) -> RouteTable:
        """Compile a TableConfig. Raises ValueError if it holds a route that config would refuse."""
        rules = []
        for index, route in enumerate(table.routes):
            match = parse_match(route.match)
            texts = (route.backend,) if isinstance(route.backend, str) else route.backend
            specs = [parse_backend(text, match) for text in texts]
            fixed = None
            if all(s.kind in (BackendKind.STATIC, BackendKind.UNIX) for s in specs):
                fixed = _fixed_route(tuple(s.address() for s in specs), route.match, route.proxy_protocol)
            elif len(specs) > 1:
                raise ValueError(f"routes[{index}]: a list of backends may hold only fixed ones")
            rules.append(_Rule(index, route.match, match, specs[0], route.proxy_protocol,
                               frozenset(route.alpn), fixed))
        fallback = None
        if table.fallback is not None:
            listed = table.fallback if isinstance(table.fallback, tuple) else (table.fallback,)
            fallback = _fixed_route(tuple(_lower(a) for a in listed), FALLBACK_RULE, None)
        return cls(table.name, tuple(rules), fallback, table.allow_private_backends)

    @property
    def fallback(self) -> Route | None:
        return self._fallback

    def backend_refusal(self, route: Route, address: str,
                        is_local: Callable[[IPAddress], bool] | None = None) -> Refusal | None:
        """Why `route` may not connect to the resolved IP `address`, or None. Static routes always
        may: the operator wrote the backend. Dynamic ones (host chosen by the client) may not reach
        special-purpose ranges nor this host itself (`is_local`), unless the table allows a network
        explicitly: otherwise the proxy is an open relay into the host's own networks, or a loop."""
        if not route.dynamic:
            return None
        return self._guard.refusal(address, is_local)

    def backend_allowed(self, route: Route, address: str,
                        is_local: Callable[[IPAddress], bool] | None = None) -> bool:
        return self.backend_refusal(route, address, is_local) is None

    def __len__(self) -> int:
        return len(self._rules)

    def route(self, sni: str | None, alpn: Sequence[str] = ()) -> Route | None:
        """The Route for a client's SNI (None: the client sent none) and ALPN protocols (in the
        client's order; empty: it offered none), or None: refuse the client.

        Names compare case-insensitively, ignoring one trailing dot. A name that is not a valid
        hostname (including IP literals) matches no rule, exactly like a missing SNI. A rule with
        `alpn` matches only a client that offers at least one of its protocols (exact, case-sensitive
        comparison, as RFC 7301 says).
        """
        return self.lookup(sni, alpn)[0]

    def lookup(self, sni: str | None, alpn: Sequence[str] = ()) -> tuple[Route | None, tuple[str, ...]]:
        """route(), and why each rule that matched the name but could not build a backend from it
        was passed over (so a connection that lands on a later rule or the fallback says why)."""
        key = (sni, alpn if type(alpn) is tuple else tuple(alpn))
        found = self._looked_up.get(key)
        if found is None:
            found = self._lookup(sni, key[1])
            if len(self._looked_up) >= _LOOKUP_CACHE_SIZE:
                self._looked_up.clear()
            self._looked_up[key] = found
        return found

    def _lookup(self, sni: str | None, alpn: Sequence[str]) -> tuple[Route | None, tuple[str, ...]]:
        if not isinstance(sni, str):
            return self._fallback, ()
        name = normalize_hostname(sni)
        if not is_hostname(name):
            return self._fallback, ()
        skipped: list[str] = []
        route = self._match(name, alpn, skipped)
        return (route if route is not None else self._fallback), tuple(skipped)

    def _match(self, name: str, alpn: Sequence[str], skipped: list[str]) -> Route | None:
        best = _first(self._exact.get(name), alpn)
        dot = name.find(".")
        while dot >= 0:
            rule = _first(self._wildcard.get(name[dot + 1 :]), alpn)
            if rule is not None and (best is None or rule.index < best.index):
                best = rule
            dot = name.find(".", dot + 1)
        limit = best.index if best is not None else len(self._rules)
        for rule in self._scanned:
            if rule.index >= limit:
                break
            if not rule.accepts(alpn):
                continue
            if rule.match.kind is MatchKind.CATCH_ALL:
                target = rule.target(name)
            else:
                assert rule.match.regex is not None
                m = rule.match.regex.fullmatch(name)
                if m is None:
                    continue
                target = rule.target(name, m.groups())
            if isinstance(target, Route):
                return target
            skipped.append(target)
        if best is None:
            return None
        target = best.target(name)
        assert isinstance(target, Route)  # exact and wildcard rules never use captures
        return target


def _first(rules: list[_Rule] | None, alpn: Sequence[str]) -> _Rule | None:
    if rules is None:
        return None
    for rule in rules:
        if rule.accepts(alpn):
            return rule
    return None


def _lower(address: BackendAddress) -> BackendAddress:
    return address if isinstance(address, UnixAddress) else Address(address.host.lower(), address.port)
