# Backend name resolution: literal IPs pass through, names go through the cache and then aiodns (A and
# AAAA). Owns TTL clamping, negative answers, single-flight of concurrent lookups and address order.
# Invariant: resolve() returns a non-empty list of IP literals or raises ResolveError; never anything else.
from __future__ import annotations

import asyncio
import functools
import ipaddress

import aiodns
import aiodns.error
import pycares
import structlog

from sniproxy import metrics
from sniproxy.config import ResolverConfig
from sniproxy.dnscache import (
    MAX_ADDRESSES,
    QUERIED_A,
    QUERIED_AAAA,
    CachedAnswer,
    DnsCache,
    MemoryDnsCache,
    now,
)

log = structlog.get_logger("sniproxy.resolver")

_FAMILIES = {"ipv4_first": ("A", "AAAA"), "ipv6_first": ("AAAA", "A"),
             "ipv4_only": ("A",), "ipv6_only": ("AAAA",)}
_QUERIED = {"A": QUERIED_A, "AAAA": QUERIED_AAAA}
_RECORD_TYPE = {"A": pycares.QUERY_TYPE_A, "AAAA": pycares.QUERY_TYPE_AAAA}
_NEGATIVE = ("nxdomain", "no_address")


class ResolveError(Exception):
    """A name could not be turned into addresses; `reason` is a short word for the access log."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason


def _ip_literal(host: str) -> str | None:
    # Config checks that a hostname's last label is not all digits, so anything else is a name: skip
    # the (exception-raising, hence slow) parse for it.
    if ":" not in host and not host.rpartition(".")[2].isdigit():
        return None
    return _parse_literal(host)


# A static route to an IP backend parses the same literal on every connection (2 us with ipaddress,
# 0.1 us from here). Bounded, since a dynamic route's host comes from the client.
@functools.lru_cache(maxsize=1024)
def _parse_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _nameserver_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_ARES_OPT_QUERY_CACHE = 1 << 21  # ares.h (c-ares >= 1.23); pycares does not export it


def _without_query_cache(dns: aiodns.DNSResolver) -> None:
    """Rebuild the resolver's c-ares channel with c-ares's own answer cache off. c-ares >= 1.23 caches
    every answer for its TTL (NODATA without an SOA for an hour), under our cache: a lookup after our
    entry expired (max_ttl, negative_ttl) or was flushed would get c-ares's copy, not a fresh answer.
    pycares has no option for it, so: save the channel's options, add qcache_max_ttl = 0, make a new
    channel, copy the servers (ports and IPv6 included), swap it in, destroy the old one (no query
    has been sent on it yet)."""
    from pycares import _cares  # the cffi module pycares itself is built on

    ffi, lib = _cares.ffi, _cares.lib
    channel = dns._channel
    with channel._lock:
        old = channel._channel[0]
        options = ffi.new("struct ares_options *")
        optmask = ffi.new("int *")
        if lib.ares_save_options(old, options, optmask) != 0:
            raise RuntimeError("ares_save_options failed")
        try:
            options.qcache_max_ttl = 0
            new = ffi.new("ares_channel *")
            status = lib.ares_init_options(new, options, optmask[0] | _ARES_OPT_QUERY_CACHE)
        finally:
            lib.ares_destroy_options(options)
        if status != 0:
            raise RuntimeError(f"ares_init_options failed: {status}")
        servers = lib.ares_get_servers_csv(old)
        try:
            status = lib.ares_set_servers_csv(new[0], servers) if servers != ffi.NULL else 0
        finally:
            if servers != ffi.NULL:
                lib.ares_free_string(servers)
        if status != 0:
            lib.ares_destroy(new[0])
            raise RuntimeError(f"ares_set_servers_csv failed: {status}")
        channel._channel[0] = new[0]
        lib.ares_destroy(old)


class Resolver:
    def __init__(self, config: ResolverConfig, cache: DnsCache | None = None) -> None:
        self._config = config
        self._cache = cache if cache is not None else MemoryDnsCache(config.cache_size)
        self._inflight: dict[str, asyncio.Task[list[str]]] = {}
        servers = [_nameserver_text(a.host, a.port) for a in config.nameservers]
        # `tries` attempts per nameserver: on a timeout c-ares moves on to the next server.
        self._dns = aiodns.DNSResolver(
            nameservers=servers or None, timeout=config.timeout, tries=config.tries
        )
        try:
            _without_query_cache(self._dns)
        except Exception as exc:  # an aiodns/pycares that no longer looks like this: keep going
            log.warning("dns_library_cache", error=repr(exc),
                        effect="c-ares keeps answers for their own TTL: negative_ttl, max_ttl and "
                               "`sniproxy dns flush` cannot make it ask the nameserver sooner")
        # c-ares doubles the per-attempt timeout after each round over all servers; past the sum of
        # all of them it has given up, so this deadline only catches a lookup that never completes.
        rounds = sum(config.timeout * (1 << r) for r in range(config.tries))
        self._deadline = rounds * max(1, len(self._dns.nameservers)) + 1.0
        self.queries_sent = 0

    @property
    def cache(self) -> DnsCache:
        return self._cache

    @property
    def config(self) -> ResolverConfig:
        return self._config

    def resolve_now(self, host: str) -> list[str] | None:
        """resolve() without waiting: the addresses of a literal or a cached answer (ResolveError for
        a cached negative one), or None when it takes a query (then call resolve())."""
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        name = host.lower().rstrip(".")
        cached = self._cache.get(name)
        if cached is not None and cached.answers(self._config.mode):
            metrics.dns_lookup(True)
            return self._addresses(name, cached, cached=True)
        return None

    async def resolve(self, host: str) -> list[str]:
        now = self.resolve_now(host)
        if now is not None:
            return now
        name = host.lower().rstrip(".")
        metrics.dns_lookup(False)
        # Single-flight: concurrent lookups of one name share one query, owned by the resolver so a
        # cancelled caller does not cancel it for the others.
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name))
            self._inflight[name] = task
            task.add_done_callback(lambda t: self._query_done(name, t))
        return list(await asyncio.shield(task))

    def _addresses(self, name: str, answer: CachedAnswer, cached: bool) -> list[str]:
        addresses = answer.addresses(self._config.mode)
        if addresses:
            return addresses
        reason = "nxdomain" if answer.nxdomain else "no_address"
        raise ResolveError(name, f"{reason} (cached)" if cached else reason)

    def _query_done(self, name: str, task: asyncio.Task[list[str]]) -> None:
        self._inflight.pop(name, None)
        if not task.cancelled():
            task.exception()  # marks it retrieved even if every waiter went away

    async def _query(self, name: str) -> list[str]:
        families = _FAMILIES[self._config.mode]
        self.queries_sent += 1
        try:
            async with asyncio.timeout(self._deadline):
                results = await asyncio.gather(*(self._query_type(name, q) for q in families),
                                               return_exceptions=True)
        except TimeoutError:
            raise ResolveError(name, "timeout") from None
        found: dict[str, list[str]] = {"A": [], "AAAA": []}
        ttls: list[float] = []
        errors: list[str] = []
        queried = 0
        for qtype, result in zip(families, results):
            if isinstance(result, ResolveError):
                errors.append(result.reason)
                if result.reason in _NEGATIVE:
                    queried |= _QUERIED[qtype]  # a clean "none": as good an answer as addresses
            elif isinstance(result, BaseException):
                raise result
            else:
                addresses, ttl = result
                found[qtype] = addresses[:MAX_ADDRESSES]
                queried |= _QUERIED[qtype]
                ttls.append(ttl)
        at = now()
        cfg = self._config
        if found["A"] or found["AAAA"]:
            ttl = min(max(min(ttls), cfg.min_ttl), cfg.max_ttl)
            answer = CachedAnswer(tuple(found["A"]), tuple(found["AAAA"]), at + ttl, ttl, at, queried)
            self._cache.put(name, answer)
            return self._addresses(name, answer, cached=False)
        if errors and all(e in _NEGATIVE for e in errors):
            # Negative answers are cached briefly so a flood for a bad name is not a flood of queries.
            nxdomain = "nxdomain" in errors
            answer = CachedAnswer((), (), at + cfg.negative_ttl, cfg.negative_ttl, at,
                                  queried | (QUERIED_A | QUERIED_AAAA if nxdomain else 0), nxdomain)
            if cfg.negative_ttl > 0:
                self._cache.put(name, answer)
            return self._addresses(name, answer, cached=False)
        # Failures (timeouts, refusals, server errors) are not cached: the next lookup asks again.
        raise ResolveError(name, next((e for e in errors if e not in _NEGATIVE), "no_address"))

    async def _query_type(self, name: str, qtype: str) -> tuple[list[str], float]:
        try:
            result = await self._dns.query_dns(name, qtype)
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
            if code == pycares.errno.ARES_ESERVFAIL:
                raise ResolveError(name, "servfail") from None
            raise ResolveError(name, f"dns_error {exc.args[-1] if exc.args else exc}") from None
        wanted = _RECORD_TYPE[qtype]
        addresses = [rr.data.addr for rr in result.answer if rr.type == wanted]
        if not addresses:
            raise ResolveError(name, "no_address")
        # The answer lives as long as the shortest-lived record of its chain (CNAMEs included).
        ttl = min(rr.ttl for rr in result.answer)
        return addresses, float(ttl)

    async def close(self) -> None:
        """Cancel queries in flight (their waiters get CancelledError) and release the c-ares
        channel. The cache is not closed: it may outlive this resolver (a reload shares it)."""
        for task in list(self._inflight.values()):
            task.cancel()
        await self._dns.close()
