# A partial retransmit through the kernel path. TCP queues a segment that starts before rcv_nxt and
# ends after it whole, and tcp_read_skb hands the verdict whole skbs: without trim_overlap
# (ebpf/splice.c) the repeated head reaches the peer twice (found as 95,232 extra bytes at a client of
# the dashboard rig, about 1 run in 8). A hand-written TCP peer behind a TUN device sends exactly such
# a segment, in a namespace the test creates and deletes.
from __future__ import annotations

import asyncio
import os
import socket

from sniproxy.kernel.loader import DataPlane
from sniproxy.relay import Outcome, Relay
from tests.support.netns import netns, private_netns
from tests.support.tun_peer import LOCAL_IP, TunPeer

from .harness import payload, sha


async def _recv_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), timeout)
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


async def _recv_all(sock: socket.socket, timeout: float = 10) -> tuple[bytes, bool]:
    """(what arrived until EOF, False) or (what arrived until a reset, True)."""
    loop = asyncio.get_running_loop()
    out = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), timeout)
        except ConnectionResetError:
            return out, True
        if not chunk:
            return out, False
        out += chunk


async def _overlap_run(plane: DataPlane, data: bytes):
    """Hand a connection from the TUN peer to the kernel at once, then send data[:1000], wait for the
    backend to have it, retransmit data[500:2000] (500 bytes delivered already), send the rest and a
    FIN. Returns (what the backend got, whether it was reset, the relay's result, traffic delta)."""
    loop = asyncio.get_running_loop()
    relay = Relay(plane.splice_table, splice_after=0)
    before = plane.traffic().as_dict()
    with private_netns(f"spl-rtx-{os.getpid()}") as ns:
        peer = TunPeer(ns)
        with netns(ns):
            front = socket.create_server((LOCAL_IP, 0))
            back = socket.create_server(("127.0.0.1", 0))
            proxy_backend = socket.socket()
        socks = [front, back, proxy_backend]
        try:
            for s in socks:
                s.setblocking(False)
            peer.connect(front.getsockname()[1])
            proxy_client, _ = await asyncio.wait_for(loop.sock_accept(front), 5)
            await loop.sock_connect(proxy_backend, back.getsockname())
            backend, _ = await loop.sock_accept(back)
            socks += [proxy_client, backend]
            task = asyncio.create_task(relay.relay(proxy_client, proxy_backend, b"", 30))
            for _ in range(200):
                if plane.splice_table.entries()["sock_map"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert plane.splice_table.entries()["sock_map"] == 2, "the pair never reached the kernel"

            peer.send(0, data[:1000])
            first = await _recv_exactly(backend, 1000)
            peer.send(500, data[500:2000])  # seq < rcv_nxt < end_seq: a partial retransmit
            peer.send(2000, data[2000:])
            peer.fin(len(data))
            rest, reset = await _recv_all(backend)
            if not reset:
                backend.shutdown(socket.SHUT_WR)
            peer.drain()
            result = await asyncio.wait_for(task, 10)
        finally:
            for s in socks:
                s.close()
            peer.close()
    after = plane.traffic().as_dict()
    return first + rest, reset, result, {k: after[k] - before[k] for k in after}


async def test_a_partial_retransmit_reaches_the_peer_once(dataplane: DataPlane) -> None:
    data = payload(41, 3000)
    got, reset, result, delta = await _overlap_run(dataplane, data)
    assert not reset
    assert (len(got), sha(got)) == (len(data), sha(data)), "the repeated head was delivered twice"
    assert result.mode == "splice" and result.outcome is Outcome.CLOSED
    assert result.bytes_up == len(data)
    assert (delta["trim_pkts"], delta["trim_bytes"], delta["trim_fail"]) == (1, 500, 0)


async def test_an_uncuttable_retransmit_resets_the_pair_rather_than_corrupt_it() -> None:
    """The reset path: a verdict built unable to cut (SNIPROXY_TRIM_ROUNDS=0; real overlaps are far
    below the 4 MiB it can cut, so no real traffic reaches this path) must never pass on the repeated
    bytes. The backend gets the bytes before the retransmit and then a reset; the log says why."""
    pin_dir = f"/sys/fs/bpf/sniproxy-test-notrim-{os.getpid()}"
    plane = DataPlane.load(pin_dir, defines=("SNIPROXY_TRIM_ROUNDS=0",))
    try:
        data = payload(42, 3000)
        got, reset, result, delta = await _overlap_run(plane, data)
    finally:
        plane.close()
    assert not os.path.exists(pin_dir)
    assert reset, "the backend was not reset"
    assert got == data[:len(got)] and len(got) == 1000, f"{len(got)} bytes arrived, not the first 1000"
    assert result.outcome is Outcome.SPLICE_ERROR
    assert delta["trim_fail"] == 1 and delta["trim_pkts"] == 0
