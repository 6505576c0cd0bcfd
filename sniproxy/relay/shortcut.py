# The local-backend short-circuit as a connection sees it: before the backend connect() the proxy's
# socket is bound (so its port is known) and the expected connection is registered; the kernel then
# captures the backend's end and sends the backend's replies straight to the client socket, while
# the loopback connection carries only what the backend wrote before (nothing, for a captured socket:
# capture precedes accept()), its FIN and its RST, which the relay passes on as usual. Invariant: a
# connection whose registration fails, or whose backend socket the kernel could not capture, runs on
# the normal path whole; each kind of failure is logged once per process, and every registration
# is released after both sockets are closed.
from __future__ import annotations

import dataclasses
import socket

import structlog

from sniproxy.kernel.errors import SpliceError

from .spliced import written_total

log = structlog.get_logger("sniproxy.relay")


@dataclasses.dataclass
class Ticket:
    """One registered connection (kernel Registration), until Shortcut.finish(). The bytes that went
    the short way are measured on the client socket (everything put into its send stream, minus
    what the relay wrote to it itself): the sk_msg program counts each message whole before the
    push into the client socket, which may take only part of it (a client that reset meanwhile)."""

    registration: object
    maps: object
    client_base: int  # written_total(client) at registration
    client_end: int | None = None  # written_total(client) just before the relay closed it
    done: bool = False

    def measure(self, client: socket.socket, fin_sent: bool) -> None:
        """Called by the relay just before it closes the client socket; fin_sent: it shut the
        client's sending side (the FIN takes one sequence number, counted like a byte)."""
        try:
            self.client_end = written_total(client) - (1 if fin_sent else 0)
        except OSError:
            pass

    def last_activity(self) -> float | None:
        """time.monotonic() of the last byte the kernel redirected, or None: the copy engine's idle
        timeout counts it as activity (those bytes never pass through userspace)."""
        conn = self.maps.read(self.registration)  # type: ignore[attr-defined]
        if conn is None or not conn.last_ns:
            return None
        return conn.last_ns / 1e9


@dataclasses.dataclass(frozen=True)
class Finished:
    captured: bool
    reason: str | None  # why a registered connection was not captured
    offered: int = 0  # the sk_msg program's count (see Ticket)

    def moved(self, ticket: Ticket, other_paths: int) -> int:
        """Backend -> client bytes that went the short way: what entered the client's send stream
        minus what the relay's other paths (copy, egress splice) put there."""
        if not self.captured or ticket.client_end is None:
            return 0
        return max(0, ticket.client_end - ticket.client_base - other_paths)


class Shortcut:
    """One per process, around a loaded kernel ShortcutMaps."""

    def __init__(self, maps: object, cgroup: str) -> None:
        self.maps = maps
        self.cgroup = cgroup
        self._logged: set[str] = set()

    def _once(self, kind: str, **fields: object) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(kind, cgroup=self.cgroup, note="logged once per process", **fields)

    def prepare(self, client: socket.socket, backend: socket.socket, target: tuple[str, int]) -> Ticket | str:
        """Bind `backend` (not yet connected) on the target's own address, register the connection.
        Returns a Ticket, or the reason it stays on the normal path (the socket is then unbound or
        bound, either way fine to connect)."""
        try:
            # The source address of a connection to one of this host's own addresses is that address.
            backend.bind((target[0], 0))
            proxy_end = backend.getsockname()[:2]
        except OSError as exc:
            reason = f"binding the backend socket failed: {exc.strerror or exc}"
            self._once("shortcut_bind_failed", reason=reason)
            return reason
        try:
            registration = self.maps.register(client, target, proxy_end)  # type: ignore[attr-defined]
        except SpliceError as exc:
            reason = f"registering the connection failed: {exc}"
            self._once("shortcut_register_failed", reason=reason)
            return reason
        try:
            base = written_total(client)
        except OSError as exc:
            self.maps.release(registration)  # type: ignore[attr-defined]
            return f"reading the client socket's counters failed: {exc.strerror or exc}"
        return Ticket(registration, self.maps, base)

    def finish(self, ticket: Ticket) -> Finished:
        """After both sockets are closed: read the counters, delete the entries."""
        if ticket.done:
            return Finished(False, "released twice")
        ticket.done = True
        try:
            conn = self.maps.release(ticket.registration)  # type: ignore[attr-defined]
        except OSError as exc:
            self._once("shortcut_release_failed", reason=str(exc))
            return Finished(False, f"reading the counters failed: {exc}")
        from sniproxy.kernel.shortcut import CAPTURED, EXPECTED

        if conn is None:
            return Finished(False, "the registration was gone")
        if conn.state == CAPTURED and conn.passing:
            # Its bytes went the normal way; say so once per process and in the access log.
            reason = "non-blocking backend: kept on the loopback path (nothing would wake it when the client's send buffer drains)"
            self._once("shortcut_nonblocking_backend", reason=reason)
            return Finished(conn.redir_bytes > 0, reason, conn.redir_bytes)
        if conn.state == CAPTURED:
            return Finished(True, None, conn.redir_bytes)
        if conn.state == EXPECTED:
            # The backend never accepted through the cgroup's sock_ops: it is not in the cgroup (or a
            # listener it made before the program was attached sits elsewhere).
            reason = f"the backend's socket was not seen in {self.cgroup}"
            self._once("shortcut_not_seen", reason=reason)
            return Finished(False, reason)
        import errno as _errno
        import os

        reason = f"capturing the backend's socket failed: {os.strerror(-conn.error)}" if conn.error else \
            "capturing the backend's socket failed"
        if -conn.error in (_errno.E2BIG, _errno.ENOSPC, _errno.ENOMEM):
            reason += " (shortcut_socks full)"
        self._once("shortcut_capture_failed", reason=reason)
        return Finished(False, reason)

