# Bad or slow clients get a defined outcome, and the proxy keeps serving a normal client meanwhile.
from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, real_client_hello, server_context, who


@pytest.fixture
async def app_backend(ca):
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    yield backend
    await backend.close()


@pytest.fixture
def proxy(app_backend, start_proxy):
    port = free_port()
    p = start_proxy(configs.listener(f"127.0.0.1:{port}")
                    + configs.table("default", [("app.test", f"127.0.0.1:{app_backend.port}")])
                    + configs.common(limits={"client_hello_timeout": 2.0}))
    p.port = port
    return p


async def normal_client_works(proxy, ca) -> None:
    assert await who("127.0.0.1", proxy.port, "app.test", client_context(ca)) == "backend=app alpn=None"


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",          # plain HTTP on the TLS port
    b"\x80\x2e\x01\x00\x02" + bytes(43),                   # SSLv2-style hello
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",            # handshake record, but a ServerHello
    b"\x16\x03\x01\x40\x01" + bytes(100),                   # record longer than TLS allows
])
async def test_garbage_first_packet_is_closed_and_others_still_served(proxy, ca, garbage):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(garbage)
    answer = await read_until_closed(reader, 5)
    writer.close()
    # Not TLS: closed without a word; TLS-shaped but wrong: a fatal alert record, then closed.
    assert answer == b"" or (answer[0] == 0x15 and answer[5] == 2 and len(answer) == 7)
    (event,) = await proxy.access()
    assert event["outcome"] == "bad_client_hello" and event["reason"]
    await normal_client_works(proxy, ca)


def _dribbled_tls_who(port: int, ca_ctx: ssl.SSLContext, sni: str) -> str:
    """A real TLS client whose ClientHello leaves one byte per TCP segment, then a normal handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ca_ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outgoing.read()
        for i in range(len(hello)):
            sock.sendall(hello[i:i + 1])
            time.sleep(0.0005)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during handshake")
                incoming.write(data)
        tls.write(b"WHO\n")
        sock.sendall(outgoing.read())
        answer = b""
        while not answer.endswith(b"\n"):
            try:
                answer += tls.read(1024)
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                incoming.write(sock.recv(65536))
        return answer.decode().strip()


async def test_client_hello_one_byte_per_segment_still_works(proxy, ca):
    answer = await asyncio.to_thread(_dribbled_tls_who, proxy.port, client_context(ca), "app.test")
    assert answer == "backend=app alpn=None"
    (event,) = await proxy.access()
    assert event["outcome"] == "closed" and event["sni"] == "app.test"


async def test_client_hello_that_never_completes_is_closed_at_the_deadline(proxy, ca):
    hello = real_client_hello("app.test")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(hello[:-10])
    started = time.monotonic()
    assert await read_until_closed(reader, 10) == b""
    waited = time.monotonic() - started
    assert 1.5 < waited < 6, waited  # client_hello_timeout is 2 s
    writer.close()
    (event,) = await proxy.access()
    assert event["outcome"] == "hello_timeout" and event["state"] == "reading_hello"


async def test_500_idle_connections_do_not_block_a_normal_client(proxy, ca):
    idle = []
    for i in range(500):
        idle.append(await asyncio.open_connection("127.0.0.1", proxy.port))
        if i % 2:  # half of them send the start of a hello, the rest send nothing at all
            idle[-1][1].write(b"\x16\x03\x01")
    started = time.monotonic()
    await normal_client_works(proxy, ca)
    assert time.monotonic() - started < 1.5, "the normal client waited on the idle ones"
    # Every idle connection is closed at the hello deadline.
    closed = await asyncio.gather(*(read_until_closed(r, 10) for r, _ in idle))
    assert closed == [b""] * 500
    for _, writer in idle:
        writer.close()
    events = await proxy.access(count=501)
    outcomes = [e["outcome"] for e in events]
    assert outcomes.count("hello_timeout") == 500 and outcomes.count("closed") == 1
