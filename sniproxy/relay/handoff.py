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
from collections.abc import Callable

from sniproxy.kernel.errors import SpliceError
from sniproxy.kernel.splice import SplicedPair, SpliceTable

from .copy import Flow
from .spliced import TCP_INQ, written_total_exact

_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
# Send buffer of a handed-off socket (the setsockopt value; the kernel doubles it, so 16 MiB in effect):
# the psock backlog retries a full send buffer only after one jiffy (4 ms at HZ=250), so one stream
# moves at most about a buffer per 4 ms (measured: 1 MiB 0.18-0.37x copy, 16 MiB 1.0-1.26x); 16 MiB
# per 4 ms is 4 GB/s, above one loopback stream here. Not more: the queue limit (24 MiB) counts the
# send queue too, and a bigger buffer would make the verdict hold whenever the reader lags a little.
DEFAULT_SNDBUF = 8 << 20
# Receive buffer of a handed-off socket (the setsockopt value, 4 MiB in effect): it bounds what one hold
# copies. The window closes once held bytes fill it, and relay.spliced._settle waits for that before the
# hold's one peek, so a hold copies about this much and the queue limit's worth goes through the kernel
# between two holds. Measured 2026-12-03 (bench/splice_throughput.py, bench/run_all.py bulk), share of
# a bulk upload the kernel moved: autotuning (up to net.ipv4.tcp_rmem[2], 32 MiB here) 57-75%, since a
# hold outgrew one peek and a fast sender kept it going; setsockopt 4 MiB: 80-85% toward 8 streams; 1 MiB 97%,
# but one stream then ran at 0.56x copy (its sender's window is this small); 2 MiB 84-99%, one stream
# 1.07x copy. None would keep autotuning.
HANDOFF_RCVBUF: int | None = 2 << 20


def kernel_buffer_size(rcvbuf: int | None) -> int:
    """The kernel phase's buffer (one per relay): bytes left in a receive queue before insertion are read
    whole, and a hold's bytes are peeked in one call, so it holds a full receive buffer (twice the
    setsockopt value) with room to spare. 4 MiB under autotuning (a hold then also reads outright)."""
    return 2 * rcvbuf + (1 << 20) if rcvbuf else 4 << 20


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


def _sysctl_ints(name: str) -> list[int]:
    try:
        with open(f"/proc/sys/{name.replace('.', '/')}") as f:
            return [int(v) for v in f.read().split()]
    except (OSError, ValueError):
        return []


@dataclasses.dataclass(frozen=True)
class BufferSizes:
    """What prepare() sets on a handed-off socket, decided once per process: a setsockopt value, or
    None to leave the kernel's autotuning alone, and why (logged once by the relay)."""
    sndbuf: int | None
    rcvbuf: int | None
    note: str

    @classmethod
    def plan(cls, sndbuf: int | None, rcvbuf: int | None, *, privileged: bool | None = None,
             sysctl: Callable[[str], list[int]] | None = None) -> BufferSizes:
        """Without CAP_NET_ADMIN a size is capped at net.core.{w,r}mem_max, and a locked buffer stops
        autotuning: where the cap would lock a buffer below what autotuning reaches (tcp_{w,r}mem[2],
        in effect twice the setsockopt value), autotuning is kept. With the capability, *BUFFORCE."""
        privileged = _has_net_admin() if privileged is None else privileged
        sysctl = sysctl or _sysctl_ints
        notes = []

        def pick(name: str, want: int | None, core_max: str, tcp_mem: str) -> int | None:
            if not want or privileged:
                return want
            cap = (sysctl(core_max) or [0])[0]
            auto = (sysctl(tcp_mem) or [0, 0, 0])[-1]
            if want <= cap:
                return want
            if cap * 2 >= auto:
                notes.append(f"{name} capped at {core_max} = {cap}")
                return cap
            notes.append(f"{name} left to autotuning (up to {tcp_mem}[2] = {auto}): {core_max} = {cap} "
                         f"would lock it lower, and {name}FORCE needs CAP_NET_ADMIN")
            return None

        snd = pick("SO_SNDBUF", sndbuf, "net.core.wmem_max", "net.ipv4.tcp_wmem")
        rcv = pick("SO_RCVBUF", rcvbuf, "net.core.rmem_max", "net.ipv4.tcp_rmem")
        return cls(snd, rcv, "; ".join(notes) or ("as configured (CAP_NET_ADMIN)" if privileged else "as configured"))


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except (OSError, ValueError):
        pass
    return False


def prepare(sock: socket.socket, sizes: BufferSizes) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_INQ, 1)
    for size, force, plain in ((sizes.sndbuf, _SO_SNDBUFFORCE, socket.SO_SNDBUF),
                               (sizes.rcvbuf, _SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        if size:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:  # the plan saw no CAP_NET_ADMIN only if it was lost since
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


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
           sizes: BufferSizes) -> Inserted:
    """Put the quiet pair into the kernel maps. Raises Refused (nothing changed that copying cares
    about: a socket left in sock_map alone reads through its psock like any socket)."""
    try:
        prepare(client, sizes)
        prepare(backend, sizes)
        client_base, backend_base = written_total_exact(client), written_total_exact(backend)
        pair = table.add_pair(client, backend, a_toward=backend_base, b_toward=client_base)
    except SpliceError as exc:
        raise Refused(str(exc)) from exc
    except OSError as exc:
        raise Refused(f"preparing the sockets failed: {exc.strerror or exc}") from exc
    return Inserted(pair, client_base, backend_base)
