# Byte-exact splicing through the real kernel: both directions, many connections, and the map/counter
# bookkeeping that must agree with what the endpoints saw.
from __future__ import annotations

import asyncio
import random

from sniproxy.kernel.loader import DataPlane
from sniproxy.relay import Outcome

from .harness import listener, open_conn, payload, recv_stream, send_stream, sha


async def test_one_connection_both_directions_byte_exact(relay, dataplane: DataPlane) -> None:
    before = dataplane.traffic()
    cl, bl = listener(), listener()
    conn = await open_conn(relay, cl, bl)
    up, down = payload(1, 5_000_000), payload(2, 3_000_000)
    results = await asyncio.gather(
        send_stream(conn.client, up), recv_stream(conn.backend),
        send_stream(conn.backend, down), recv_stream(conn.client),
    )
    result = await asyncio.wait_for(conn.task, 10)
    assert results[1] == (len(conn.first) + len(up), sha(conn.first + up))
    assert results[3] == (len(down), sha(down))
    assert result.mode == "splice" and result.fallback_reason is None
    assert result.outcome is Outcome.CLOSED
    assert (result.bytes_up, result.bytes_down) == (len(conn.first) + len(up), len(down))
    after = dataplane.traffic()
    # The verdict saw every byte after `first` exactly once: redirected, or passed and forwarded by us.
    seen = (after.redir_bytes + after.pass_bytes) - (before.redir_bytes + before.pass_bytes)
    assert seen == result.bytes_up + result.bytes_down - len(conn.first)
    assert after.redir_bytes - before.redir_bytes > 0
    for s in (conn.client, conn.backend, cl, bl):
        s.close()


async def _roundtrip(relay, cl, bl, seed: int, up_size: int, down_size: int) -> None:
    conn = await open_conn(relay, cl, bl, hello=b"hello-%d\n" % seed)
    up, down = payload(seed, up_size), payload(seed + 100_000, down_size)
    _, got_up, _, got_down = await asyncio.gather(
        send_stream(conn.client, up), recv_stream(conn.backend),
        send_stream(conn.backend, down), recv_stream(conn.client),
    )
    result = await asyncio.wait_for(conn.task, 60)
    conn.client.close()
    conn.backend.close()
    assert got_up == (len(conn.first) + len(up), sha(conn.first + up)), seed
    assert got_down == (len(down), sha(down)), seed
    assert (result.mode, result.outcome) == ("splice", Outcome.CLOSED)
    assert (result.bytes_up, result.bytes_down) == (got_up[0], got_down[0])


async def test_200_concurrent_connections_random_sizes(relay, dataplane: DataPlane) -> None:
    rng = random.Random(7)
    cl, bl = listener(), listener()
    before = dataplane.traffic()
    sizes = [(rng.choice([0, 1, 100, rng.randrange(1, 3_000_000)]), rng.choice([0, 7, rng.randrange(1, 3_000_000)]))
             for _ in range(200)]
    await asyncio.wait_for(
        asyncio.gather(*(_roundtrip(relay, cl, bl, i, up, down) for i, (up, down) in enumerate(sizes))), 120)
    after = dataplane.traffic()
    hellos = sum(len(b"hello-%d\n" % i) for i in range(200))
    seen = (after.redir_bytes + after.pass_bytes) - (before.redir_bytes + before.pass_bytes)
    assert seen == sum(u + d for u, d in sizes)
    assert hellos > 0
    cl.close()
    bl.close()
