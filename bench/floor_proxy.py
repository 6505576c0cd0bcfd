#!/usr/bin/env python3
"""The floor of a Python SNI proxy on uvloop: the least per-connection work that still does the job,
to measure beside ours in one `make bench` run (target `python-floor`, rate and latency only).

It accepts, reads the ClientHello in one recv, finds the SNI by a plain byte scan (no validation, no
limits, no deadlines, no PROXY protocol, no metrics, no log), looks the backend up in a dict,
connects, forwards, and relays with half-close through the loop's own add_reader, assuming every
send completes (true for the 1-byte answers of the rate workload; never for bulk). Not a product:
what it leaves out is what ours must keep, so the gap between the two is the price of those
behaviours, and this floor is how far trimming our code alone can go on this machine.

    floor_proxy.py PROCESSES PORT SNI=BACKEND_PORT [SNI=BACKEND_PORT ...]

PROCESSES processes share the listening socket, as ours does with `workers = "auto"`.
"""
from __future__ import annotations

import errno
import os
import socket
import sys

import uvloop


def server_name(hello: bytes) -> bytes | None:
    """The SNI of a ClientHello that arrived whole, by offsets only (a floor: no checks beyond bounds)."""
    try:
        p = 9 + 34
        p += 1 + hello[p]
        p += 2 + (hello[p] << 8 | hello[p + 1])
        p += 1 + hello[p]
        end = p + 2 + (hello[p] << 8 | hello[p + 1])
        p += 2
        while p + 4 <= end:
            kind, length = hello[p] << 8 | hello[p + 1], hello[p + 2] << 8 | hello[p + 3]
            if kind == 0:
                n = hello[p + 7] << 8 | hello[p + 8]
                return hello[p + 9:p + 9 + n]
            p += 4 + length
    except IndexError:
        pass
    return None


class Pair:
    __slots__ = ("loop", "client", "backend", "cfd", "bfd", "open")

    def __init__(self, loop, client: socket.socket, backend: socket.socket) -> None:  # noqa: ANN001
        self.loop, self.client, self.backend = loop, client, backend
        self.cfd, self.bfd = client.fileno(), backend.fileno()
        self.open = 2
        loop.add_reader(self.cfd, self.pump, client, backend, self.cfd)
        loop.add_reader(self.bfd, self.pump, backend, client, self.bfd)

    def pump(self, src: socket.socket, dst: socket.socket, fd: int) -> None:
        try:
            data = src.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                dst.send(data)
            except OSError:
                pass
            return
        self.loop.remove_reader(fd)
        self.open -= 1
        if self.open:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        self.client.close()
        self.backend.close()


def main() -> None:
    processes, port = int(sys.argv[1]), int(sys.argv[2])
    routes = {}
    for arg in sys.argv[3:]:
        name, _, backend_port = arg.partition("=")
        routes[name.encode()] = ("127.0.0.1", int(backend_port))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    for _ in range(processes - 1):
        if os.fork() == 0:
            break
    loop = uvloop.new_event_loop()

    def hello_ready(client: socket.socket) -> None:
        loop.remove_reader(client.fileno())
        start(client)

    def start(client: socket.socket) -> None:
        try:
            hello = client.recv(65536)
        except BlockingIOError:
            loop.add_reader(client.fileno(), hello_ready, client)
            return
        target = routes.get(server_name(hello)) if hello else None
        if target is None:
            client.close()
            return
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = backend.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            client.close()
            backend.close()
            return
        try:
            backend.send(hello)
        except BlockingIOError:
            loop.add_writer(backend.fileno(), connected, client, backend, hello)
            return
        Pair(loop, client, backend)

    def connected(client: socket.socket, backend: socket.socket, hello: bytes) -> None:
        loop.remove_writer(backend.fileno())
        try:
            backend.send(hello)
        except OSError:
            client.close()
            backend.close()
            return
        Pair(loop, client, backend)

    def accept() -> None:
        for _ in range(64):
            try:
                fd, _address = listener._accept()
            except BlockingIOError:
                return
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            start(client)

    loop.add_reader(listener.fileno(), accept)
    print("listening", flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main()
