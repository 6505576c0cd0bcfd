# Owns where listening sockets come from: bound here (one process), bound once by a supervisor and
# shared by all its workers (WorkerSockets), or handed by that supervisor to a worker over a unix
# socket with SCM_RIGHTS (offer / WorkerInbox) when a reload adds listeners.
# Invariant: acquire() is all or nothing: one socket per listener asked for, in order, or ListenerError
# with nothing left open; every socket offered and not taken is closed by the taker.
from __future__ import annotations

import array
import errno
import json
import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

from sniproxy.config import ListenerConfig

__all__ = [
    "ListenerError",
    "ListenerSource",
    "LocalBinder",
    "WorkerInbox",
    "WorkerSockets",
    "bind_listener",
    "listener_name",
    "offer",
    "ungated",
]

# One sendmsg carries at most SCM_MAX_FD (253) descriptors; larger offers go in several messages.
_FDS_PER_MESSAGE = 200
_MESSAGE_SIZE = 65536


class ListenerError(Exception):
    """A listener could not be had; the message names it and says why."""


def listener_name(listener: ListenerConfig) -> str:
    return str(listener.bind)  # "127.0.0.1:8443" / "[::1]:8443", as Address prints itself


def bind_listener(listener: ListenerConfig, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.bind.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]" means IPv6 only; an IPv4 listener is configured separately, so both can coexist.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.bind.host, listener.bind.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _why(listener: ListenerConfig, exc: OSError) -> str:
    reason = f"cannot bind {listener_name(listener)}: {exc.strerror or exc}"
    if exc.errno == errno.EACCES and listener.bind.port < 1024:
        # The capabilities were dropped once the first listeners were bound (docs/operations.md).
        reason += (" (a port below 1024 needs CAP_NET_BIND_SERVICE, which the proxy drops after start: "
                   "restart it to add this listener, or lower net.ipv4.ip_unprivileged_port_start)")
    return reason


def ungated(listeners: Iterable[ListenerConfig], gated_ports: frozenset[int] | None) -> str | None:
    """Why the running XDP filter would not guard one of `listeners`, or None. Its port set is fixed
    when it attaches: a new port would take clients from outside the allow-list."""
    if gated_ports is None:
        return None
    for listener in listeners:
        if listener.bind.port not in gated_ports:
            return (f"listener {listener_name(listener)}: port {listener.bind.port} is not among the "
                    f"ports the running XDP filter gates ({sorted(gated_ports)}); restart to add it")
    return None


class ListenerSource(Protocol):
    def acquire(self, listeners: Sequence[ListenerConfig]) -> list[socket.socket]: ...


class LocalBinder:
    """One process: bind the listeners here."""

    def acquire(self, listeners: Sequence[ListenerConfig]) -> list[socket.socket]:
        got: list[socket.socket] = []
        try:
            for listener in listeners:
                try:
                    got.append(bind_listener(listener))
                except OSError as exc:
                    raise ListenerError(_why(listener, exc)) from None
        except BaseException:
            for sock in got:
                sock.close()
            raise
        return got


