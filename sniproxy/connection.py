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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sniproxy import http_head, metrics, proxy_protocol, tls
from sniproxy.balancer import Balancer
from sniproxy.config import BackendAddress, LimitsConfig, UnixAddress
from sniproxy.relay import Outcome, Relay, RelayResult
from sniproxy.resolver import ResolveError, Resolver
from sniproxy.routing import Route, RouteTable

access_log = structlog.get_logger("sniproxy.access")
log = structlog.get_logger("sniproxy.balancer")

# A unix-socket backend is always copied (a copy-only Relay, so no hand-off is even attempted).
# Measured (bench/unix_splice_probe.py): sock_map takes the unix socket, but the verdict keys on the
# skb's socket, which for a unix skb is the sender (the backend's end, not ours), so nothing from the
# backend is redirected; and the hand-off's byte-order bookkeeping needs TCP_INFO and TCP_INQ, which
# a unix socket refuses (EOPNOTSUPP).
UNIX_COPY_REASON = "unix-socket backend: the kernel splice relays TCP sockets only"
_UNIX_COPY = Relay()

# The access event's level by outcome (it becomes the journal priority, docs/operations.md): error when
# the proxy could not serve a client it should have (what `journalctl -p err` must show), warning when
# a policy turned it away or the backend cut it; the rest (normal ends, client-side faults) info.
_ERROR_OUTCOMES = frozenset({"connect_failed", "resolve_failed", "internal_error", "splice_error"})
_WARNING_OUTCOMES = frozenset({"backend_refused", "backend_self", "backend_reset", "over_limit", "over_limit_per_ip",
                               "proxy_protocol_untrusted"})


def access_level(outcome: str) -> str:
    return "error" if outcome in _ERROR_OUTCOMES else "warning" if outcome in _WARNING_OUTCOMES else "info"

_RECV_SIZE = 65536
# After an HTTP error answer: how long and how much of the client's remaining request to read and drop.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20


