# The local-backend short-circuit ([ebpf] shortcut_cgroup) at the relay level, on the real kernel: a
# backend listening in a throwaway cgroup, the relay in copy and in splice mode, the kernel sending
# the backend's replies straight to the client socket. Each pitfall of the design has a test: order,
# half-close both ways, resets both ways, a non-blocking backend facing a slow client, sendfile, a full
# map, and a socket the proxy did not open (never captured, shown from the map contents). Cleanup
# (nothing attached, nothing pinned, no cgroup left) is checked by the fixtures themselves.
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from sniproxy.kernel.loader import DataPlane
from sniproxy.kernel.shortcut import CAPTURED, REFUSED, ShortcutMaps, key_text
from sniproxy.relay import Outcome, Relay
from sniproxy.relay.shortcut import Shortcut

from . import cgroups
from .harness import payload, recv_stream, send_stream, sha


def bpftool_cgroup(path: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", path], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out) if out.strip() else []


@contextlib.contextmanager
def loaded(cgroup: str, pin_dir: str, **sizes: int) -> Iterator[ShortcutMaps]:
    """A ShortcutMaps for the block; afterwards nothing of it may be attached or pinned."""
    maps = ShortcutMaps.load(cgroup, pin_dir, **sizes)
    try:
        assert [p["name"] for p in bpftool_cgroup(cgroup)] == ["shortcut_ops"]
        yield maps
    finally:
        maps.close()
        assert bpftool_cgroup(cgroup) == [], "shortcut_ops still attached after close()"
        for name in ("shortcut_conns", "shortcut_socks", "shortcut_peers", "shortcut_stats"):
            assert not os.path.exists(os.path.join(pin_dir, name)), f"{name} left pinned"


@pytest.fixture(scope="module")
def cgroup() -> Iterator[str]:
    with cgroups.temporary("relay") as path:
        yield path


@pytest.fixture(scope="module")
def shortcut_maps(cgroup: str, pin_dir: str) -> Iterator[ShortcutMaps]:
    with loaded(cgroup, pin_dir + "-shortcut") as maps:
        yield maps


@pytest.fixture(params=["copy", "splice"])
def relay(request, dataplane: DataPlane, shortcut_maps: ShortcutMaps, cgroup: str) -> Iterator[Relay]:
    """Client -> backend by copy or by the egress splice (handed off at once); backend -> client by
    the short-circuit. Every test leaves the short-circuit's maps as empty as it found them."""
    relay = Relay() if request.param == "copy" else Relay(dataplane.splice_table, splice_after=0)
    relay.shortcut = Shortcut(shortcut_maps, cgroup)
    yield relay
    assert shortcut_maps.registered() == []
    assert shortcut_maps.captured_keys() == []


def backend_listener(cgroup: str) -> socket.socket:
    """A listening socket owned by `cgroup`: the connections it accepts pass its sock_ops program."""
    with cgroups.inside(cgroup):
        s = socket.create_server(("127.0.0.1", 0), backlog=128)
    s.setblocking(False)
    return s


def client_listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0), backlog=128)
    s.setblocking(False)
    return s


class Pair:
    def __init__(self, client, backend, task, first, ticket, proxy_port) -> None:  # noqa: ANN001
        self.client, self.backend, self.task, self.first = client, backend, task, first
        self.ticket, self.proxy_port = ticket, proxy_port

    def close(self) -> None:
        self.client.close()
        self.backend.close()


async def open_pair(relay: Relay, cl: socket.socket, bl: socket.socket, hello: bytes = b"HELLO\n",
                    idle_timeout: float = 30.0, before_relay=None) -> Pair:  # noqa: ANN001
    """As the server does it: accept the client, read its hello, bind + register + connect the
    backend socket, start relay.relay() with the ticket."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, cl.getsockname())
    proxy_client, _ = await loop.sock_accept(cl)
    proxy_client.setblocking(False)
    await loop.sock_sendall(client, hello)
    first = b""
    while len(first) < len(hello):
        first += await loop.sock_recv(proxy_client, 65536)
    proxy_backend = socket.socket()
    proxy_backend.setblocking(False)
    ticket = relay.shortcut.prepare(proxy_client, proxy_backend, bl.getsockname())
    assert not isinstance(ticket, str), ticket
    await loop.sock_connect(proxy_backend, bl.getsockname())
    backend, _ = await loop.sock_accept(bl)
    backend.setblocking(False)
    if before_relay is not None:
        await before_relay(backend)
    task = asyncio.create_task(relay.relay(proxy_client, proxy_backend, first, idle_timeout, ticket=ticket))
    return Pair(client, backend, task, first, ticket, proxy_backend.getsockname()[1])


async def test_download_goes_by_the_shortcut_byte_exact(relay: Relay, cgroup: str,
                                                        shortcut_maps: ShortcutMaps) -> None:
    cl, bl = client_listener(), backend_listener(cgroup)
    before = shortcut_maps.stats()
    pair = await open_pair(relay, cl, bl)
    assert await recv_stream(pair.backend, len(pair.first)) == (len(pair.first), sha(pair.first))
    reply = payload(1, 64_000_000)
    _, got = await asyncio.gather(send_stream(pair.backend, reply), recv_stream(pair.client))
    assert got == (len(reply), sha(reply))
    pair.client.shutdown(socket.SHUT_WR)
    assert await recv_stream(pair.backend) == (0, sha(b""))
    result = await asyncio.wait_for(pair.task, 10)
    pair.close()
    assert result.outcome is Outcome.CLOSED
    assert result.shortcut and result.shortcut_bytes == len(reply), result
    assert result.bytes_down == len(reply) and result.bytes_up == len(pair.first)
    after = shortcut_maps.stats()
    assert after.captured - before.captured == 1
    # The verdict's own count is at least the bytes (a part resent by a non-blocking backend counts
    # again: ebpf/shortcut.h); the relay's count above is exact.
    assert after.redir_bytes - before.redir_bytes >= len(reply)
    cl.close()
    bl.close()
