#!/usr/bin/env python3
# Per-lookup latency of Resolver.resolve() for a cached name (in-process front cache hit, kernel
# dns_cache map hit, memory-only hit) and for a miss answered by a real DNS server on loopback, in one
# run, plus a loopback TCP connect for scale. Needs root for the kernel map; everything it creates
# (a pin dir under /sys/fs/bpf, the DNS server) is removed at the end.
#
#   .venv/bin/python bench/dns_resolve.py [--lookups N] [--json]
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from sniproxy.config import Address, ResolverConfig  # noqa: E402
from sniproxy.dnscache import BpfDnsCache, CachedAnswer, DnsCache, MemoryDnsCache  # noqa: E402
from sniproxy.kernel.dnsmap import DnsMap  # noqa: E402
from sniproxy.resolver import Resolver  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402

NAME = "cached.bench.test"


class FrontCache:
    """The alternative this benchmark measures and the proxy does not use: a MemoryDnsCache in front
    of the kernel map (see docs/dns.md, "Why no in-process cache in front of the map")."""

    kind = "memory+kernel"

    def __init__(self, front: MemoryDnsCache, back: DnsCache) -> None:
        self.front, self.back = front, back

    def get(self, name: str) -> CachedAnswer | None:
        answer = self.front.get(name)
        if answer is None:
            answer = self.back.get(name)
            if answer is not None:
                self.front.put(name, answer)
        return answer

    def put(self, name: str, answer: CachedAnswer) -> None:
        self.back.put(name, answer)
        self.front.put(name, answer)

    def flush(self, name: str | None = None) -> int:
        self.front.flush(name)
        return self.back.flush(name)

    def close(self) -> None:
        self.front.close()


def summary(samples_ns: list[int]) -> dict[str, float]:
    samples = sorted(samples_ns)
    return {"median_us": statistics.median(samples) / 1000,
            "p99_us": samples[int(len(samples) * 0.99) - 1] / 1000,
            "mean_us": statistics.fmean(samples) / 1000,
            "lookups": len(samples)}


async def timed_hits(resolver: Resolver, n: int) -> list[int]:
    await resolver.resolve(NAME)  # fill the cache
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        await resolver.resolve(NAME)
        out.append(clock() - t)
    return out


async def timed_misses(resolver: Resolver, names: list[str]) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for name in names:
        t = clock()
        await resolver.resolve(name)
        out.append(clock() - t)
    return out


async def timed_connects(n: int) -> list[int]:
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    server.setblocking(False)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter_ns()
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, server.getsockname())
            accepted, _ = await loop.sock_accept(server)
            out.append(time.perf_counter_ns() - t)
            accepted.close()
            client.close()
    finally:
        server.close()
    return out


async def proxy_cpu_per_connection(connections: int, pin_dir: str) -> dict[str, float]:
    """CPU time the real proxy process spends per TLS connection (splice on, DNS cache in the kernel
    map): the budget a per-lookup saving is a share of."""
    import tempfile

    import trustme

    from tests.conftest import free_port
    from tests.support import configs
    from tests.support.backends import TlsBackend, client_context, server_context, who
    from tests.support.proxyproc import ProxyProcess

    ca = trustme.CA()
    dns = DnsServer()
    dns.add("backend.bench.test", ["127.0.0.1"], ttl=3600)
    backend = await TlsBackend("bench", server_context(ca, "app.bench.test")).start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "proxy.toml"
        config.write_text(configs.listener(f"127.0.0.1:{port}")
                          + configs.table("default", [("app.bench.test", f"backend.bench.test:{backend.port}")])
                          + configs.common(dns.address, splice=True, pin_dir=pin_dir))
        proxy = ProxyProcess(config, Path(tmp) / "proxy.log")
        try:
            await asyncio.to_thread(proxy.wait_ready)
            ctx = client_context(ca)
            await who("127.0.0.1", port, "app.bench.test", ctx)  # warm up: resolve, compile caches

            def cpu_seconds() -> float:
                with open(f"/proc/{proxy.proc.pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

            before = cpu_seconds()
            for _ in range(connections):
                await who("127.0.0.1", port, "app.bench.test", ctx)
            per = (cpu_seconds() - before) / connections * 1e6
        finally:
            proxy.stop()
            await backend.close()
            dns.close()
    return {"median_us": per, "p99_us": float("nan"), "mean_us": per, "lookups": connections}


async def run(lookups: int, misses: int, connections: int, pin_dir: str) -> dict[str, dict[str, float]]:
    dns = DnsServer()
    dns.add(NAME, ["192.0.2.10", "2001:db8::10"], ttl=3600)
    miss_names = [f"miss{i}.bench.test" for i in range(misses)]
    for name in miss_names:
        dns.add(name, ["192.0.2.11", "2001:db8::11"], ttl=3600)
    config = ResolverConfig(nameservers=(Address(dns.host, dns.port),), timeout=2.0, tries=1)
    dns_map = DnsMap.load(pin_dir, config.cache_size)
    results: dict[str, dict[str, float]] = {}
    try:
        kernel = BpfDnsCache(dns_map)
        plans = {
            "front cache hit (memory in front of the kernel map)":
                FrontCache(MemoryDnsCache(config.cache_size), kernel),
            "kernel map hit (dns_cache, through dns_lookup)": kernel,
            "memory-only hit (fallback without BPF)": MemoryDnsCache(config.cache_size),
        }
        for label, cache in plans.items():
            kernel.flush()
            resolver = Resolver(config, cache)
            results[label] = summary(await timed_hits(resolver, lookups))
            await resolver.close()
        kernel.flush()
        resolver = Resolver(config, kernel)
        results["miss (A + AAAA from a DNS server on loopback)"] = summary(
            await timed_misses(resolver, miss_names))
        await resolver.close()
        results["for scale: loopback TCP connect + accept"] = summary(await timed_connects(min(lookups, 2000)))
    finally:
        dns_map.close()
        dns.close()
    if connections:
        results["for scale: proxy CPU per TLS connection (mean)"] = await proxy_cpu_per_connection(
            connections, pin_dir)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=20000, help="cached lookups per cache kind")
    parser.add_argument("--misses", type=int, default=500, help="lookups of distinct uncached names")
    parser.add_argument("--connections", type=int, default=300,
                        help="TLS connections through a real proxy process to measure its CPU per "
                             "connection (0: skip)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("dns_resolve: the kernel map needs root (CAP_BPF, CAP_NET_ADMIN)", file=sys.stderr)
        return 2
    pin_dir = f"/sys/fs/bpf/sniproxy-dnsbench-{os.getpid()}"
    try:
        results = uvloop.run(run(args.lookups, args.misses, args.connections, pin_dir))
    finally:
        # Only what this run made: unlinking the pin frees the map.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pin_dir, "dns_cache"))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(pin_dir)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(k) for k in results)
    print(f"{'Resolver.resolve() per lookup':<{width}}  {'median':>9}  {'p99':>9}  {'mean':>9}")
    for label, r in results.items():
        p99 = "" if r["p99_us"] != r["p99_us"] else f"{r['p99_us']:>7.1f}us"  # NaN: not measured
        print(f"{label:<{width}}  {r['median_us']:>7.1f}us  {p99:>9}  {r['mean_us']:>7.1f}us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
