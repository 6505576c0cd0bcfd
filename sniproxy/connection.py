# One client connection's life: read the ClientHello under a deadline, route, resolve, connect, relay.
# Invariant: handle() always closes both sockets and emits exactly one access-log event, whatever
# happens (bad input, dead backend, cancellation at shutdown); `state` says where it ended.
from __future__ import annotations

import asyncio
import enum
import ipaddress
import errno
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from sniproxy import proxy_protocol, tls
from sniproxy.config import LimitsConfig
from sniproxy.relay import Outcome, Relay, RelayResult
from sniproxy.resolver import ResolveError, Resolver
from sniproxy.routing import Route, RouteTable

access_log = structlog.get_logger("sniproxy.access")

_RECV_SIZE = 65536


class State(str, enum.Enum):
    ACCEPTED = "accepted"
    READING_HELLO = "reading_hello"
    ROUTING = "routing"
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


@dataclass(frozen=True)
class Policy:
    """What a connection needs from the configuration; replaced as a whole on reload."""

    table: RouteTable
    limits: LimitsConfig
    access_log: bool = True
    # Set when the listener expects a PROXY header: the networks allowed to send one.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None


class _Rejected(Exception):
    """Ends a connection before relaying, with the access log's outcome and a human reason."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def peer_text(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, writable: bool, deadline: float) -> None:
    """Until fd is readable (writable), or TimeoutError at `deadline` (loop time). One future and one
    timer: measured cheaper per connection than loop.sock_recv/sock_connect under asyncio.timeout()
    (uvloop's sock_connect even sends every numeric address through getaddrinfo in its thread pool)."""
    waiter = loop.create_future()
    timer = loop.call_at(deadline, _expire, waiter)
    if writable:
        loop.add_writer(fd, _wake, waiter)
    else:
        loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class Connection:
    def __init__(
        self,
        client: socket.socket,
        client_address: Any,
        listener: str,
        policy: Policy,
        resolver: Resolver,
        relay: Relay,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.client = client
        self.client_address = client_address
        self.listener = listener
        self.policy = policy
        self.resolver = resolver
        self.relay = relay
        # Passed in by the server: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = loop
        self.state = State.ACCEPTED
        self.started = time.monotonic()
        self.hello: tls.ClientHello | None = None
        self.route: Route | None = None
        self.backend_address: Any = None
        self.via: Any = None  # the load balancer's address, when a PROXY header named the client
        self.proxy_destination: Any = None
        self.buffered = bytearray()

    async def handle(self) -> None:
        outcome = "error"
        reason: str | None = None
        result: RelayResult | None = None
        backend: socket.socket | None = None
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        try:
            self.hello = await self._read_hello()
            self.state = State.ROUTING
            self.route = self.policy.table.route(self.hello.sni)
            if self.route is None:
                await self._send_alert(tls.AlertDescription.UNRECOGNIZED_NAME)
                raise _Rejected("no_route", f"no route for sni {self.hello.sni!r}")
            self.state = State.RESOLVING
            try:
                addresses = await self.resolver.resolve(self.route.host)
            except ResolveError as exc:
                raise _Rejected("resolve_failed", str(exc)) from None
            allowed = [a for a in addresses if self.policy.table.backend_allowed(self.route, a)]
            if not allowed:
                raise _Rejected("backend_refused",
                                f"{self.route.host} resolved to {', '.join(addresses)}: a dynamic route "
                                "may not reach private, loopback, link-local or multicast addresses "
                                "(allow_private_backends)")
            self.state = State.CONNECTING
            backend = await self._connect(allowed)
            self.state = State.RELAYING
            first = bytes(self.buffered)
            if self.route.proxy_protocol:
                first = self._proxy_header(self.route.proxy_protocol) + first
            # The relay owns both sockets from here on and closes them.
            client, self.client, relay_backend, backend = self.client, None, backend, None
            result = await self.relay.relay(
                client, relay_backend, first, self.policy.limits.idle_timeout
            )
            outcome = result.outcome.value
        except _Rejected as exc:
            outcome, reason = exc.outcome, exc.reason
        except asyncio.CancelledError:
            outcome = Outcome.SHUTDOWN.value
            raise
        except Exception as exc:  # a bug, not bad input: log it loudly but keep the server running
            outcome, reason = "internal_error", repr(exc)
            access_log.exception("connection_error", client=peer_text(self.client_address))
        finally:
            for sock in (self.client, backend):
                if sock is not None:
                    sock.close()
            self._log(outcome, reason, result)
            self.state = State.CLOSED

    async def _read_hello(self) -> tls.ClientHello:
        self.state = State.READING_HELLO
        loop = self.loop
        assert loop is not None and self.client is not None
        client = self.client
        reader = tls.ClientHelloReader(max_size=self.policy.limits.max_client_hello_size)
        header_reader = self._proxy_header_reader()
        deadline = loop.time() + self.policy.limits.client_hello_timeout
        try:
            while True:
                # Read first, wait only if nothing is there: the hello has usually arrived by the
                # time the connection is accepted, and then no readiness watch is set up at all.
                try:
                    data = client.recv(_RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    await _ready(loop, client.fileno(), False, deadline)
                    continue
                if not data:
                    raise _Rejected("client_closed", "client closed before a complete ClientHello")
                if header_reader is not None:
                    data = self._feed_proxy_header(header_reader, data)
                    if data is None:
                        continue
                    header_reader = None
                self.buffered += data
                # Everything read is forwarded verbatim later, including bytes past the hello:
                # reading only part of an skb would let a splice re-send it from its start.
                result = reader.feed(data)
                if isinstance(result, tls.ClientHello):
                    return result
        except TimeoutError:
            raise _Rejected("hello_timeout", "no complete ClientHello before the deadline") from None
        except tls.ClientHelloError as exc:
            if exc.alert is not None:  # None for non-TLS peers, which would not understand an alert
                await self._send_alert(exc.alert)
            raise _Rejected("bad_client_hello", str(exc)) from None
        except ConnectionError as exc:
            raise _Rejected("client_reset", f"client reset before a complete ClientHello: {exc}") from None

    def _proxy_header_reader(self) -> proxy_protocol.ProxyHeaderReader | None:
        trusted = self.policy.trusted_proxies
        if trusted is None:
            return None
        peer = ipaddress.ip_address(self.client_address[0])
        if not any(peer in network for network in trusted):
            raise _Rejected("proxy_protocol_untrusted",
                            f"{self.client_address[0]} is not in this listener's trusted networks")
        return proxy_protocol.ProxyHeaderReader()

    def _feed_proxy_header(self, reader: proxy_protocol.ProxyHeaderReader, data: bytes) -> bytes | None:
        """The bytes after the header once it is complete, else None (need more)."""
        try:
            header = reader.feed(data)
        except proxy_protocol.ProxyHeaderError as exc:
            raise _Rejected("bad_proxy_header", str(exc)) from None
        if not isinstance(header, proxy_protocol.ProxyHeader):
            return None
        if header.source is not None:
            self.via, self.client_address = self.client_address, header.source
            self.proxy_destination = header.destination
        return header.rest

    def _proxy_header(self, version: str) -> bytes:
        """The PROXY header for the backend: the real client, and the address it connected to."""
        source = (str(self.client_address[0]), int(self.client_address[1]))
        if self.proxy_destination is not None:
            destination = self.proxy_destination
        else:
            assert self.client is not None
            local = self.client.getsockname()
            destination = (local[0], local[1])
        return proxy_protocol.encode(version, source, destination)

    async def _connect(self, addresses: list[str]) -> socket.socket:
        """Try each address in turn within one connect_timeout; a dead address gets its share of the
        time left, so one black hole cannot use up the whole budget."""
        assert self.route is not None and self.loop is not None
        loop = self.loop
        deadline = loop.time() + self.policy.limits.connect_timeout
        errors: list[str] = []
        for index, address in enumerate(addresses):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            target = (address, self.route.port)
            self.backend_address = target
            started = loop.time()
            share_ends = started + (deadline - started) / (len(addresses) - index)
            # SOCK_NONBLOCK: non-blocking from birth, no separate ioctl.
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # `address` is an IP literal (Resolver's contract): no name lookup happens here.
                err = sock.connect_ex(target)
                if err in (errno.EINPROGRESS, errno.EINTR):
                    await _ready(loop, sock.fileno(), True, share_ends)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                return sock
            except TimeoutError:
                errors.append(f"{peer_text(target)}: connect timeout")
            except OSError as exc:
                # The errno says why; an address Python cannot parse (gaierror) has none.
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                errors.append(f"{peer_text(target)}: {why}")
            except BaseException:
                sock.close()
                raise
            sock.close()
        raise _Rejected("connect_failed", "; ".join(errors))

    async def _send_alert(self, description: tls.AlertDescription) -> None:
        if self.client is None:
            return
        try:
            # A fatal alert is 7 bytes; it always fits in an empty send buffer, so no waiting.
            self.client.send(tls.alert_record(description))
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EAGAIN):
                raise

    def _log(self, outcome: str, reason: str | None, result: RelayResult | None) -> None:
        if not self.policy.access_log:
            return
        hello = self.hello
        event: dict[str, Any] = {
            "client": peer_text(self.client_address),
            "listener": self.listener,
            "sni": hello.sni if hello else None,
            "alpn": list(hello.alpn) if hello else [],
            "route": self.route.rule if self.route else None,
            "backend_host": self.route.host if self.route else None,
            "backend": peer_text(self.backend_address) if self.backend_address else None,
            "bytes_up": result.bytes_up if result else 0,
            "bytes_down": result.bytes_down if result else 0,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "relay": result.mode if result else None,
            "outcome": outcome,
            "state": self.state.value,
        }
        if self.via:
            event["via"] = peer_text(self.via)
        if reason:
            event["reason"] = reason
        if result and result.fallback_reason:
            event["splice_fallback"] = result.fallback_reason
        if result and result.kernel_bytes:
            event["kernel_bytes"] = result.kernel_bytes
        access_log.info("access", **event)
