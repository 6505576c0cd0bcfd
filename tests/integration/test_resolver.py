# The Resolver against real DNS servers on loopback (dnslib, counting queries): TTLs and their
# min/max bounds, negative caching, timeouts and failover to the next nameserver, single-flight,
# address families and modes; then the same through the real proxy process (NXDOMAIN close and
# access log, 200 concurrent connections, an AAAA-only backend on ::1, [resolver] changes on SIGHUP).
# The cache here is in memory; tests/kernel/test_dns_cache.py runs the same resolver on the pinned
# kernel map.
from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from sniproxy.config import Address, ResolverConfig
from sniproxy.dnscache import MemoryDnsCache
from sniproxy.resolver import ResolveError, Resolver
from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, real_client_hello, server_context, who
from tests.support.dnsserver import DnsServer


class GatedDnsServer(DnsServer):
    """Counts each query at once but holds every answer until `gate` is set: lets a test pile up
    lookups while the first query is in flight."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        super().__init__()

    def answer(self, data: bytes) -> bytes | None:
        reply = super().answer(data)
        self.gate.wait(10)
        return reply


@pytest.fixture
def silent() -> Iterator[DnsServer]:
    server = DnsServer()
    server.silent = True
    yield server
    server.close()


@pytest.fixture
def gated() -> Iterator[GatedDnsServer]:
    server = GatedDnsServer()
    yield server
    server.gate.set()
    server.close()


def config(*servers: DnsServer, **overrides: object) -> ResolverConfig:
    values: dict[str, object] = {"timeout": 1.0, "tries": 1}
    values.update(overrides)
    return ResolverConfig(nameservers=tuple(Address(s.host, s.port) for s in servers), **values)


async def failure(resolver: Resolver, name: str) -> str:
    with pytest.raises(ResolveError) as err:
        await resolver.resolve(name)
    return err.value.reason


async def test_answers_are_reused_until_their_ttl_expires_then_asked_again(dns) -> None:
    dns.add("ttl.test", ["192.0.2.1"], ttl=1)
    resolver = Resolver(config(dns))
    try:
        assert await resolver.resolve("ttl.test") == ["192.0.2.1"]
        assert await resolver.resolve("TTL.test.") == ["192.0.2.1"]  # same name, same entry
        assert dns.count("ttl.test") == 2  # one A and one AAAA query
        await asyncio.sleep(1.1)
        assert await resolver.resolve("ttl.test") == ["192.0.2.1"]
        assert dns.count("ttl.test") == 4
    finally:
        await resolver.close()


async def test_min_ttl_keeps_short_lived_answers_that_long(dns) -> None:
    dns.add("zero.test", ["192.0.2.2"], ttl=0)
    cache = MemoryDnsCache(100)
    resolver = Resolver(config(dns, min_ttl=0.4), cache)
    try:
        await resolver.resolve("zero.test")
        assert cache.get("zero.test").ttl == 0.4
        await resolver.resolve("zero.test")
        assert dns.count("zero.test") == 2
        await asyncio.sleep(0.5)
        await resolver.resolve("zero.test")
        assert dns.count("zero.test") == 4
    finally:
        await resolver.close()


async def test_max_ttl_bounds_how_long_an_answer_is_kept(dns) -> None:
    dns.add("long.test", ["192.0.2.3"], ttl=86400)
    cache = MemoryDnsCache(100)
    resolver = Resolver(config(dns, max_ttl=0.3), cache)
    try:
        await resolver.resolve("long.test")
        entry = cache.get("long.test")
        assert entry.ttl == 0.3 and entry.expires - entry.inserted == pytest.approx(0.3)
        await asyncio.sleep(0.35)
        assert cache.get("long.test") is None
        # ... and the next lookup reaches the nameserver: c-ares's own answer cache, which would
        # hand back its copy for the record's full day, is turned off.
        await resolver.resolve("long.test")
        assert dns.count("long.test") == 4
    finally:
        await resolver.close()


async def test_a_flushed_name_is_asked_again_at_once(dns) -> None:
    dns.add("flushed.test", ["192.0.2.10"], ttl=86400)
    cache = MemoryDnsCache(100)
    resolver = Resolver(config(dns), cache)
    try:
        await resolver.resolve("flushed.test")
        assert cache.flush("flushed.test") == 1
        await resolver.resolve("flushed.test")
        assert dns.count("flushed.test") == 4
    finally:
        await resolver.close()


async def test_nxdomain_is_cached_for_negative_ttl(dns) -> None:
    resolver = Resolver(config(dns, negative_ttl=0.5))
    try:
        assert await failure(resolver, "missing.test") == "nxdomain"
        asked = dns.count("missing.test")
        assert asked == 2
        assert await failure(resolver, "missing.test") == "nxdomain (cached)"
        assert dns.count("missing.test") == asked
        await asyncio.sleep(0.6)
        assert await failure(resolver, "missing.test") == "nxdomain"
        assert dns.count("missing.test") == 2 * asked
    finally:
        await resolver.close()


async def test_negative_ttl_zero_remembers_nothing(dns) -> None:
    resolver = Resolver(config(dns, negative_ttl=0.0))
    try:
        assert await failure(resolver, "missing.test") == "nxdomain"
        assert await failure(resolver, "missing.test") == "nxdomain"
        assert dns.count("missing.test") == 4
    finally:
        await resolver.close()


async def test_a_silent_nameserver_times_out_and_the_next_one_answers(dns, silent) -> None:
    dns.add("failover.test", ["192.0.2.4"])
    resolver = Resolver(config(silent, dns, timeout=0.5, tries=1))
    try:
        started = time.monotonic()
        assert await resolver.resolve("failover.test") == ["192.0.2.4"]
        elapsed = time.monotonic() - started
        assert silent.count("failover.test") >= 1, "the first nameserver was never asked"
        assert dns.count("failover.test") >= 1
        assert 0.4 <= elapsed < 2.0, elapsed  # one timeout on the silent server, then the answer
    finally:
        await resolver.close()


async def test_when_no_nameserver_answers_the_lookup_fails_with_timeout_and_is_not_cached(silent) -> None:
    resolver = Resolver(config(silent, timeout=0.3, tries=2))
    try:
        started = time.monotonic()
        assert await failure(resolver, "nobody.test") == "timeout"
        # tries=2 on one server: 0.3 s, then 0.6 s (c-ares doubles after each round).
        assert time.monotonic() - started < 2.5
        asked = silent.count("nobody.test")
        assert await failure(resolver, "nobody.test") == "timeout"
        assert silent.count("nobody.test") > asked  # a failure is not an answer: asked again
    finally:
        await resolver.close()


@pytest.mark.parametrize("mode, queries", [("ipv4_only", 1), ("ipv4_first", 2)])
async def test_concurrent_lookups_of_one_name_share_one_query(gated, mode: str, queries: int) -> None:
    gated.add("crowd.test", ["192.0.2.5", "2001:db8::5"])
    resolver = Resolver(config(gated, timeout=5.0, mode=mode))
    try:
        lookups = [asyncio.create_task(resolver.resolve("crowd.test")) for _ in range(200)]
        await asyncio.sleep(0.3)  # every lookup is now waiting on the one query in flight
        assert not any(t.done() for t in lookups)
        gated.gate.set()
        results = await asyncio.gather(*lookups)
        expected = ["192.0.2.5"] if mode == "ipv4_only" else ["192.0.2.5", "2001:db8::5"]
        assert all(r == expected for r in results)
        assert gated.count("crowd.test") == queries  # one per record type, not per lookup
        assert resolver.queries_sent == 1
    finally:
        await resolver.close()


async def test_a_cancelled_caller_does_not_cancel_the_query_for_the_others(gated) -> None:
    gated.add("shared.test", ["192.0.2.6"])
    resolver = Resolver(config(gated, timeout=5.0, mode="ipv4_only"))
    try:
        first = asyncio.create_task(resolver.resolve("shared.test"))
        second = asyncio.create_task(resolver.resolve("shared.test"))
        await asyncio.sleep(0.2)
        first.cancel()
        gated.gate.set()
        assert await second == ["192.0.2.6"]
        assert first.cancelled()
        assert gated.count("shared.test") == 1
    finally:
        await resolver.close()


async def test_aaaa_only_names_resolve_in_dual_stack_and_ipv6_modes(dns) -> None:
    dns.add("v6only.test", ["2001:db8::7"])
    for mode in ("ipv4_first", "ipv6_first", "ipv6_only"):
        resolver = Resolver(config(dns, mode=mode))
        try:
            assert await resolver.resolve("v6only.test") == ["2001:db8::7"], mode
        finally:
            await resolver.close()
    resolver = Resolver(config(dns, mode="ipv4_only"))
    try:
        assert await failure(resolver, "v6only.test") == "no_address"
        assert await failure(resolver, "v6only.test") == "no_address (cached)"
    finally:
        await resolver.close()


@pytest.mark.parametrize("mode, expected", [
    ("ipv4_first", ["192.0.2.8", "2001:db8::8"]),
    ("ipv6_first", ["2001:db8::8", "192.0.2.8"]),
    ("ipv4_only", ["192.0.2.8"]),
    ("ipv6_only", ["2001:db8::8"]),
])
async def test_modes_pick_and_order_the_families(dns, mode: str, expected: list[str]) -> None:
    dns.add("dual.test", ["192.0.2.8", "2001:db8::8"])
    resolver = Resolver(config(dns, mode=mode))
    try:
        assert await resolver.resolve("dual.test") == expected
        assert dns.count("dual.test") == (1 if mode.endswith("_only") else 2)
    finally:
        await resolver.close()


async def test_an_entry_made_in_one_mode_is_completed_by_a_query_in_another(dns) -> None:
    # Two processes with different modes may share the kernel map: an ipv4_only answer says nothing
    # about AAAA, so an ipv6_only lookup must ask for it rather than answer "no address".
    dns.add("both.test", ["192.0.2.9", "2001:db8::9"])
    cache = MemoryDnsCache(100)
    v4 = Resolver(config(dns, mode="ipv4_only"), cache)
    v6 = Resolver(config(dns, mode="ipv6_only"), cache)
    try:
        assert await v4.resolve("both.test") == ["192.0.2.9"]
        assert await v6.resolve("both.test") == ["2001:db8::9"]
        assert dns.queries[("both.test", "A")] == 1 and dns.queries[("both.test", "AAAA")] == 1
    finally:
        await v4.close()
        await v6.close()


async def test_long_answers_are_cut_to_eight_addresses_per_family(dns) -> None:
    dns.add("many.test", [f"192.0.2.{i}" for i in range(1, 13)])
    resolver = Resolver(config(dns, mode="ipv4_only"))
    try:
        assert len(await resolver.resolve("many.test")) == 8
    finally:
        await resolver.close()


@pytest.mark.parametrize("host, expected", [("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
                                            ("2001:DB8:0::1", "2001:db8::1")])
async def test_literal_addresses_skip_dns(dns, host: str, expected: str) -> None:
    resolver = Resolver(config(dns))
    try:
        assert await resolver.resolve(host) == [expected]
        assert sum(dns.queries.values()) == 0
    finally:
        await resolver.close()


# -- through the real proxy -------------------------------------------------------------------------


def proxy_config(port: int, routes: list[tuple[str, str]], nameserver: str, **resolver: object) -> str:
    text = configs.listener(f"127.0.0.1:{port}") + configs.table("default", routes) + configs.common(nameserver)
    extra = "".join(f"{k} = {configs.toml_str(v) if isinstance(v, str) else v}\n" for k, v in resolver.items())
    if "timeout" in resolver:
        text = text.replace("timeout = 1.0\n", "")
    return text.replace("[resolver]\n", "[resolver]\n" + extra, 1)


async def closed_cleanly(port: int, sni: str) -> None:
    """Send a real ClientHello; the proxy must answer with a FIN (read() == b""), not a reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(real_client_hello(sni))
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()


