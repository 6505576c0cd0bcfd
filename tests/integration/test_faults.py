# Faults that a production proxy meets, each proving the proxy keeps serving a normal client meanwhile.
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import (DataBackend, TlsBackend, client_context, data_client, pattern_digest,
                                    real_client_hello, server_context, who)
from tests.support.procstat import cpu_seconds, rss_bytes


@pytest.fixture
async def app(ca):
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    yield backend
    await backend.close()


def fault_config(port: int, app_port: int, routes=(), limits=None, nameserver=None) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("app.test", f"127.0.0.1:{app_port}"), *routes], allow_private=True)
            + configs.common(nameserver, limits=limits))


async def normal_client_ok(port: int, ca) -> None:
    assert await who("127.0.0.1", port, "app.test", client_context(ca), timeout=5) == "backend=app alpn=None"


async def test_backend_that_never_reads(app, ca, start_proxy):
    """A slow reader: the client is pushed back (bounded proxy memory), others are served, and the
    stalled connection ends at the idle timeout."""
    stalled = []

    async def never_read(reader, writer):
        stalled.append(writer)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = free_port()
    proxy = start_proxy(fault_config(port, app.port, [("stall.test", f"127.0.0.1:{server.sockets[0].getsockname()[1]}")],
                                     limits={"idle_timeout": 3.0}))
    rss_before = rss_bytes(proxy.proc.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(real_client_hello("stall.test"))
    sent = 0
    chunk = bytes(1 << 20)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            while True:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
    # Kernel buffers on three sockets plus the proxy's bounded buffer: far less than unbounded.
    assert sent < 64 << 20, sent
    assert rss_bytes(proxy.proc.pid) - rss_before < 32 << 20
    await normal_client_ok(port, ca)
    events = await proxy.until(lambda e: e.get("event") == "access" and e.get("route") == "stall.test", timeout=15)
    assert events[0]["outcome"] == "idle_timeout"
    writer.transport.abort()
    server.close()


BACKEND_SCRIPT = r'''
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(); print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
while True:
    conn.sendall(b"x" * 65536)
'''


async def test_backend_killed_mid_transfer(app, ca, start_proxy):
    backend = subprocess.Popen([sys.executable, "-c", BACKEND_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        backend_port = int(backend.stdout.readline())
        port = free_port()
        proxy = start_proxy(fault_config(port, app.port, [("doomed.test", f"127.0.0.1:{backend_port}")]))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(real_client_hello("doomed.test"))
        received = len(await reader.readexactly(1 << 20))
        backend.kill()
        async with asyncio.timeout(10):
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
        writer.close()
        (event,) = await proxy.access()
        assert event["outcome"] in ("backend_reset", "closed") and event["bytes_down"] >= 1 << 20
        await normal_client_ok(port, ca)
    finally:
        backend.kill()
        backend.wait()


async def test_dns_server_down(app, ca, dns, start_proxy):
    dns.silent = True
    port = free_port()
    proxy = start_proxy(fault_config(port, app.port, [("*", f"*:{app.port}")], nameserver=dns.address))
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(real_client_hello("unanswered.test"))
    # Meanwhile a client with a static route is served at once.
    await normal_client_ok(port, ca)
    async with asyncio.timeout(15):
        assert await reader.read() == b""
    writer.close()
    events = await proxy.until(lambda e: e.get("sni") == "unanswered.test")
    assert events[0]["outcome"] == "resolve_failed" and "timeout" in events[0]["reason"]
    assert time.monotonic() - started < 10
    assert dns.count("unanswered.test") >= 1


async def test_sighup_every_100ms_for_10s_under_traffic(app, ca, start_proxy):
    data = await DataBackend().start()
    try:
        port = free_port()
        proxy = start_proxy(fault_config(port, app.port, [("data.test", f"127.0.0.1:{data.port}")]))
        stop = asyncio.Event()
        hup_count = 0

        def hup() -> None:  # a thread, so the test's busy event loop cannot slow the signals down
            nonlocal hup_count
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                proxy.signal(signal.SIGHUP)
                hup_count += 1
                time.sleep(0.1)

        async def traffic() -> int:
            done = 0
            seed = 0
            while not stop.is_set():
                seed += 1
                size = 2 << 20
                got, _ = await asyncio.gather(
                    data_client("127.0.0.1", port, "data.test", size, size, seed=seed),
                    normal_client_ok(port, ca))
                assert got == {"received": size, "sha256": pattern_digest(size, seed)}
                done += 1
            return done

        hups = asyncio.create_task(asyncio.to_thread(hup))
        workers = [asyncio.create_task(traffic()) for _ in range(4)]
        await hups
        stop.set()
        completed = sum(await asyncio.gather(*workers))
        assert hup_count >= 90 and completed >= 20
        # Signals that arrive during a reload coalesce; most must still have been applied.
        reloads = await proxy.until(lambda e: e.get("event") == "reloaded", count=hup_count // 2)
        assert len([e for e in proxy.events() if e.get("event") == "reload_failed"]) == 0
        assert len(reloads) <= hup_count
        events = proxy.access_events()
        assert all(e["outcome"] == "closed" for e in events), [e for e in events if e["outcome"] != "closed"][:3]
    finally:
        await data.close()


async def test_2000_slowloris_connections(app, ca, start_proxy):
    port = free_port()
    proxy = start_proxy(fault_config(port, app.port, limits={"client_hello_timeout": 4.0}))
    hello = real_client_hello("app.test")
    slow = []
    for _ in range(2000):
        slow.append(await asyncio.open_connection("127.0.0.1", port))
    for i in range(3):  # a byte per connection every so often, never finishing the hello
        for _, writer in slow:
            writer.write(hello[i:i + 1])
        started = time.monotonic()
        await normal_client_ok(port, ca)
        assert time.monotonic() - started < 2.0
        await asyncio.sleep(0.5)
    results = await asyncio.gather(*(asyncio.wait_for(r.read(), 15) for r, _ in slow))
    assert results == [b""] * 2000
    for _, writer in slow:
        writer.close()
    events = await proxy.access(count=2003)
    outcomes = [e["outcome"] for e in events]
    assert outcomes.count("hello_timeout") == 2000


async def test_fd_limit_256_with_1000_connection_attempts(app, ca, start_proxy):
    """1000 idle connections against 256 descriptors: the accept loop backs off instead of spinning,
    and once the hello deadline frees descriptors the proxy serves a normal client by itself, while
    the idle connections are still held open by their clients."""
    port = free_port()
    proxy = start_proxy(fault_config(port, app.port, limits={"client_hello_timeout": 2.0}),
                        argv_prefix=["prlimit", "--nofile=256:256", "--"])
    held = []
    for _ in range(1000):
        try:
            held.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2))
        except (TimeoutError, OSError):
            pass  # the backlog may be full: that is the point
    await proxy.until(lambda e: e.get("event") == "accept_paused")
    cpu_before, wall_before = cpu_seconds(proxy.proc.pid), time.monotonic()
    await asyncio.sleep(1.5)
    busy = (cpu_seconds(proxy.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
    assert busy < 0.3, f"the proxy spins at {busy:.0%} CPU while out of file descriptors"
    started = time.monotonic()
    async with asyncio.timeout(60):
        while True:
            try:
                await normal_client_ok(port, ca)
                break
            except (ConnectionError, OSError, TimeoutError):
                await asyncio.sleep(0.2)
    served_after = time.monotonic() - started
    assert proxy.proc.poll() is None
    timeouts = [e for e in proxy.access_events() if e["outcome"] == "hello_timeout"]
    assert len(timeouts) >= 200, "descriptors were freed by the hello deadline, not by the clients"
    for _, writer in held:
        writer.transport.abort()
    print(f"normal client served {served_after:.1f} s after the flood, {len(timeouts)} hello timeouts")
