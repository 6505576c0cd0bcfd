# The adaptive hand-off (issue 12): a connection starts in the copy engine and enters the kernel once
# it moved [ebpf] splice_after bytes either way. Each point of a connection's life is tested byte-exact
# (SHA-256 both ways): before any byte, mid-stream with bytes read but not yet written, after one
# side's FIN; and a short connection never touches a BPF map.
from __future__ import annotations

import asyncio
import hashlib
import socket

from sniproxy.kernel.loader import DataPlane
from sniproxy.relay import Outcome, Relay

from .harness import listener, open_conn, payload, recv_stream, send_stream


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _both_ways(relay: Relay, size_up: int, size_down: int, **kw):
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl, **kw)
    up, down = payload(21, size_up), payload(22, size_down)
    _, got_up, _, got_down = await asyncio.wait_for(asyncio.gather(
        send_stream(conn.client, up), recv_stream(conn.backend),
        send_stream(conn.backend, down), recv_stream(conn.client)), 60)
    result = await asyncio.wait_for(conn.task, 10)
    assert got_up == (len(conn.first) + size_up, sha(conn.first + up))
    assert got_down == (size_down, sha(down))
    assert (result.bytes_up, result.bytes_down) == (len(conn.first) + size_up, size_down)
    for s in (conn.client, conn.backend, cl, bl):
        s.close()
    return result


async def test_a_short_connection_never_touches_a_map(dataplane: DataPlane) -> None:
    relay = Relay(dataplane.splice_table, splice_after=1 << 20)
    before = dataplane.traffic().as_dict()
    result = await _both_ways(relay, 100_000, 200_000)
    assert result.mode == "copy" and result.kernel_bytes == 0 and result.outcome is Outcome.CLOSED
    assert "splice_after" in result.fallback_reason
    assert dataplane.traffic().as_dict() == before, "the verdict saw a byte of a short connection"
    assert dataplane.splice_table.entries() == {"sock_map": 0, "splice_slots": 0}


async def test_hand_off_before_any_byte(dataplane: DataPlane) -> None:
    relay = Relay(dataplane.splice_table, splice_after=0)
    result = await _both_ways(relay, 20_000_000, 20_000_000)
    assert result.mode == "splice" and result.kernel_bytes > 0


async def test_hand_off_mid_stream_with_bytes_read_but_not_yet_written(dataplane: DataPlane) -> None:
    """The backend does not read at first, so the copy engine holds a chunk it read from the client
    and cannot write when the threshold is crossed: the hand-off waits for it, and order holds."""
    relay = Relay(dataplane.splice_table, splice_after=64 * 1024)
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    up = payload(23, 30_000_000)
    sending = asyncio.create_task(send_stream(conn.client, up))
    await asyncio.sleep(0.5)  # the backend's window and the proxy's send buffer fill: a chunk waits
    assert conn.backend.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < len(up) // 2
    got_up = await asyncio.wait_for(recv_stream(conn.backend), 60)
    await sending
    down = payload(24, 5_000_000)
    _, got_down = await asyncio.wait_for(asyncio.gather(send_stream(conn.backend, down),
                                                        recv_stream(conn.client)), 60)
    result = await asyncio.wait_for(conn.task, 10)
    assert got_up == (len(conn.first) + len(up), sha(conn.first + up))
    assert got_down == (len(down), sha(down))
    assert result.mode == "splice" and result.kernel_bytes > 0
    for s in (conn.client, conn.backend, cl, bl):
        s.close()


async def test_hand_off_after_one_sides_fin_stays_in_copy_and_says_why(dataplane: DataPlane) -> None:
    """The client half-closes before the threshold is reached by the backend's reply: a socket that
    got its FIN cannot enter sock_map, so the reply is copied, whole, and the log says why."""
    relay = Relay(dataplane.splice_table, splice_after=1 << 20)
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    up = payload(25, 300_000)
    await send_stream(conn.client, up)  # with its FIN
    got_up = await asyncio.wait_for(recv_stream(conn.backend), 30)
    reply = payload(26, 10_000_000)  # crosses splice_after after the client's FIN
    _, got_reply = await asyncio.wait_for(asyncio.gather(send_stream(conn.backend, reply),
                                                         recv_stream(conn.client)), 60)
    result = await asyncio.wait_for(conn.task, 10)
    assert got_up == (len(conn.first) + len(up), sha(conn.first + up))
    assert got_reply == (len(reply), sha(reply))
    assert result.mode == "copy" and result.outcome is Outcome.CLOSED
    assert result.fallback_reason
    for s in (conn.client, conn.backend, cl, bl):
        s.close()


async def test_hand_off_at_the_default_threshold_keeps_every_byte(dataplane: DataPlane) -> None:
    relay = Relay(dataplane.splice_table)
    result = await _both_ways(relay, 50_000_000, 30_000_000)
    assert result.mode == "splice"
    assert result.kernel_bytes > 0
