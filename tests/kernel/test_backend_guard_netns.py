"""Dynamic routes against real addresses (issue 15, defects 1 and 2), in network namespaces this module
creates and deletes.

Self-loop: namespace S has 1.2.3.4/32 on lo and the proxy listens on 1.2.3.4:18444 with the route
`* -> *:18444` and `self.test A 1.2.3.4` (the issue's setup). One ClientHello for self.test used to
make the proxy connect to itself until max_connections was used up. Addresses added or removed while
the proxy runs are picked up (netlink watch).

Deny list: the proxy in namespace P reaches host R over a veth; R holds one address of every special
range that can be assigned and routed, each routed from P to R. A dynamic route must not connect to
any of them (R's listener counts what reaches it), while a global address on R, and a NAT64 address
embedding a global IPv4 address, are connected (so the refusals are not an unreachable R)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import netns, sh
from tests.support.backends import real_client_hello
from tests.support.configs import common, listener, table
from tests.support.dnsserver import DnsServer
from tests.support.proxyproc import ProxyProcess

SELF_PORT = 18444
BACKEND_PORT = 9555


def start_in(ns: str, directory: Path, name: str, config: str) -> ProxyProcess:
    path = directory / f"{name}.toml"
    path.write_text(config)
    proc = ProxyProcess(path, directory / f"{name}.log", argv_prefix=["nsenter", f"--net=/run/netns/{ns}"])
    proc.wait_ready()
    return proc


def dns_in(ns: str) -> DnsServer:
    with netns(ns):
        return DnsServer()


async def hello_and_wait_close(ns: str, host: str, port: int, sni: str, timeout: float = 10.0) -> bytes:
    """Send a real ClientHello from inside ns; return whatever comes back before the proxy closes."""
    with netns(ns):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=await _connected(sock, host, port))
    try:
        writer.write(real_client_hello(sni))
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


async def _connected(sock: socket.socket, host: str, port: int) -> socket.socket:
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return sock


# --------------------------------------------------------------------------------------------------
# Defect 1: the proxy's own addresses


@pytest.fixture
def self_ns() -> Iterator[str]:
    name = f"spx-self{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "addr", "add", "1.2.3.4/32", "dev", "lo")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


async def test_a_dynamic_route_never_connects_the_proxy_to_itself(self_ns, tmp_path):
    dns = dns_in(self_ns)
    try:
        dns.add("self.test", ["1.2.3.4"])
        dns.add("legit.test", ["1.2.3.4"])
        # Another client's route: a static backend in the same namespace, served while the
        # attacker holds its connection.
        with netns(self_ns):
            backend_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        backend_sock.bind(("127.0.0.1", 0))
        backend_port = backend_sock.getsockname()[1]
        reached: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            reached.append(await reader.read(5))
            writer.write(b"served\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, sock=backend_sock)
        config = (listener(f"1.2.3.4:{SELF_PORT}")
                  + table("default", [("served.test", f"127.0.0.1:{backend_port}"), ("*", f"*:{SELF_PORT}")])
                  + common(dns.address, limits={"max_connections": 50}))
        proxy = start_in(self_ns, tmp_path, "self", config)
        try:
            # The attacker: one ClientHello, and it holds on to the connection.
            with netns(self_ns):
                attacker = socket.create_connection(("1.2.3.4", SELF_PORT))
            attacker.sendall(real_client_hello("self.test"))
            (event,) = await proxy.until(lambda e: e.get("event") == "access" and e.get("sni") == "self.test")
            assert event["outcome"] == "backend_self", event
            assert "1.2.3.4" in event["reason"] and "this host" in event["reason"]
            # Another client is still served, and nothing looped: one access event for the attacker.
            answer = await hello_and_wait_close(self_ns, "1.2.3.4", SELF_PORT, "served.test")
            assert answer == b"served\n" and reached and reached[0][:1] == b"\x16"
            await asyncio.sleep(0.5)
            access = proxy.access_events()
            assert [e["outcome"] for e in access].count("over_limit") == 0, access[:5]
            assert len(access) == 2, [e["outcome"] for e in access][:10]
            attacker.close()

            # An address added while the proxy runs is its own from then on (netlink watch) ...
            sh("ip", "-n", self_ns, "addr", "add", "5.6.7.8/32", "dev", "lo")
            dns.add("later.test", ["5.6.7.8"])
            await hello_and_wait_close(self_ns, "1.2.3.4", SELF_PORT, "later.test")
            (later,) = await proxy.until(lambda e: e.get("event") == "access" and e.get("sni") == "later.test")
            assert later["outcome"] == "backend_self" and "5.6.7.8" in later["reason"], later
            # ... and no longer once removed (then nothing answers there: connect_failed).
            sh("ip", "-n", self_ns, "addr", "del", "5.6.7.8/32", "dev", "lo")
            dns.add("gone.test", ["5.6.7.8"])
            await hello_and_wait_close(self_ns, "1.2.3.4", SELF_PORT, "gone.test")
            (gone,) = await proxy.until(lambda e: e.get("event") == "access" and e.get("sni") == "gone.test")
            assert gone["outcome"] == "connect_failed", gone
        finally:
            assert proxy.stop() == 0, proxy.text()[-3000:]
            server.close()
    finally:
        dns.close()


async def test_a_table_may_allow_this_hosts_address_explicitly(self_ns, tmp_path):
    """allow_private_backends listing the address lets a dynamic route reach this host (here a
    second listener on the same address: no loop, since that one routes statically)."""
    dns = dns_in(self_ns)
    try:
        dns.add("inner.test", ["1.2.3.4"])
        with netns(self_ns):
            backend_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        backend_sock.bind(("1.2.3.4", BACKEND_PORT))

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(5)
            writer.write(b"inner\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, sock=backend_sock)
        config = (listener(f"1.2.3.4:{SELF_PORT}")
                  + table("default", [("*", f"*:{BACKEND_PORT}")], allow_private=["1.2.3.4/32"])
                  + common(dns.address))
        proxy = start_in(self_ns, tmp_path, "allowed", config)
        try:
            assert await hello_and_wait_close(self_ns, "1.2.3.4", SELF_PORT, "inner.test") == b"inner\n"
            (event,) = await proxy.access()
            assert event["outcome"] == "closed" and event["backend"] == f"1.2.3.4:{BACKEND_PORT}"
        finally:
            assert proxy.stop() == 0
            server.close()
    finally:
        dns.close()


# --------------------------------------------------------------------------------------------------
# Defect 2: the explicit deny list, against real routed addresses

# One assignable, routable address per special range (the rest: multicast, unspecified, loopback,
# link-local, IPv4-mapped, 240/4, are covered by tests/unit/test_backend_guard.py).
DENIED_ON_R = {
    "10.0.0.0/8": "10.77.0.1",
    "100.64.0.0/10": "100.64.7.1",
    "169.254.0.0/16": "169.254.77.1",
    "172.16.0.0/12": "172.20.0.1",
    "192.0.0.0/24": "192.0.0.77",
    "192.0.2.0/24": "192.0.2.77",
    "192.88.99.0/24": "192.88.99.77",
    "192.168.0.0/16": "192.168.77.1",
    "198.18.0.0/15": "198.18.0.77",
    "198.51.100.0/24": "198.51.100.77",
    "203.0.113.0/24": "203.0.113.77",
    "::/96": "::a4d:2",
    "::ffff:0:0:0/96": "::ffff:0:a4d:3",
    "64:ff9b::/96 (10.77.0.4 inside)": "64:ff9b::a4d:4",
    "64:ff9b:1::/48": "64:ff9b:1::1",
    "100::/64": "100::77",
    "2001::/23": "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "2001:db8::/32": "2001:db8::77",
    "2002::/16 (10.77.0.5 inside)": "2002:a4d:5::1",
    "3fff::/20": "3fff::77",
    "5f00::/16": "5f00::77",
    "fc00::/7": "fd77::1",
    "fec0::/10": "fec0::77",
}
GLOBAL_ON_R = {"global-v4": "93.184.216.34", "nat64-global": "64:ff9b::5db8:d822"}


@pytest.fixture(scope="module")
def routed() -> Iterator[tuple[str, str]]:
    pid = os.getpid()
    p, r = f"spx-gp{pid}", f"spx-gr{pid}"
    made: list[str] = []
    try:
        for ns in (p, r):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", p, "link", "add", f"gp{pid}", "type", "veth", "peer", "name", f"gr{pid}", "netns", r)
        for ns, ifname, v4, v6 in ((p, f"gp{pid}", "10.250.0.1/30", "fd50::1/64"),
                                   (r, f"gr{pid}", "10.250.0.2/30", "fd50::2/64")):
            sh("ip", "-n", ns, "addr", "add", v4, "dev", ifname)
            sh("ip", "-n", ns, "addr", "add", v6, "dev", ifname, "nodad")
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        for address in [*DENIED_ON_R.values(), *GLOBAL_ON_R.values()]:
            v6 = ":" in address
            sh("ip", "-n", r, "addr", "add", f"{address}/{128 if v6 else 32}", "dev", "lo",
               *(["nodad"] if v6 else []))
            sh("ip", "-n", p, "-6" if v6 else "-4", "route", "add", f"{address}/{128 if v6 else 32}",
               "via", "fd50::2" if v6 else "10.250.0.2")
        yield p, r
    finally:
        for ns in reversed(made):
            sh("ip", "netns", "del", ns, check=False)


async def test_special_ranges_are_refused_on_a_real_route(routed, tmp_path):
    p, r = routed
    with netns(r):
        listen = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listen.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listen.bind(("::", BACKEND_PORT))
    reached: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")[0]
        reached.append(local[7:] if local.startswith("::ffff:") and "." in local else local)
        # Read the forwarded ClientHello first: closing with it unread would send an RST, and the
        # access log would say backend_reset or closed depending on who was faster.
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(serve, sock=listen)
    dns = dns_in(p)
    names = {}
    for i, (label, address) in enumerate([*DENIED_ON_R.items(), *GLOBAL_ON_R.items()]):
        names[f"r{i}.test"] = (label, address)
        dns.add(f"r{i}.test", [address])
    proxy = start_in(p, tmp_path, "guard",
                     listener("127.0.0.1:8443") + table("default", [("*", f"*:{BACKEND_PORT}")])
                     + common(dns.address, limits={"connect_timeout": 2.0}))
    try:
        for name in names:
            await hello_and_wait_close(p, "127.0.0.1", 8443, name)
        events = await proxy.access(count=len(names))
        by_sni = {e["sni"]: e for e in events}
        outcomes = {names[sni][0]: by_sni[sni]["outcome"] for sni in names}
        assert outcomes == {**{label: "backend_refused" for label in DENIED_ON_R},
                            **{label: "closed" for label in GLOBAL_ON_R}}, outcomes
        for sni, (label, address) in names.items():
            if label in DENIED_ON_R:
                # As the resolver prints it (inet_ntop writes ::a4d:2 as ::10.77.0.2).
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                printed = socket.inet_ntop(family, socket.inet_pton(family, address))
                assert printed in by_sni[sni]["reason"], by_sni[sni]
        # What reached R: the global ones only (so each refusal was the guard, not a dead route).
        await asyncio.sleep(0.2)
        assert sorted(str(ipaddress.ip_address(a)) for a in reached) == sorted(GLOBAL_ON_R.values())
    finally:
        assert proxy.stop() == 0
        server.close()
        dns.close()
