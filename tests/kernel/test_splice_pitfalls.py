# Each known sockmap pitfall (measured on this kernel) with the test that shows the relay answers it:
# eager clients (bytes before/during insertion), half-close, bare FINs, resets, FIN before insertion
# (fallback to copy), and idleness learned from kernel counters.
from __future__ import annotations

import asyncio
import socket
import struct

from sniproxy.kernel.loader import DataPlane
from sniproxy.relay import Outcome

from .harness import listener, open_conn, payload, recv_stream, send_stream, sha


async def _eager(relay, cl, bl, seed: int, size: int) -> None:
    """The client streams right after its hello, without waiting for anything: bytes land in the
    receive queue before, during and after insertion. All must arrive once, in order."""
    loop = asyncio.get_running_loop()
    up = payload(seed, size)
    hello = b"eager-hello-%d\n" % seed
    client_send: list[asyncio.Task[str]] = []

    async def start_streaming(client: socket.socket, _proxy_side: socket.socket) -> None:
        client_send.append(asyncio.create_task(send_stream(client, up, chunk=64 * 1024)))
        await asyncio.sleep(0.0005)  # let bytes pile up in the proxy's receive queue

    conn = await open_conn(relay, cl, bl, hello=hello, before_relay=start_streaming)
    down = payload(seed + 1, size // 3)
    got_up, _, got_down = await asyncio.gather(
        recv_stream(conn.backend), send_stream(conn.backend, down), recv_stream(conn.client))
    await client_send[0]
    result = await asyncio.wait_for(conn.task, 30)
    conn.client.close()
    conn.backend.close()
    expected = conn.first + up[len(conn.first) - len(hello):]
    assert got_up == (len(hello) + len(up), sha(hello + up)), f"conn {seed}: client->backend corrupted"
    assert len(expected) == len(hello) + len(up)
    assert got_down == (len(down), sha(down))
    assert result.outcome is Outcome.CLOSED and result.mode == "splice"
    assert (result.bytes_up, result.bytes_down) == (got_up[0], got_down[0])
    del loop


async def test_eager_clients_keep_order_and_lose_nothing(relay, dataplane: DataPlane) -> None:
    cl, bl = listener(), listener()
    before = dataplane.traffic()
    await asyncio.wait_for(asyncio.gather(*(_eager(relay, cl, bl, i, 8_000_000) for i in range(16))), 90)
    after = dataplane.traffic()
    # The kernel did most of the work even though every connection started with bytes in flight.
    assert after.redir_bytes - before.redir_bytes > 0
    cl.close()
    bl.close()


async def test_half_close_reply_after_client_fin(relay) -> None:
    """Request, client FIN, then the reply: FIN is passed on only after the queue drained, and the
    bare FIN (zero-length skb) is never redirected, so the reverse direction stays usable."""
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    request = payload(3, 2_000_000)
    await send_stream(conn.client, request)  # ends with shutdown(SHUT_WR)
    got = await asyncio.wait_for(recv_stream(conn.backend), 10)  # EOF arrives after the last byte
    assert got == (len(conn.first) + len(request), sha(conn.first + request))
    reply = payload(4, 6_000_000)
    _, got_reply = await asyncio.gather(send_stream(conn.backend, reply), recv_stream(conn.client))
    assert got_reply == (len(reply), sha(reply))
    result = await asyncio.wait_for(conn.task, 10)
    assert result.outcome is Outcome.CLOSED
    assert (result.bytes_up, result.bytes_down) == (got[0], len(reply))
    for s in (conn.client, conn.backend, cl, bl):
        s.close()


async def test_backend_closes_first(relay) -> None:
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    loop = asyncio.get_running_loop()
    assert await recv_stream(conn.backend, len(conn.first)) == (len(conn.first), sha(conn.first))
    reply = payload(5, 3_000_000)
    await loop.sock_sendall(conn.backend, reply)
    conn.backend.close()  # full close right after the reply
    got = await asyncio.wait_for(recv_stream(conn.client), 10)
    assert got == (len(reply), sha(reply))
    conn.client.close()
    result = await asyncio.wait_for(conn.task, 10)
    assert result.bytes_down == len(reply)
    assert result.outcome in (Outcome.CLOSED, Outcome.CLIENT_RESET, Outcome.BACKEND_RESET)
    cl.close()
    bl.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _expect_reset_or_eof(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        while await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
            pass
    except ConnectionResetError:
        pass


async def test_client_reset_cuts_both_sides(relay) -> None:
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(conn.client, payload(6, 1_000_000))
    await recv_stream(conn.backend, len(conn.first) + 1_000_000)
    _reset(conn.client)
    await _expect_reset_or_eof(conn.backend)
    result = await asyncio.wait_for(conn.task, 10)
    assert result.outcome is Outcome.CLIENT_RESET
    assert result.bytes_up == len(conn.first) + 1_000_000
    for s in (conn.backend, cl, bl):
        s.close()


async def test_backend_reset_cuts_both_sides(relay) -> None:
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(conn.backend, payload(7, 500_000))
    await recv_stream(conn.client, 500_000)
    _reset(conn.backend)
    await _expect_reset_or_eof(conn.client)
    result = await asyncio.wait_for(conn.task, 10)
    assert result.outcome is Outcome.BACKEND_RESET
    assert result.bytes_down == 500_000
    for s in (conn.client, cl, bl):
        s.close()


async def test_fin_before_insertion_falls_back_to_copy(relay) -> None:
    """A socket that already got a FIN is not ESTABLISHED and the kernel would refuse it (EOPNOTSUPP,
    test_dataplane): the hand-off sees the FIN first, and the connection is copied instead, with the
    reason recorded."""
    cl, bl = listener(), listener()

    async def client_fin(client: socket.socket, proxy_client: socket.socket) -> None:
        client.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)  # the FIN reaches the proxy's socket

    conn = await open_conn(relay, cl, bl, before_relay=client_fin)
    got = await asyncio.wait_for(recv_stream(conn.backend), 10)
    assert got == (len(conn.first), sha(conn.first))
    reply = payload(8, 1_000_000)
    _, got_reply = await asyncio.gather(send_stream(conn.backend, reply), recv_stream(conn.client))
    assert got_reply == (len(reply), sha(reply))
    result = await asyncio.wait_for(conn.task, 10)
    assert result.mode == "copy"
    assert result.fallback_reason and "half-closed" in result.fallback_reason
    assert (result.bytes_up, result.bytes_down) == (len(conn.first), len(reply))
    for s in (conn.client, conn.backend, cl, bl):
        s.close()


async def test_idle_timeout_from_kernel_counters(relay) -> None:
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl, idle_timeout=0.6)
    loop = asyncio.get_running_loop()
    await recv_stream(conn.backend, len(conn.first))
    # Activity that only the kernel sees keeps the connection alive...
    for i in range(5):
        await loop.sock_sendall(conn.client, b"x" * 1000)
        await recv_stream(conn.backend, 1000)
        await asyncio.sleep(0.25)
    assert not conn.task.done()
    # ...silence ends it.
    t0 = loop.time()
    result = await asyncio.wait_for(conn.task, 5)
    assert result.outcome is Outcome.IDLE_TIMEOUT
    assert 0.2 < loop.time() - t0 < 2.0
    assert result.bytes_up == len(conn.first) + 5000
    for s in (conn.client, conn.backend, cl, bl):
        s.close()