async def test_nxdomain_closes_the_client_cleanly_logs_why_and_is_cached(dns, start_proxy) -> None:
    port = free_port()
    proxy = start_proxy(proxy_config(port, [("gone.test", "gone-backend.test:443")], dns.address,
                                     negative_ttl=1.0))
    await closed_cleanly(port, "gone.test")
    (event,) = await proxy.access()
    assert event["outcome"] == "resolve_failed" and event["state"] == "resolving"
    assert event["reason"] == "gone-backend.test: nxdomain" and event["backend"] is None
    asked = dns.count("gone-backend.test")
    assert asked >= 1
    await closed_cleanly(port, "gone.test")
    events = await proxy.access(count=2)
    assert events[1]["reason"] == "gone-backend.test: nxdomain (cached)"
    assert dns.count("gone-backend.test") == asked  # within negative_ttl: no new query
    await asyncio.sleep(1.1)
    await closed_cleanly(port, "gone.test")
    events = await proxy.access(count=3)
    assert events[2]["reason"] == "gone-backend.test: nxdomain"
    assert dns.count("gone-backend.test") == 2 * asked


async def test_200_connections_for_one_uncached_name_make_exactly_one_query(ca, gated, start_proxy) -> None:
    backend = await TlsBackend("crowd", server_context(ca, "crowd.test")).start()
    try:
        gated.add("crowd-backend.test", ["127.0.0.1"])
        port = free_port()
        # ipv4_only: one lookup is one query (dual-stack would be one A and one AAAA).
        proxy = start_proxy(proxy_config(port, [("crowd.test", f"crowd-backend.test:{backend.port}")],
                                         gated.address, timeout=10.0, tries=1, mode="ipv4_only"))
        hello = real_client_hello("crowd.test")

        async def client() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(hello)
                async with asyncio.timeout(20):
                    return await reader.readexactly(1)  # the backend's first TLS record, via the proxy
            finally:
                writer.close()

        clients = [asyncio.create_task(client()) for _ in range(200)]
        async with asyncio.timeout(10):
            while gated.count("crowd-backend.test") == 0:
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # let every connection reach the resolver while the query is held
        assert not any(c.done() for c in clients)
        gated.gate.set()
        assert await asyncio.gather(*clients) == [b"\x16"] * 200  # a TLS handshake record each
        assert gated.count("crowd-backend.test") == 1
        events = await proxy.access(count=200)
        assert all(e["backend"] == f"127.0.0.1:{backend.port}" for e in events)
        # They really were concurrent: most of them waited for the held answer.
        assert sum(e["duration_ms"] >= 500 for e in events) >= 150
    finally:
        await backend.close()