class WorkerSockets:
    """The supervisor's listening sockets: one per listener of the running config, shared by every
    worker (inherited at fork, or offered on reload). One accept queue per listener: whichever worker
    is free takes the next connection. Per-worker SO_REUSEPORT sockets were measured against it
    (`make bench`, rate workload, 2 workers): the kernel's hash queues a connection behind a busy
    worker while the other idles, 0.50x nginx's connections/s and p99 2.4x, against 0.65x and 1.4x
    shared. A dead or stalled worker's share is also served by the others at once. update() follows
    a reloaded file (bind the new, close the removed)."""

    def __init__(self, listeners: Sequence[ListenerConfig]) -> None:
        self.listeners = tuple(listeners)
        self._sockets: dict[str, socket.socket] = {}
        try:
            for listener in self.listeners:
                self._sockets[listener_name(listener)] = bind_listener(listener)
        except BaseException:
            self.close()
            raise

    def shared(self) -> list[tuple[str, socket.socket]]:
        """(name, socket) for each running listener, in config order: every worker's."""
        return list(self._sockets.items())

    def update(self, listeners: Sequence[ListenerConfig]) -> tuple[list[str], list[str]]:
        """Bind a socket for each new listener (all or nothing, ListenerError), then close the sockets
        of the listeners gone. Returns (added, removed) names."""
        new = [lst for lst in listeners if listener_name(lst) not in self._sockets]
        wanted = {listener_name(lst) for lst in listeners}
        removed = [name for name in self._sockets if name not in wanted]
        bound = dict(zip((listener_name(lst) for lst in new), LocalBinder().acquire(new), strict=True))
        for name in removed:
            self._sockets.pop(name).close()
        merged = {**self._sockets, **bound}
        # Config order, so a restarted worker's sockets line up with its config's listeners.
        self._sockets = {listener_name(lst): merged[listener_name(lst)] for lst in listeners}
        self.listeners = tuple(listeners)
        return list(bound), removed

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def offer(fd: int, generation: int, sockets: Sequence[tuple[str, socket.socket]]) -> None:
    """Send a worker every socket it may need after a reload: its whole running set, so a worker
    that refused an earlier reload still finds what it lacks. Raises OSError (EAGAIN: the worker
    has not read its earlier offers)."""
    chunks = [sockets[i:i + _FDS_PER_MESSAGE] for i in range(0, len(sockets), _FDS_PER_MESSAGE)] or [[]]
    sock = socket.socket(fileno=fd)
    try:
        for chunk in chunks:
            header = json.dumps({"generation": generation, "parts": len(chunks),
                                 "names": [name for name, _ in chunk]}).encode()
            fds = array.array("i", [s.fileno() for _, s in chunk])
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if chunk else []
            sock.sendmsg([header], ancillary, socket.MSG_DONTWAIT)
    finally:
        sock.detach()  # the descriptor stays the caller's


class WorkerInbox:
    """A worker's end of its supervisor's offers. acquire() takes the sockets of the newest complete
    offer for the listeners asked, and closes every other descriptor received."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)

    def acquire(self, listeners: Sequence[ListenerConfig]) -> list[socket.socket]:
        offered = self._receive()
        got: list[socket.socket] = []
        try:
            for listener in listeners:
                sock = offered.pop(listener_name(listener), None)
                if sock is None:
                    raise ListenerError(
                        f"listener {listener_name(listener)}: the supervisor offered no socket for it "
                        "(it could not bind it, or the file changed between its read and this "
                        "worker's: see the supervisor's reload_failed, and send SIGHUP again)")
                got.append(sock)
        except BaseException:
            for sock in got:
                sock.close()
            raise
        finally:
            for sock in offered.values():
                sock.close()
        return got

    def _receive(self) -> dict[str, socket.socket]:
        """Everything waiting: the newest generation whose parts all arrived; the rest is closed."""
        offers: dict[int, tuple[int, list[dict[str, socket.socket]]]] = {}  # generation -> parts, got
        strays: list[socket.socket] = []
        while True:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(
                    _MESSAGE_SIZE, socket.CMSG_SPACE(_FDS_PER_MESSAGE * 4))
            except (BlockingIOError, InterruptedError):
                break
            if not data:  # the supervisor is gone
                break
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            received = [socket.socket(fileno=fd) for fd in fds]
            try:
                header = json.loads(data)
                names, generation, parts = header["names"], int(header["generation"]), int(header["parts"])
            except (ValueError, KeyError, TypeError):
                strays.extend(received)
                continue
            if len(names) != len(received):
                strays.extend(received)
                continue
            offers.setdefault(generation, (parts, []))[1].append(dict(zip(names, received, strict=True)))
        complete = [g for g, (parts, got) in offers.items() if len(got) >= parts]
        newest = max(complete, default=None)
        chosen: dict[str, socket.socket] = {}
        for generation, (_parts, got) in offers.items():
            for part in got:
                if generation == newest:
                    chosen.update(part)
                else:
                    strays.extend(part.values())
        for sock in strays:
            sock.close()
        return chosen

    def close(self) -> None:
        self._sock.close()
