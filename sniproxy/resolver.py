# Backend name resolution: literal IPs pass through, names go through the cache and then aiodns (A and
# AAAA). Owns TTL clamping, negative answers, single-flight of concurrent lookups and address order.
# Invariant: resolve() returns a non-empty list of IP literals or raises ResolveError; never anything else.
from __future__ import annotations

import asyncio
import ipaddress
import time

import aiodns
import aiodns.error
import pycares
import structlog

from sniproxy.config import ResolverConfig
from sniproxy.dnscache import CachedAnswer, DnsCache, MemoryDnsCache

log = structlog.get_logger("sniproxy.resolver")


class ResolveError(Exception):
    """A name could not be turned into addresses; `reason` is a short word for the access log."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _nameserver_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Resolver:
    def __init__(self, config: ResolverConfig, cache: DnsCache | None = None) -> None:
        self._config = config
        self._cache = cache if cache is not None else MemoryDnsCache(config.cache_size)
        self._inflight: dict[str, asyncio.Future[list[str]]] = {}
        servers = [_nameserver_text(a.host, a.port) for a in config.nameservers]
        # tries per nameserver; c-ares moves to the next server when one times out.
        self._dns = aiodns.DNSResolver(
            nameservers=servers or None, timeout=config.timeout, tries=config.tries
        )
        self.queries_sent = 0

    @property
    def cache(self) -> DnsCache:
        return self._cache

    async def resolve(self, host: str) -> list[str]:
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        name = host.lower().rstrip(".")
        cached = self._cache.get(name)
        if cached is not None:
            if not cached.addresses:
                raise ResolveError(name, "nxdomain (cached)")
            return list(cached.addresses)
        # Single-flight: concurrent lookups of one name share one query, owned by the resolver so a
        # cancelled caller does not cancel it for the others.
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name))
            self._inflight[name] = task
            task.add_done_callback(lambda t: self._query_done(name, t))
        return list(await asyncio.shield(task))

    def _query_done(self, name: str, task: asyncio.Task[list[str]]) -> None:
        self._inflight.pop(name, None)
        if not task.cancelled():
            task.exception()  # marks it retrieved even if every waiter went away

    async def _query(self, name: str) -> list[str]:
        mode = self._config.mode
        families = {"ipv4_first": ("A", "AAAA"), "ipv6_first": ("AAAA", "A"),
                    "ipv4_only": ("A",), "ipv6_only": ("AAAA",)}[mode]
        self.queries_sent += 1
        results = await asyncio.gather(*(self._query_type(name, q) for q in families),
                                       return_exceptions=True)
        addresses: list[str] = []
        ttls: list[float] = []
        errors: list[str] = []
        for result in results:
            if isinstance(result, ResolveError):
                errors.append(result.reason)
            elif isinstance(result, BaseException):
                raise result
            else:
                addrs, ttl = result
                addresses.extend(addrs)
                if addrs:
                    ttls.append(ttl)
        now = time.monotonic()
        if addresses:
            ttl = min(max(min(ttls), self._config.min_ttl), self._config.max_ttl)
            self._cache.put(name, CachedAnswer(tuple(addresses), now + ttl, ttl))
            return addresses
        if all(e in ("nxdomain", "no_address") for e in errors):
            # Negative answers are cached briefly so a flood for a bad name is not a flood of queries.
            self._cache.put(name, CachedAnswer((), now + self._config.negative_ttl,
                                               self._config.negative_ttl))
            raise ResolveError(name, "nxdomain" if "nxdomain" in errors else "no_address")
        raise ResolveError(name, errors[0] if errors else "no_address")

    async def _query_type(self, name: str, qtype: str) -> tuple[list[str], float]:
        try:
            answers = await self._dns.query(name, qtype)
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENONAME):
                raise ResolveError(name, "nxdomain") from None
            if code == pycares.errno.ARES_ENODATA:
                raise ResolveError(name, "no_address") from None
            if code == pycares.errno.ARES_ETIMEOUT:
                raise ResolveError(name, "timeout") from None
            if code == pycares.errno.ARES_ECONNREFUSED:
                raise ResolveError(name, "refused") from None
            raise ResolveError(name, f"dns_error {exc.args[-1] if exc.args else exc}") from None
        addrs = [a.host for a in answers]
        ttl = min((a.ttl for a in answers), default=0)
        return addrs, float(ttl)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._dns.close()