async def test_an_aaaa_only_name_reaches_an_ipv6_backend(ca, dns, start_proxy) -> None:
    backend = await TlsBackend("six", server_context(ca, "six.test"), host="::1").start()
    try:
        dns.add("six-backend.test", ["::1"])  # AAAA only: the A query gets "no such record"
        port = free_port()
        proxy = start_proxy(proxy_config(port, [("six.test", f"six-backend.test:{backend.port}")], dns.address))
        assert await who("127.0.0.1", port, "six.test", client_context(ca)) == "backend=six alpn=None"
        (event,) = await proxy.access()
        assert event["outcome"] == "closed" and event["backend"] == f"[::1]:{backend.port}"
        assert dns.queries[("six-backend.test", "A")] == 1
        assert dns.queries[("six-backend.test", "AAAA")] == 1
    finally:
        await backend.close()


async def test_sighup_with_new_nameservers_sends_new_lookups_there(ca, gated, start_proxy) -> None:
    # A lookup in flight on the old nameserver when the reload lands finishes there (its resolver is
    # closed only once no connection uses it); every lookup after the reload goes to the new one.
    backend = await TlsBackend("app", server_context(ca, "slow.test", "new.test")).start()
    second = DnsServer()
    try:
        for server in (gated, second):
            server.add("slow-backend.test", ["127.0.0.1"])
            server.add("new-backend.test", ["127.0.0.1"])
        port = free_port()
        routes = [("slow.test", f"slow-backend.test:{backend.port}"),
                  ("new.test", f"new-backend.test:{backend.port}")]
        proxy = start_proxy(proxy_config(port, routes, gated.address, timeout=10.0, tries=1))
        ctx = client_context(ca)
        slow = asyncio.create_task(who("127.0.0.1", port, "slow.test", ctx, timeout=20))
        async with asyncio.timeout(10):
            while gated.count("slow-backend.test") == 0:  # held at the old nameserver
                await asyncio.sleep(0.02)

        proxy.config_path.write_text(proxy_config(port, routes, second.address, timeout=10.0, tries=1))
        proxy.signal(signal.SIGHUP)
        (reloaded,) = await proxy.until(lambda e: e.get("event") == "resolver_reloaded")
        assert reloaded["nameservers"] == [second.address]
        assert await who("127.0.0.1", port, "new.test", ctx, timeout=5) == "backend=app alpn=None"
        assert second.count("new-backend.test") == 2 and gated.count("new-backend.test") == 0
        assert not slow.done()

        gated.gate.set()
        assert await slow == "backend=app alpn=None"  # not cut by the reload
        assert second.count("slow-backend.test") == 0
        events = await proxy.access(count=2)
        assert sorted(e["sni"] for e in events) == ["new.test", "slow.test"]
        assert all(e["outcome"] == "closed" for e in events)
        # ... and once its last connection is gone, the old resolver is closed.
        (closed,) = await proxy.until(lambda e: e.get("event") == "resolver_closed")
        assert closed["nameservers"] == [gated.address]
    finally:
        second.close()
        await backend.close()


