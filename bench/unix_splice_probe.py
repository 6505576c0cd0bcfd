"""Does the kernel splice (sock_map + the sk_skb verdict of ebpf/splice.c) take a unix stream socket as
the backend side of a pair? Run as root: `.venv/bin/python bench/unix_splice_probe.py`.

It builds one TCP client <-> proxy pair and one proxy <-> unix-socket backend pair on loopback, puts
the proxy's two sockets into sock_map with SpliceTable.add_pair (released from the start, as
SpliceRelay does), sends a payload each way and reports, per direction, how many bytes arrived intact
and how many the verdict redirected (conn_stats.redir_bytes) versus left to userspace (pass_bytes).
It then tries the socket options SpliceRelay needs on the unix socket (TCP_INQ, TCP_INFO, SIOCOUTQ).
Everything it loads is detached and unpinned on the way out.
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


def peer_keyed(plane: DataPlane, proxy_client: socket.socket, proxy_backend: socket.socket,
               client: socket.socket, backend: socket.socket) -> None:
    """The same backend -> client direction, with the unix side's entries keyed by the cookie of the
    *sending* socket (the backend server's end): a unix skb is charged to its sender, so that is the
    cookie bpf_get_socket_cookie(skb) sees in the verdict. A real proxy would have to find that
    cookie through sock_diag (UNIX_DIAG_PEER + udiag_cookie); here the test owns both ends."""
    import ctypes as ct
    from sniproxy.kernel import maps

    f = plane.fds
    a, b = socket_cookie(proxy_client), socket_cookie(backend)
    proxy_client.setblocking(True)
    for fd, cookie, peer in ((proxy_client.fileno(), a, b), (proxy_backend.fileno(), b, a)):
        maps.update(f["sk_cookie"], ct.c_int(fd), maps.SockTag(cookie))
        maps.update(f["conn_stats"], ct.c_uint64(cookie), maps.ConnStats(peer=peer))
        maps.update(f["conn_ctl"], ct.c_uint64(cookie), maps.ConnCtl(0, 0, 0))
        maps.update(f["conn_map"], ct.c_uint64(cookie), ct.c_uint64(peer))
    maps.update(f["sock_map"], ct.c_uint64(a), ct.c_uint32(proxy_client.fileno()))
    maps.update(f["sock_map"], ct.c_uint64(b), ct.c_uint32(proxy_backend.fileno()))
    import threading
    data = os.urandom(SIZE)
    sender = threading.Thread(target=send_all, args=(backend, data))
    started = time.monotonic()
    sender.start()
    got = recv_exactly(client, len(data))
    sender.join()
    st = plane.splice_table.stats(b)
    intact = hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    print(f"keyed by the unix peer's cookie: unix backend->client {len(got)}/{len(data)} bytes, sha256 "
          f"{'equal' if intact else 'DIFFERENT'}, {(time.monotonic() - started) * 1000:.1f} ms; "
          f"redir_bytes={st.redir_bytes if st else None} pass_bytes={st.pass_bytes if st else None}")
    for cookie in (a, b):
        maps.delete(f["sock_map"], ct.c_uint64(cookie))
        for name in ("conn_map", "conn_ctl", "conn_stats"):
            maps.delete(f[name], ct.c_uint64(cookie))


def main() -> int:
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
    print(f"kernel {os.uname().release}")
    print(f"unix socket cookie: {socket_cookie(proxy_backend)}")
    plane = DataPlane.load(PIN_DIR)
    try:
        table = plane.splice_table
        try:
            pair = table.add_pair(proxy_client, proxy_backend, release_at=0)
        except Exception as exc:  # noqa: BLE001 - the question is exactly whether this raises
            print(f"add_pair(tcp, unix) refused: {exc}")
            return 0
        print(f"add_pair(tcp, unix): accepted; entries {table.entries()}")
        up = os.urandom(SIZE)
        down = os.urandom(SIZE)
        for name, src, dst, data in (("client->unix backend", client, backend, up),
                                     ("unix backend->client", backend, client, down)):
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
        for label, cookie in (("tcp client side", pair.a_cookie), ("unix backend side", pair.b_cookie)):
            st = table.stats(cookie)
            assert st is not None
            print(f"{label}: rx_bytes={st.rx_bytes} redir_bytes={st.redir_bytes} pass_bytes={st.pass_bytes}"
                  f" tx_bytes={st.tx_bytes}")
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
        table.remove(pair)
        peer_keyed(plane, proxy_client, proxy_backend, client, backend)
    finally:
        plane.close()
    # SpliceRelay's per-socket calls, on the unix socket.
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
    for s in (client, proxy_client, proxy_backend, backend, tcp_listener, unix_listener):
        s.close()
    os.unlink(path)
    os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
