# Bytes through the proxy arrive complete and unaltered, both ways, with many connections at once;
# half-close keeps the other direction open.
from __future__ import annotations

import asyncio
import hashlib

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import DataBackend, data_client, pattern_chunks, pattern_digest, real_client_hello


def up_digest(up: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern_chunks(up, seed + 1):
        h.update(chunk)
    return h.hexdigest()


@pytest.fixture
async def data_backend():
    backend = await DataBackend().start()
    yield backend
    await backend.close()


def data_proxy_config(backend_port: int, port: int, **common) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("data.test", f"127.0.0.1:{backend_port}")])
            + configs.common(**common))


async def run_transfers(port: int, backend: DataBackend, sizes: list[tuple[int, int]],
                        after_eof: bool = False) -> None:
    results = await asyncio.gather(*(
        data_client("127.0.0.1", port, "data.test", up, down, seed=i, after_eof=after_eof)
        for i, (up, down) in enumerate(sizes)))
    for i, ((up, down), got) in enumerate(zip(sizes, results)):
        assert got == {"received": down, "sha256": pattern_digest(down, i)}, f"connection {i} downstream"
    expected_up = sorted(up_digest(up, i) for i, (up, _) in enumerate(sizes))
    assert sorted(r.get("sha256", r.get("error")) for r in backend.results) == expected_up


@pytest.mark.slow
async def test_fifty_connections_twenty_mb_each_way(data_backend, start_proxy, relay_mode):
    port = free_port()
    proxy = start_proxy(data_proxy_config(data_backend.port, port))
    sizes = [(20 << 20, 20 << 20)] * 50
    await run_transfers(port, data_backend, sizes)
    events = await proxy.access(count=50)
    assert all(e["outcome"] == "closed" for e in events)
    hello_len = events[0]["bytes_up"] - (20 << 20)
    assert hello_len > 0
    assert all(e["bytes_down"] == 20 << 20 for e in events)
    assert {e["relay"] for e in events} == {proxy.expected_relay}


async def test_reply_after_client_half_close(data_backend, start_proxy, relay_mode):
    # The client sends, then FINs, and only then does the backend answer: the answer must arrive.
    port = free_port()
    proxy = start_proxy(data_proxy_config(data_backend.port, port))
    await run_transfers(port, data_backend, [(3 << 20, 5 << 20), (1, 1 << 20), (0, 100)], after_eof=True)
    events = await proxy.access(count=3)
    assert {e["outcome"] for e in events} == {"closed"}
    assert {e["relay"] for e in events} == {proxy.expected_relay}


async def test_backend_that_speaks_first_loses_nothing(start_proxy, relay_mode):
    # The backend writes as soon as it accepts, racing the proxy's set-up of the client side.
    payload = bytes(range(256)) * 4096

    async def greet(reader, writer):
        writer.write(payload)
        await writer.drain()
        await reader.read()  # closing with unread bytes would be an abortive close (RST)
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = free_port()
    proxy = start_proxy(data_proxy_config(server.sockets[0].getsockname()[1], port))
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(real_client_hello("data.test"))
            writer.write_eof()
            async with asyncio.timeout(10):
                assert await reader.read() == payload
            writer.close()
        events = await proxy.access(count=20)
        assert all(e["bytes_down"] == len(payload) for e in events)
    finally:
        server.close()
