# A backend that cannot be reached, or a name that does not resolve: the client is closed promptly,
# the access log says why, and other clients are unaffected.
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, real_client_hello, server_context, who
from tests.support.procstat import cpu_seconds


@pytest.fixture
async def proxy(ca, dns, start_proxy):
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    dead_port = free_port()  # nothing listens here: connection refused
    dns.add("known.test", ["127.0.0.1"])
    port = free_port()
    p = start_proxy(configs.listener(f"127.0.0.1:{port}")
                    + configs.table("default", [("app.test", f"127.0.0.1:{backend.port}"),
                                                ("dead.test", f"127.0.0.1:{dead_port}"),
                                                ("*", f"*:{backend.port}")])
                    + configs.common(dns.address))
    p.port = port
    yield p
    await backend.close()


async def closed_promptly(port: int, sni: str) -> float:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(real_client_hello(sni))
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    return time.monotonic() - started


async def test_refused_backend_closes_the_client_promptly(proxy, ca):
    assert await closed_promptly(proxy.port, "dead.test") < 1.0
    (event,) = await proxy.access()
    assert event["outcome"] == "connect_failed"
    assert "refused" in event["reason"].lower() and event["backend"].startswith("127.0.0.1:")
    assert await who("127.0.0.1", proxy.port, "app.test", client_context(ca)) == "backend=app alpn=None"


async def test_unresolvable_dynamic_backend_closes_the_client(proxy, dns):
    assert await closed_promptly(proxy.port, "nowhere.test") < 2.0
    (event,) = await proxy.access()
    assert event["outcome"] == "resolve_failed" and "nxdomain" in event["reason"]
    assert dns.count("nowhere.test") >= 1


@contextlib.contextmanager
def black_hole(host: str, port: int) -> Iterator[None]:
    """A loopback address that drops every SYN: a listener whose accept queue (one place) is full."""
    with socket.socket() as hole, socket.socket() as filler:
        hole.bind((host, port))
        hole.listen(0)
        filler.connect((host, port))  # takes the queue's one place, never accepted
        yield


async def test_a_black_hole_address_gets_its_share_of_connect_timeout_then_the_next_serves(ca, dns, start_proxy):
    """A backend name with two addresses, the first a black hole (its SYNs are dropped): the proxy
    gives it up after its share of connect_timeout (half: two addresses), and the second serves the
    client. A loopback black hole: a listener whose accept queue is full drops every further SYN."""
    good = await TlsBackend("app", server_context(ca, "app.test"), host="127.0.0.3").start()
    try:
        with black_hole("127.0.0.2", good.port):
            dns.add("pair.test", ["127.0.0.2", "127.0.0.3"])
            port = free_port()
            proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                                + configs.table("default", [("app.test", f"pair.test:{good.port}")])
                                + configs.common(dns.address, limits={"connect_timeout": 2.0}))
            started = time.monotonic()
            assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
            took = time.monotonic() - started
            (event,) = await proxy.access()
            assert event["outcome"] == "closed" and event["backend"] == f"127.0.0.3:{good.port}", event
            # The black hole's share (1 s of 2), then the good address at once: not the whole timeout.
            assert 0.9 <= event["duration_ms"] / 1000 <= took < 1.9, (event, took)
    finally:
        await good.close()

def _busy(pid: int, seconds: float) -> float:
    """The share of one CPU the process used over the next `seconds` (blocking: call in a thread)."""
    cpu, wall = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)


async def test_bytes_after_the_hello_wait_unread_while_the_backend_is_slow(ca, dns, start_proxy):
    """A client sends its hello and more at once; the proxy then waits, first for a DNS server that
    does not answer, then (another connection) for a connect to a black hole. Its epoll is level-
    triggered: while it waits it must not be woken again and again by the unread bytes (it would spin
    at 100% CPU); once connected, every byte reaches the backend, in order."""
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()

    good = await asyncio.start_server(record, "127.0.0.3", 0)
    backend_port = good.sockets[0].getsockname()[1]
    try:
        with black_hole("127.0.0.2", backend_port):
            dns.add("pair.test", ["127.0.0.2", "127.0.0.3"])
            port = free_port()
            proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                                + configs.table("default", [("app.test", f"pair.test:{backend_port}"),
                                                            ("mute.test", f"mute.test:{backend_port}")])
                                + configs.common(dns.address, limits={"connect_timeout": 4.0}))
            extra = bytes(range(256)) * 64

            sent: list[bytes] = []

            async def send(sni: str) -> asyncio.StreamWriter:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                sent.append(real_client_hello(sni) + extra)
                writer.write(sent[-1])
                await writer.drain()
                return writer

            # The DNS server drops every query: the resolver waits its 1 s timeout, then gives up.
            dns.silent = True
            writer = await send("mute.test")
            await asyncio.sleep(0.2)
            busy = await asyncio.to_thread(_busy, proxy.proc.pid, 0.6)
            assert busy < 0.3, f"the proxy spins at {busy:.0%} CPU while a DNS query is out"
            (event,) = await proxy.access()
            assert event["outcome"] == "resolve_failed", event
            writer.close()
            dns.silent = False

            # The black hole's share of connect_timeout (2 s of 4), then the good address serves.
            writer = await send("app.test")
            await asyncio.sleep(0.3)
            busy = await asyncio.to_thread(_busy, proxy.proc.pid, 1.0)
            assert busy < 0.3, f"the proxy spins at {busy:.0%} CPU while a connect is in progress"
            writer.write_eof()
            (event,) = (await proxy.access(count=2))[1:]
            assert event["outcome"] == "closed" and event["backend"] == f"127.0.0.3:{backend_port}", event
            assert received == [sent[-1]]
    finally:
        good.close()