async def test_sighup_applies_mode_and_ttl_bounds_to_new_lookups(ca, dns, start_proxy) -> None:
    backend = await TlsBackend("app", server_context(ca, "one.test", "two.test"), host="::1").start()
    try:
        dns.add("one-backend.test", ["::1"], ttl=300)
        dns.add("two-backend.test", ["::1"], ttl=300)
        port = free_port()
        routes = [("one.test", f"one-backend.test:{backend.port}"), ("two.test", f"two-backend.test:{backend.port}")]
        proxy = start_proxy(proxy_config(port, routes, dns.address, mode="ipv4_only"))
        ctx = client_context(ca)
        await closed_cleanly(port, "one.test")  # ipv4_only: an AAAA-only name has no address
        (event,) = await proxy.access()
        assert event["reason"] == "one-backend.test: no_address"

        proxy.signal(signal.SIGHUP)  # the same [resolver]: the running resolver stays
        await proxy.until(lambda e: e.get("event") == "reloaded")
        proxy.config_path.write_text(proxy_config(port, routes, dns.address, mode="ipv6_only",
                                                  min_ttl=0.0, max_ttl=0.5, cache_size=500))
        proxy.signal(signal.SIGHUP)
        (reloaded,) = await proxy.until(lambda e: e.get("event") == "resolver_reloaded")
        assert (reloaded["mode"], reloaded["max_ttl"]) == ("ipv6_only", 0.5)
        (kept,) = [e for e in proxy.events() if e.get("event") == "reload_resolver_unchanged"]
        assert "cache_size" in kept["reason"]  # the cache is opened once, at start
        assert await who("127.0.0.1", port, "two.test", ctx) == "backend=app alpn=None"
        assert dns.queries[("two-backend.test", "AAAA")] == 1
        await asyncio.sleep(0.6)  # past the new max_ttl: asked again
        assert await who("127.0.0.1", port, "two.test", ctx) == "backend=app alpn=None"
        assert dns.queries[("two-backend.test", "AAAA")] == 2
    finally:
        await backend.close()


async def test_sigterm_cuts_connections_waiting_for_a_query_or_a_hello(gated, start_proxy) -> None:
    """The slow paths end at the drain deadline like the rest: one connection waits on a held DNS
    query (a task of its own), another for its ClientHello (a timer); both are logged "shutdown"
    from the phase they were in, and the proxy exits."""
    gated.add("held-backend.test", ["127.0.0.1"])
    port = free_port()
    text = proxy_config(port, [("held.test", "held-backend.test:9")], gated.address, timeout=10.0, tries=1,
                        mode="ipv4_only")
    assert "shutdown_grace = 5.0\n" in text
    proxy = start_proxy(text.replace("shutdown_grace = 5.0\n", "shutdown_grace = 0.5\n"))
    _, waiting_dns = await asyncio.open_connection("127.0.0.1", port)
    waiting_dns.write(real_client_hello("held.test"))
    _, silent = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(10):
        while gated.count("held-backend.test") == 0:
            await asyncio.sleep(0.02)
    proxy.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proxy.proc.wait, 10) == 0
    events = await proxy.access(count=2)
    assert sorted((e["outcome"], e["state"]) for e in events) == [
        ("shutdown", "reading_hello"), ("shutdown", "resolving")]
    waiting_dns.close()
    silent.close()
