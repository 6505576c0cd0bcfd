# Owns route selection: a TableConfig compiled into a RouteTable that maps an SNI name to a Route.
# Invariant: pure and total: route() never raises, the first matching rule in config order wins,
# and a dynamic Route's host is always a valid hostname or an IP literal built by a `$N` template (as
# nginx's map + proxy_pass would; never an SNI that is an IP literal), checked like any resolved one.
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sniproxy.backend_guard import BackendGuard, IPAddress, Refusal

from sniproxy.config import (
    BackendKind,
    BackendSpec,
    MatchKind,
    MatchSpec,
    TableConfig,
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
    host: str  # backend host (IP literal or hostname), SNI/captures substituted, lower-cased
    port: int
    rule: str  # the `match` string that selected it, or "fallback"
    dynamic: bool  # host came from the client's SNI ("*:port" or "$N" captures)
    proxy_protocol: str | None = None  # "v1" | "v2": PROXY header to send the backend first


@dataclass(frozen=True)
class _Rule:
    index: int  # position in the table: lower wins
    pattern: str  # the raw `match` string, reported as Route.rule
    match: MatchSpec
    backend: BackendSpec
    proxy_protocol: str | None = None

    def target(self, name: str, captures: tuple[str | None, ...] = ()) -> Route | str:
        """The Route for `name` (already matched), or why this rule cannot route it."""
        backend = self.backend
        if backend.kind is BackendKind.STATIC:
            return Route(backend.host, backend.port, self.pattern, False, self.proxy_protocol)
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


class RouteTable:
    """Compiled routes of one table. Exact names and wildcard suffixes are dict lookups; regex and
    catch-all rules are scanned in order, but only those that come before the best lookup hit."""

    def __init__(self, name: str, rules: tuple[_Rule, ...], fallback: Route | None,
                 allow_private: tuple[str, ...] = ()) -> None:
        self.name = name
        self._guard = BackendGuard(allow_private)
        self._rules = rules
        self._fallback = fallback
        self._exact: dict[str, _Rule] = {}
        self._wildcard: dict[str, _Rule] = {}  # suffix ("example.test") -> first rule
        self._scanned: list[_Rule] = []  # regex and catch-all rules, in order
        for rule in rules:
            kind = rule.match.kind
            if kind is MatchKind.EXACT:
                self._exact.setdefault(rule.match.value, rule)
            elif kind is MatchKind.WILDCARD:
                self._wildcard.setdefault(rule.match.value, rule)
            else:
                self._scanned.append(rule)

    @classmethod
    def from_config(cls, table: TableConfig) -> RouteTable:
        """Compile a TableConfig. Raises ValueError if it holds a route that config would refuse."""
        rules = []
        for index, route in enumerate(table.routes):
            match = parse_match(route.match)
            rules.append(_Rule(index, route.match, match, parse_backend(route.backend, match),
                               route.proxy_protocol))
        fallback = None
        if table.fallback is not None:
            fallback = Route(
                table.fallback.host.lower(), table.fallback.port, FALLBACK_RULE, dynamic=False
            )
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

    def route(self, sni: str | None) -> Route | None:
        """The Route for a client's SNI (None: the client sent none), or None: refuse the client.

        Names compare case-insensitively, ignoring one trailing dot. A name that is not a valid
        hostname (including IP literals) matches no rule, exactly like a missing SNI.
        """
        return self.lookup(sni)[0]

    def lookup(self, sni: str | None) -> tuple[Route | None, tuple[str, ...]]:
        """route(), and why each rule that matched the name but could not build a backend from it
        was passed over (so a connection that lands on a later rule or the fallback says why)."""
        if not isinstance(sni, str):
            return self._fallback, ()
        name = normalize_hostname(sni)
        if not is_hostname(name):
            return self._fallback, ()
        skipped: list[str] = []
        route = self._match(name, skipped)
        return (route if route is not None else self._fallback), tuple(skipped)

    def _match(self, name: str, skipped: list[str]) -> Route | None:
        best = self._exact.get(name)
        dot = name.find(".")
        while dot >= 0:
            rule = self._wildcard.get(name[dot + 1 :])
            if rule is not None and (best is None or rule.index < best.index):
                best = rule
            dot = name.find(".", dot + 1)
        limit = best.index if best is not None else len(self._rules)
        for rule in self._scanned:
            if rule.index >= limit:
                break
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
