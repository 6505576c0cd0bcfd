# Loopback rig for relay-level tests: a client, the test proxy's two sockets (handed to the relay
# exactly as the server does: first = what was read so far), and a backend, all non-blocking sockets
# on the test's event loop. Payloads are deterministic pseudo-random streams checked with sha256.
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import socket

from sniproxy.relay import RelayResult

_BLOCK = random.Random(1234).randbytes(1 << 20)


def payload(seed: int, size: int) -> bytes:
    """size bytes of a stream that depends on seed (cheap: slices of one random block)."""
    off = seed * 7919 % len(_BLOCK)
    out = bytearray()
    while len(out) < size:
        out += _BLOCK[off:off + size - len(out)]
        off = 0
    return bytes(out)


def listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0), backlog=1024)
    s.setblocking(False)
    _setup_locks.pop(s.fileno(), None)
    return s


@dataclasses.dataclass
class Conn:
    client: socket.socket
    backend: socket.socket
    task: asyncio.Task[RelayResult]
    first: bytes


async def open_conn(relay, client_listener: socket.socket, backend_listener: socket.socket, *,
                    hello: bytes = b"HELLO\n", idle_timeout: float = 30.0,
                    before_relay=None) -> Conn:
    """Connect a client, accept it, read its hello (as the server does), connect the backend, start
    relay.relay(). before_relay(client, proxy_client) runs just before the relay takes over."""
    loop = asyncio.get_running_loop()
    lock = _setup_locks.setdefault(client_listener.fileno(), asyncio.Lock())
    async with lock:  # accept must return this client, not a concurrent one
        return await _open_conn(relay, client_listener, backend_listener, hello, idle_timeout, before_relay)


_setup_locks: dict[int, asyncio.Lock] = {}


async def _open_conn(relay, client_listener, backend_listener, hello, idle_timeout, before_relay) -> Conn:
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, client_listener.getsockname())
    proxy_client, _ = await loop.sock_accept(client_listener)
    proxy_client.setblocking(False)
    if hello:
        await loop.sock_sendall(client, hello)
    first = b""
    while len(first) < len(hello):
        chunk = await loop.sock_recv(proxy_client, 65536)
        assert chunk, "client closed before its hello"
        first += chunk
    proxy_backend = socket.socket()
    proxy_backend.setblocking(False)
    await loop.sock_connect(proxy_backend, backend_listener.getsockname())
    backend, _ = await loop.sock_accept(backend_listener)
    backend.setblocking(False)
    if before_relay is not None:
        await before_relay(client, proxy_client)
    task = asyncio.create_task(relay.relay(proxy_client, proxy_backend, first, idle_timeout))
    return Conn(client, backend, task, first)


async def send_stream(sock: socket.socket, data: bytes, chunk: int = 256 * 1024, shut: bool = True) -> str:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        await loop.sock_sendall(sock, view[i:i + chunk])
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return hashlib.sha256(data).hexdigest()


async def recv_stream(sock: socket.socket, limit: int | None = None) -> tuple[int, str]:
    """Read until EOF (or limit bytes); return (count, sha256)."""
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    n = 0
    while limit is None or n < limit:
        data = await loop.sock_recv(sock, 1 << 20 if limit is None else min(1 << 20, limit - n))
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
