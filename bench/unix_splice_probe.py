"""Does the kernel splice (sock_map + the sk_skb verdict of ebpf/splice.c) take a unix stream socket as
the backend side of a pair? Run as root: `.venv/bin/python bench/unix_splice_probe.py`.

It builds one TCP client <-> proxy pair and one proxy <-> unix-socket backend pair on loopback, puts
the proxy's two sockets into sock_map with SpliceTable.add_pair (released from the start, as the
hand-off does), sends a payload each way and reports, per direction, how many bytes arrived intact
and how many the verdict redirected (splice_slot.redir_bytes) versus left to userspace (pass_bytes).
It repeats the backend -> client direction with the unix side's slot keyed by the cookie of the
backend's own end, to show what the verdict keys on, and then tries the socket options the hand-off
needs on the unix socket (TCP_INQ, TCP_INFO, SIOCOUTQ). Everything it loads is detached and unpinned
on the way out.
"""
from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import sys
import tempfile
import time
import fcntl
import termios

from sniproxy.kernel.loader import DataPlane
from sniproxy.kernel.splice import socket_cookie

PIN_DIR = f"/sys/fs/bpf/sniproxy-unix-probe-{os.getpid()}"
SIZE = 4 << 20
# The second run's queue_limit, below SIZE, shows the queue bound toward a unix peer: the verdict
# measures it with the peer's tcp_sock.bytes_acked, which a unix socket does not have (read as 0).
SMALL_QUEUE_LIMIT = 1 << 20


def recv_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
        chunk = sock.recv(size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def send_all(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    sock.sendall(data)


def peer_keyed(plane: DataPlane, proxy_client: socket.socket, client: socket.socket,
               backend: socket.socket) -> None:
    """The same backend -> client direction, with the unix side's entries keyed by the cookie of the
    *sending* socket (the backend server's end): a unix skb is charged to its sender, so that is the
    cookie bpf_get_socket_cookie(skb) sees in the verdict. A real proxy would have to find that
    cookie through sock_diag (UNIX_DIAG_PEER + udiag_cookie); here the test owns both ends."""
    import ctypes as ct
    from sniproxy.kernel import maps
    from sniproxy.relay.spliced import written_total_exact

    table = plane.splice_table
    b = socket_cookie(backend)
    index = table._free.popleft()  # one spare slot of this process's share
    slot = table.slot(index)
    ct.memset(ct.addressof(slot), 0, ct.sizeof(slot))
    slot.cookie, slot.peer = b, socket_cookie(proxy_client)
    slot.toward_base = written_total_exact(proxy_client)
    maps.update(plane.fds["splice_slots"], ct.c_uint64(b), ct.c_uint32(index))
    import threading
    data = os.urandom(SIZE)
    sender = threading.Thread(target=send_all, args=(backend, data))
    started = time.monotonic()
    sender.start()
    got = recv_exactly(client, len(data))
    sender.join()
    intact = hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    print(f"keyed by the unix peer's cookie: unix backend->client {len(got)}/{len(data)} bytes, sha256 "
          f"{'equal' if intact else 'DIFFERENT'}, {(time.monotonic() - started) * 1000:.1f} ms; "
          f"redir_bytes={slot.redir_bytes} pass_bytes={slot.pass_bytes}")
    maps.delete(plane.fds["splice_slots"], ct.c_uint64(b))
    table._free.append(index)


def main() -> int:
    print(f"kernel {os.uname().release}")
    print("-- run 1: default queue_limit, both directions, then the unix side keyed by its peer's cookie")
    probe(None, both_ways=True)
    print(f"-- run 2: queue_limit {SMALL_QUEUE_LIMIT}, client -> unix backend only")
    probe(SMALL_QUEUE_LIMIT, both_ways=False)
    return 0


def probe(queue_limit: int | None, both_ways: bool) -> None:
    tcp_listener = socket.create_server(("127.0.0.1", 0))
    tmp = tempfile.mkdtemp(prefix="unix-probe-")
    path = os.path.join(tmp, "backend.sock")
    unix_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_listener.bind(path)
    unix_listener.listen()
    client = socket.create_connection(tcp_listener.getsockname())
    proxy_client, _ = tcp_listener.accept()
    proxy_backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proxy_backend.connect(path)
    backend, _ = unix_listener.accept()
    print(f"unix socket cookie: {socket_cookie(proxy_backend)}")
    # The hand-off's per-socket calls (relay/handoff.py prepare(), written_total_exact), on it.
    for label, call in (
        ("setsockopt TCP_INQ", lambda: proxy_backend.setsockopt(socket.IPPROTO_TCP, 36, 1)),
        ("getsockopt TCP_INFO", lambda: proxy_backend.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)),
        ("ioctl SIOCOUTQ", lambda: struct.unpack("i", fcntl.ioctl(proxy_backend.fileno(), termios.TIOCOUTQ,
                                                                  b"\0\0\0\0"))[0]),
    ):
        try:
            print(f"{label} on the unix socket: ok ({call()!r:.40})")
        except OSError as exc:
            print(f"{label} on the unix socket: {exc}")
    plane = DataPlane.load(PIN_DIR, queue_limit=queue_limit)
    pair = None
    try:
        table = plane.splice_table
        try:
            # toward bases: written_total() of the TCP client socket; the unix one has none (TCP_INFO).
            pair = table.add_pair(proxy_client, proxy_backend, a_toward=0, b_toward=0)
        except Exception as exc:  # noqa: BLE001 - the question is exactly whether this raises
            print(f"add_pair(tcp, unix) refused: {exc}")
            return
        print(f"add_pair(tcp, unix): accepted; entries {table.entries()}")
        up = os.urandom(SIZE)
        down = os.urandom(SIZE)
        directions = [("client->unix backend", client, backend, up)]
        if both_ways:
            directions.append(("unix backend->client", backend, client, down))
        for name, src, dst, data in directions:
            started = time.monotonic()
            import threading
            sender = threading.Thread(target=send_all, args=(src, data))
            sender.start()
            got = recv_exactly(dst, len(data))
            sender.join()
            elapsed = time.monotonic() - started
            intact = hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
            print(f"{name}: {len(got)}/{len(data)} bytes arrived, sha256 {'equal' if intact else 'DIFFERENT'}"
                  f", {elapsed * 1000:.1f} ms")
        for label, st in (("tcp client side", pair.a), ("unix backend side", pair.b)):
            print(f"{label}: rx_bytes={st.rx_bytes} redir_bytes={st.redir_bytes} pass_bytes={st.pass_bytes}"
                  f" held_pkts={st.held_pkts}")
        print(f"verdict runs on skbs of unknown sockets (traffic_stats.unknown_pkts): "
              f"{plane.traffic().unknown_pkts}")
        # What the proxy itself would have to read: anything the verdict passed is in the psock.
        for label, sock in (("proxy tcp", proxy_client), ("proxy unix", proxy_backend)):
            sock.setblocking(False)
            try:
                left = len(sock.recv(SIZE))
            except BlockingIOError:
                left = 0
            print(f"{label} socket: {left} bytes left for userspace to read")
        if both_ways:
            peer_keyed(plane, proxy_client, client, backend)
    finally:
        for s in (client, proxy_client, proxy_backend, backend, tcp_listener, unix_listener):
            s.close()
        if pair is not None:
            plane.splice_table.remove(pair)
        plane.close()
    os.unlink(path)
    os.rmdir(tmp)


if __name__ == "__main__":
    sys.exit(main())