class State(str, enum.Enum):
    ACCEPTED = "accepted"
    READING_HELLO = "reading_hello"
    READING_HEAD = "reading_head"  # protocol = "http": the request line and headers
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
    protocol: str = "tls"  # the listener's: "tls" routes on the SNI, "http" on the Host header
    # Is an IP an address of this host (localaddrs.LocalAddresses.contains)? Dynamic routes never
    # connect there unless the table allows it: the proxy would connect to itself until full.
    is_local: Callable[[Any], bool] | None = None


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
        balancer: Balancer | None = None,
    ) -> None:
        self.client = client
        self.client_address = client_address
        self.listener = listener
        self.policy = policy
        self.resolver = resolver
        self.relay = relay
        self.balancer = balancer  # the choice among a route's backends (None: config order)
        # Passed in by the server: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = loop
        self.started = time.monotonic()
        # For the phase metrics, by State value: when it was last entered, and how long it was held
        # the last time it was left (a route with several backends may resolve and connect again).
        self.entered: dict[str, float] = {State.ACCEPTED.value: self.started}
        self.held: dict[str, float] = {}
        self._state = State.ACCEPTED
        self.hello: tls.ClientHello | None = None
        self.head: http_head.RequestHead | None = None
        self.route: Route | None = None
        # Rules that matched the name but could not build a backend from it: logged, never silent.
        self.route_skipped: tuple[str, ...] = ()
        # Bytes the proxy itself sent the backend (a PROXY header): not the client's, so not bytes_up.
        self.added_up = 0
        self.backend_address: Any = None  # (ip, port) of the connected backend, or "unix:/path"
        self.backend_host: str | None = None  # the host (name or IP) of the backend it served from
        self._balanced: BackendAddress | None = None  # counted open in the balancer until the end
        self._connect_deadline: float | None = None
        self._tried: list[str] = []  # why backends tried before the one that served failed
        self.via: Any = None  # the load balancer's address, when a PROXY header named the client
        self.proxy_destination: Any = None
        self.buffered = bytearray()
        # The short-circuit registration of the backend connection (relay.shortcut), if any.
        self._ticket: Any = None
        self._shortcut_refused: str | None = None  # why a local backend was not registered

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        now = time.monotonic()
        left = self._state.value
        self.held[left] = now - self.entered[left]
        self._state = state
        self.entered[state.value] = now

    async def handle(self) -> None:
        outcome = "error"
        reason: str | None = None
        result: RelayResult | None = None
        backend: socket.socket | None = None
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        metrics.connection_opened(self.listener)
        try:
            if self.policy.protocol == "http":
                self.head = await self._read_head()
                self.state = State.ROUTING
                self.route, self.route_skipped = self.policy.table.lookup(self.head.host)
                if self.route is None:
                    await self._refuse_http_request()
            else:
                self.hello = await self._read_hello()
                self.state = State.ROUTING
                self.route, self.route_skipped = self.policy.table.lookup(self.hello.sni, self.hello.alpn)
                if self.route is None:
                    await self._send_alert(tls.AlertDescription.UNRECOGNIZED_NAME)
                    raise _Rejected("no_route", f"no route for sni {self.hello.sni!r}"
                                    + "".join(f"; {why}" for why in self.route_skipped))
            backend = await self._open_backend()
            self.state = State.RELAYING
            first = bytes(self.buffered)
            if self.route.proxy_protocol:
                header = self._proxy_header(self.route.proxy_protocol)
                self.added_up = len(header)
                first = header + first
            # The relay owns both sockets from here on and closes them.
            client, self.client, relay_backend, backend = self.client, None, backend, None
            idle = self.policy.limits.idle_timeout
            if relay_backend.family == socket.AF_UNIX and self.relay.mode != _UNIX_COPY.mode:
                result = await _UNIX_COPY.relay(client, relay_backend, first, idle)
                result.fallback_reason = UNIX_COPY_REASON
            else:
                ticket, self._ticket = self._ticket, None
                result = await self.relay.relay(client, relay_backend, first, idle, ticket=ticket)
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
            if self._ticket is not None:  # registered, never relayed: release it
                self.relay.shortcut.finish(self._ticket)  # type: ignore[union-attr]
                self._ticket = None
            if self._balanced is not None and self.balancer is not None:
                self.balancer.released(self._balanced)
            self._log(outcome, reason, result)
            self.state = State.CLOSED
            metrics.connection_closed(self, outcome, result, self.entered["closed"])

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

    async def _read_head(self) -> http_head.RequestHead:
        """_read_hello's twin for plain HTTP: every byte read is kept for the backend, and bad input
        is answered in HTTP (400, or 408 at the deadline) instead of a silent close."""
        self.state = State.READING_HEAD
        loop = self.loop
        assert loop is not None and self.client is not None
        client = self.client
        limits = self.policy.limits
        reader = http_head.RequestHeadReader(max_size=limits.max_http_head_size)
        header_reader = self._proxy_header_reader()
        deadline = loop.time() + limits.http_head_timeout
        try:
            while True:
                try:
                    data = client.recv(_RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    await _ready(loop, client.fileno(), False, deadline)
                    continue
                if not data:
                    raise _Rejected("client_closed", "client closed before a complete request head")
                if header_reader is not None:
                    data = self._feed_proxy_header(header_reader, data)
                    if data is None:
                        continue
                    header_reader = None
                self.buffered += data
                result = reader.feed(data)
                if isinstance(result, http_head.RequestHead):
                    return result
        except TimeoutError:
            await self._send_http_error(408, "no complete request head before the deadline")
            raise _Rejected("head_timeout", "no complete request head before the deadline") from None
        except http_head.RequestHeadError as exc:
            await self._send_http_error(exc.status, f"bad request: {exc}")
            raise _Rejected("bad_request", str(exc)) from None
        except ConnectionError as exc:
            raise _Rejected("client_reset", f"client reset before a complete request head: {exc}") from None

    async def _refuse_http_request(self) -> None:
        assert self.head is not None
        if self.head.host is None:
            await self._send_http_error(400, "bad request: no Host name to route on")
            raise _Rejected("no_host", "request names no host, and the table has no fallback")
        await self._send_http_error(503, f"no route for host {self.head.host}")
        raise _Rejected("no_route", f"no route for host {self.head.host!r}")

    async def _send_http_error(self, status: int, message: str) -> None:
        """Answer, then close gracefully: stop sending, and read (and drop) what the client still
        sends for a moment, or closing with unread bytes would reset the connection and the client
        could lose the answer before reading it."""
        client = self.client
        if client is None or self.loop is None:
            return
        try:
            # A few hundred bytes: they fit in the empty send buffer of a fresh connection.
            client.send(http_head.error_response(status, message))
            client.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = self.loop.time() + _LINGER_SECONDS
        drained = 0
        while drained < _LINGER_BYTES:
            try:
                data = client.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                try:
                    await _ready(self.loop, client.fileno(), False, deadline)
                except TimeoutError:
                    return
                continue
            except OSError:
                return
            if not data:
                return
            drained += len(data)

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

    async def _open_backend(self) -> socket.socket:
        """A connected socket to one of the route's backends. Several: in the balancer's order, each
        within its share of one connect_timeout; a failed one is held down (skipped by the next
        connections) and the next is tried, so the client sees an error only when all fail."""
        route = self.route
        assert route is not None and self.loop is not None
        targets: list[BackendAddress] = list(route.backends)
        balancer = self.balancer if len(targets) > 1 else None
        if balancer is not None:
            targets = balancer.order(targets, time.monotonic())
        failures: list[_Rejected] = []
        for index, target in enumerate(targets):
            try:
                sock = await self._open_target(target, len(targets) - index)
            except _Rejected as exc:
                failures.append(exc)
                if balancer is not None and balancer.failed(target, time.monotonic(), exc.reason):
                    log.warning("backend_down", backend=str(target), reason=exc.reason,
                                hold_down=balancer.hold_down)
                continue
            if balancer is not None:
                if balancer.connected(target):
                    log.info("backend_up", backend=str(target), by="connection")
                self._balanced = target
            self._tried = [f.reason for f in failures]
            return sock
        if len(failures) == 1:
            raise failures[0]
        raise _Rejected("connect_failed", "; ".join(f.reason for f in failures))

    async def _open_target(self, target: BackendAddress, left: int) -> socket.socket:
        """Connect to one backend using 1/left of the connect_timeout remaining (the rest is for the
        backends after it). The timeout starts with the first connect, after the first resolve."""
        assert self.route is not None and self.loop is not None
        if isinstance(target, UnixAddress):
            self.state = State.CONNECTING
            self.backend_address, self.backend_host = str(target), None
            return await self._connect_unix(target, self._share(left))
        self.state = State.RESOLVING
        self.backend_host = target.host
        try:
            addresses = await self.resolver.resolve(target.host)
        except ResolveError as exc:
            raise _Rejected("resolve_failed", str(exc)) from None
        allowed, refusals = [], []
        for address in addresses:
            refusal = self.policy.table.backend_refusal(self.route, address, self.policy.is_local)
            if refusal is None:
                allowed.append(address)
            else:
                refusals.append(refusal)
        if not allowed:
            # "backend_self" when any address was this host's: that is the loop to look into.
            kind = next((r.outcome for r in refusals if r.outcome == "backend_self"), refusals[0].outcome)
            raise _Rejected(kind, f"{target.host}: " + "; ".join(r.reason for r in refusals)
                            + ": a dynamic route may not reach it (allow_private_backends)")
        self.state = State.CONNECTING
        return await self._connect(allowed, target.port, self._share(left))

    def _share(self, left: int) -> float:
        assert self.loop is not None
        now = self.loop.time()
        if self._connect_deadline is None:
            self._connect_deadline = now + self.policy.limits.connect_timeout
        return now + max(0.0, self._connect_deadline - now) / left

    async def _connect_unix(self, target: UnixAddress, deadline: float) -> socket.socket:
        assert self.loop is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            # A unix connect completes at once or fails (EAGAIN: the listener's backlog is full).
            err = sock.connect_ex(target.path)
            if err == errno.EINPROGRESS:
                await _ready(self.loop, sock.fileno(), True, deadline)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return sock
        except TimeoutError:
            sock.close()
            raise _Rejected("connect_failed", f"{target}: connect timeout") from None
        except OSError as exc:
            sock.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _Rejected("connect_failed", f"{target}: {why}") from None
        except BaseException:
            sock.close()
            raise

    async def _connect(self, addresses: list[str], port: int, deadline: float) -> socket.socket:
        """Try each address in turn by `deadline`; a dead address gets its share of the time left, so
        one black hole cannot use up the whole budget."""
        assert self.loop is not None
        loop = self.loop
        errors: list[str] = []
        for index, address in enumerate(addresses):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            target = (address, port)
            self.backend_address = target
            started = loop.time()
            share_ends = started + (deadline - started) / (len(addresses) - index)
            # SOCK_NONBLOCK: non-blocking from birth, no separate ioctl.
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            ticket = None
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ticket = self._shortcut_ticket(sock, target)
                # `address` is an IP literal (Resolver's contract): no name lookup happens here.
                err = sock.connect_ex(target)
                if err in (errno.EINPROGRESS, errno.EINTR):
                    await _ready(loop, sock.fileno(), True, share_ends)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                self._ticket = ticket
                return sock
            except TimeoutError:
                errors.append(f"{peer_text(target)}: connect timeout")
            except OSError as exc:
                # The errno says why; an address Python cannot parse (gaierror) has none.
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                errors.append(f"{peer_text(target)}: {why}")
            except BaseException:
                sock.close()
                if ticket is not None:
                    self.relay.shortcut.finish(ticket)  # type: ignore[union-attr]
                raise
            sock.close()
            if ticket is not None:
                self.relay.shortcut.finish(ticket)  # type: ignore[union-attr]
        raise _Rejected("connect_failed", "; ".join(errors))

    def _shortcut_ticket(self, sock: socket.socket, target: tuple[str, int]) -> Any:
        """Register the connection for the local-backend short-circuit when it is on and `target`
        is one of this host's addresses (a Ticket), else None. A failed registration is logged by
        the Shortcut and leaves the connection on the normal path (access log `shortcut_fallback`)."""
        shortcut = self.relay.shortcut
        if shortcut is None or self.client is None:
            return None
        ip = ipaddress.ip_address(target[0])
        local = self.policy.is_local(ip) if self.policy.is_local is not None else ip.is_loopback
        if not local:
            return None
        ticket = shortcut.prepare(self.client, sock, target)
        if isinstance(ticket, str):
            self._shortcut_refused = ticket
            return None
        return ticket

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
            "protocol": self.policy.protocol,
            # The name routed on: the TLS SNI, or on an http listener the Host (or target authority).
            "sni": hello.sni if hello else (self.head.host if self.head else None),
            "alpn": list(hello.alpn) if hello else [],
            "route": self.route.rule if self.route else None,
            "backend_host": self.backend_host,
            "backend": (self.backend_address if isinstance(self.backend_address, str)
                        else peer_text(self.backend_address) if self.backend_address else None),
            "bytes_up": max(result.bytes_up - self.added_up, 0) if result else 0,
            "bytes_down": result.bytes_down if result else 0,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "relay": result.mode if result else None,
            "outcome": outcome,
            "state": self.state.value,
        }
        if self.via:
            event["via"] = peer_text(self.via)
        if self._tried:
            event["backend_failed"] = self._tried
        if self.route_skipped:
            event["route_skipped"] = list(self.route_skipped)
        if reason:
            event["reason"] = reason
        if result and result.fallback_reason:
            event["splice_fallback"] = result.fallback_reason
        if result and result.kernel_bytes:
            event["kernel_bytes"] = result.kernel_bytes
        if result and result.shortcut:
            event["shortcut"] = True
            event["shortcut_bytes"] = result.shortcut_bytes
        elif result and (result.shortcut_fallback or self._shortcut_refused):
            event["shortcut"] = False
            event["shortcut_fallback"] = result.shortcut_fallback or self._shortcut_refused
        getattr(access_log, access_level(outcome))("access", **event)
