# When and how a copied connection enters the kernel. The copy phase stops at a quiet point (nothing
# read is unwritten, neither socket is read); from there: what already waits in each receive queue
# is read whole and written to the peer, both send streams are measured exactly, and the pair goes
# into the maps. Invariant (order): every byte userspace has read is in the peer's send stream before
# the socket enters sock_map, so what the verdict redirects afterwards can only follow it; a partly
# read skb is never left behind (the verdict would run it again from its start).
from __future__ import annotations

import asyncio
import dataclasses
import socket

from sniproxy.kernel.errors import SpliceError
from sniproxy.kernel.splice import SplicedPair, SpliceTable

from .copy import Flow
from .spliced import TCP_INQ, written_total_exact

_SO_SNDBUFFORCE = 32
# Bytes left in a receive queue before insertion must be read whole; this bounds what one recv may
# need (a short read means the queue was empty at that instant).
READ_BUFFER = 4 << 20
# Send buffer of a handed-off socket (SO_SNDBUFFORCE when allowed, else SO_SNDBUF up to wmem_max):
# the psock backlog retries a full send buffer only after one jiffy (4 ms at HZ=250), so one stream
# moves at most about this much per 4 ms (measured: 1 MiB 0.18-0.37x copy, 16 MiB 1.0-1.26x).
DEFAULT_SNDBUF = 16 << 20


@dataclasses.dataclass
class Inserted:
    pair: SplicedPair
    client_base: int  # written_total of each socket at insertion
    backend_base: int


class Refused(Exception):
    """The pair stays in userspace; the message says why (access log `splice_fallback`)."""


def read_waiting(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bool]:
    """What is in the receive queue now, read whole, and whether the FIN came behind it. Stops at
    the first short read: a client that keeps streaming would otherwise hold the event loop here."""
    chunks = []
    view = memoryview(buffer)
    while True:
        try:
            n = sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return b"".join(chunks), False
        if n == 0:
            return b"".join(chunks), True
        chunks.append(bytes(view[:n]))
        if n < len(buffer):
            return b"".join(chunks), False


def prepare(sock: socket.socket, sndbuf: int | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_INQ, 1)
    if sndbuf:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, sndbuf)
        except PermissionError:  # no CAP_NET_ADMIN: capped at net.core.wmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


async def flush_waiting(loop: asyncio.AbstractEventLoop, flows: tuple[Flow, Flow], buffer: bytearray) -> None:
    """Read what waits on each flow's source and write it to its destination (Flow.moved counts it).
    A FIN found behind it marks the flow eof: such a socket cannot enter sock_map."""
    for flow in flows:
        data, eof = read_waiting(flow.src, buffer)
        if data:
            flow.moved += len(data)
            await loop.sock_sendall(flow.dst, data)
        if eof:
            flow.eof = True


def insert(table: SpliceTable, client: socket.socket, backend: socket.socket,
           sndbuf: int | None) -> Inserted:
    """Put the quiet pair into the kernel maps. Raises Refused (nothing changed that copying cares
    about: a socket left in sock_map alone reads through its psock like any socket)."""
    try:
        prepare(client, sndbuf)
        prepare(backend, sndbuf)
        client_base, backend_base = written_total_exact(client), written_total_exact(backend)
        pair = table.add_pair(client, backend, a_toward=backend_base, b_toward=client_base)
    except SpliceError as exc:
        raise Refused(str(exc)) from exc
    except OSError as exc:
        raise Refused(f"preparing the sockets failed: {exc.strerror or exc}") from exc
    return Inserted(pair, client_base, backend_base)
