# One client connection's life: read the ClientHello under a deadline, route, resolve, connect, relay,
# as a state machine driven by callbacks (tasks only for the slow paths: a DNS query, an HTTP error's
# linger, the kernel hand-off). Invariant: once start() is called, both sockets are closed and exactly
# one access-log event is emitted, then on_done, whatever happens (bad input, dead backend, a bug,
# cancel() at shutdown); `state` says where it ended.
from __future__ import annotations

import asyncio
import enum
import ipaddress
import errno
import os
import select
import socket
import time
from _socket import socket as raw_socket
from time import monotonic
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sniproxy import http_head, metrics, proxy_protocol, tls
from sniproxy.balancer import Balancer
from sniproxy.config import BackendAddress, LimitsConfig, UnixAddress
from sniproxy.relay import Outcome, Relay, RelayResult, Running
from sniproxy.relay.copy import Poller
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
# SOCK_NONBLOCK: a backend socket is non-blocking from birth, no separate ioctl.
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_CONNECT_PENDING = (errno.EINPROGRESS, errno.EINTR)
_AF_UNIX, _AF_INET, _AF_INET6 = socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
_IPPROTO_TCP, _TCP_NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
# The copy engine's masks (relay.copy): a client watched for its hello keeps its registration.
_IN, _OUT = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT
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


# The phases whose length the metrics read from Connection.held (the others' come from `entered`).
_HELD_KEPT = frozenset({State.RESOLVING.value, State.CONNECTING.value})


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
    """One client connection, driven by callbacks: the loop's timers, the copy engine's epoll (one
    registration per socket for its whole life), and the relay's end. A task is made only for a slow
    path (a DNS query, an HTTP error's linger, a hand-off to the kernel). start() begins it; on_done
    (the server's) is called exactly once, after the access-log event."""

    # Defaults of what most connections never set, as class attributes: one store each saved per
    # connection (a list or tuple here is always replaced, never mutated, in an instance).
    hello: tls.ClientHello | None = None
    head: http_head.RequestHead | None = None
    route: Route | None = None
    # Rules that matched the name but could not build a backend from it: logged, never silent.
    route_skipped: tuple[str, ...] = ()
    # Bytes the proxy itself sent the backend (a PROXY header): not the client's, so not bytes_up.
    added_up = 0
    backend_address: Any = None  # (ip, port) of the connected backend, or "unix:/path"
    backend_host: str | None = None  # the host (name or IP) of the backend it served from
    _balanced: BackendAddress | None = None  # counted open in the balancer until the end
    _connect_deadline: float | None = None
    _tried: list[str] | tuple[()] = ()  # why backends tried before the one that served failed
    via: Any = None  # the load balancer's address, when a PROXY header named the client
    proxy_destination: Any = None
    finished = False
    _poller: Poller | None = None
    _timer: asyncio.TimerHandle | None = None  # the deadline of the phase waiting now
    _task: asyncio.Task[None] | None = None  # a slow path running now
    _running: Running | None = None  # the relay, once both sockets are handed to it
    _reader: Any = None  # tls.ClientHelloReader or http_head.RequestHeadReader
    _header_reader: proxy_protocol.ProxyHeaderReader | None = None
    _client_watched = False  # the client socket is registered in the poller
    # Backends: the route's targets in the order to try, the addresses of
    # the target being connected, and the socket whose connect is in flight.
    _targets: list[BackendAddress] | tuple[()] = ()
    _target_index = 0
    _addresses: list[Any] | tuple[()] = ()
    _address_index = 0
    _address_errors: list[str] | tuple[()] = ()
    _target_deadline: float | None = None  # this target's share ends: set at its first wait
    _connecting: socket.socket | None = None
    _first: bytes | None = None
    _deadline = 0.0  # of the hello (or request head), loop time
    _address_family = 0  # AF_UNIX for a unix-socket target, else 0 (by the address)
    _port = 0
    _unix_label: str | None = None  # a unix target's name in errors
    _unix = False  # relayed by the copy-only relay because the backend is a unix socket
    # The short-circuit registration of the backend connection in flight (relay.shortcut), if
    # any: made before its connect(), handed to the relay with the socket, released here when
    # that connect fails or the connection ends before relaying.
    _ticket: Any = None
    _shortcut_refused: str | None = None  # why a local backend was not registered
    # For the phase metrics, by State value: when it was last entered, and how long RESOLVING and
    # CONNECTING were held the last time they were left (a route with several backends may resolve
    # and connect again). None when metrics are off: then no phase reads the clock.
    entered: dict[str, float] | None = None
    held: dict[str, float] | None = None

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
        on_done: Callable[[Connection], None] | None = None,
    ) -> None:
        self.client = client
        self.client_address = client_address
        self.peer_ip = client_address[0]  # as accepted (a PROXY header may change client_address)
        self.listener = listener
        self.policy = policy
        self.resolver = resolver
        self.relay = relay
        self.balancer = balancer  # the choice among a route's backends (None: config order)
        # Passed in by the server: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = loop
        self.on_done = on_done
        self.started = time.monotonic()
        if metrics.enabled():
            self.entered = {State.ACCEPTED.value: self.started}
            self.held = {}
        self._state = State.ACCEPTED
        self.buffered = bytearray()
        self._failures: list[_Rejected] = []

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        entered = self.entered
        if entered is not None:
            now = monotonic()
            left = self._state._value_  # not .value: an enum property, measurably slower on 3.11
            if left in _HELD_KEPT:
                self.held[left] = now - entered[left]  # type: ignore[index]
            entered[state._value_] = now
        self._state = state

    # -- driving ---------------------------------------------------------------------------------

    async def handle(self) -> None:
        """The whole life as an awaitable (start() and wait for the end); cancelled, it cuts the
        connection (outcome "shutdown") and returns once it is logged."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        done = self.loop.create_future()
        server_done = self.on_done

        def ended(conn: Connection) -> None:
            if server_done is not None:
                server_done(conn)
            if not done.done():
                done.set_result(None)

        self.on_done = ended
        self.start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self.cancel()
            await asyncio.wait([done])
            raise

    def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if self.entered is not None:  # metrics on (they count it closed in _end, on the same test)
            metrics.connection_opened(self.listener)
        self._step(self._begin)

    def cancel(self) -> None:
        """The server's drain deadline: cut now. The end (outcome "shutdown") is reported at once,
        or, while a task or the kernel phase runs, as soon as it has unwound."""
        if self.finished:
            return
        if self._running is not None:
            self._running.cancel()
        elif self._task is not None and not self._task.done():
            self._task.cancel()
        else:
            self._end(Outcome.SHUTDOWN.value, None)

    def _step(self, fn: Callable[..., None], *args: Any) -> None:
        """Every callback enters here: a rejection ends the connection with its outcome; anything
        else is a bug, logged loudly, and the server keeps running."""
        if self.finished:
            return
        try:
            fn(*args)
        except _Rejected as exc:
            self._end(exc.outcome, exc.reason)
        except Exception as exc:
            access_log.exception("connection_error", client=peer_text(self.client_address))
            self._end("internal_error", repr(exc))

    def _spawn(self, coro: Any) -> None:
        """A slow path as a task of this connection; its end (or cancellation) ends the connection
        unless it went on to the next phase."""
        assert self.loop is not None
        self._task = task = self.loop.create_task(self._slow(coro))
        task.add_done_callback(lambda t: self._slow_done(t, coro))

    def _slow_done(self, task: asyncio.Task[None], coro: Any) -> None:
        # A task cancelled before its first step never ran _slow's except clause (nor `coro`).
        if task.cancelled() and not self.finished:
            coro.close()
            self._end(Outcome.SHUTDOWN.value, None)

    async def _slow(self, coro: Any) -> None:
        try:
            await coro
        except _Rejected as exc:
            self._end(exc.outcome, exc.reason)
        except asyncio.CancelledError:
            self._end(Outcome.SHUTDOWN.value, None)
        except Exception as exc:
            access_log.exception("connection_error", client=peer_text(self.client_address))
            self._end("internal_error", repr(exc))
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _watch(self, sock: socket.socket, mask: int, handler: Callable[[int, int], None]) -> None:
        if self._poller is None:
            assert self.loop is not None
            self._poller = Poller.of(self.loop)
        self._poller.set(sock.fileno(), mask, handler)

    def _close(self, sock: socket.socket) -> None:
        if self._poller is not None:
            self._poller.drop(sock.fileno())
        sock.close()

    def _set_timer(self, deadline: float, fn: Callable[[], None]) -> None:
        assert self.loop is not None
        self._timer = self.loop.call_at(deadline, self._step, fn)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self, outcome: str, reason: str | None, result: RelayResult | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        for sock in (self.client, self._connecting):
            if sock is not None:
                self._close(sock)
        self.client = self._connecting = None
        self._release_ticket()  # registered, never relayed
        if self._balanced is not None and self.balancer is not None:
            self.balancer.released(self._balanced)
        self._log(outcome, reason, result)
        self.state = State.CLOSED
        if self.entered is not None:
            metrics.connection_closed(self, outcome, result, self.entered["closed"])
        if self.on_done is not None:
            self.on_done(self)

    # -- the hello (or the HTTP request head) ----------------------------------------------------

    def _begin(self) -> None:
        limits = self.policy.limits
        if self.policy.protocol == "http":
            self.state = State.READING_HEAD
            self._reader = http_head.RequestHeadReader(max_size=limits.max_http_head_size)
        else:
            self.state = State.READING_HELLO
            self._reader = tls.ClientHelloReader(max_size=limits.max_client_hello_size)
        self._header_reader = self._proxy_header_reader()
        # The deadline counts from now; its timer is set only if the first read finds nothing.
        assert self.loop is not None
        self._deadline = self.loop.time() + (limits.http_head_timeout if self.policy.protocol == "http"
                                             else limits.client_hello_timeout)
        self._read_client()

    def _on_client_event(self, fd: int, events: int) -> None:
        self._step(self._read_client)

    def _read_client(self) -> None:
        client = self.client
        assert client is not None
        while True:
            # Read first, wait only if nothing is there: the hello has usually arrived by the time
            # the connection is accepted, and then it is never registered for readiness here.
            try:
                data = client.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if not self._client_watched:
                    self._client_watched = True
                    self._watch(client, _IN, self._on_client_event)
                    self._set_timer(self._deadline, self._hello_timeout)
                return
            except ConnectionError as exc:
                what = "request head" if self.policy.protocol == "http" else "ClientHello"
                raise _Rejected("client_reset", f"client reset before a complete {what}: {exc}") from None
            if not data:
                what = "request head" if self.policy.protocol == "http" else "ClientHello"
                raise _Rejected("client_closed", f"client closed before a complete {what}")
            if self._header_reader is not None:
                data = self._feed_proxy_header(self._header_reader, data)
                if data is None:
                    continue
                self._header_reader = None
            # Everything read is forwarded verbatim later, including bytes past the hello: reading
            # only part of an skb would let a splice re-send it from its start.
            self.buffered += data
            if self.policy.protocol == "http":
                try:
                    head = self._reader.feed(data)
                except http_head.RequestHeadError as exc:
                    self._http_error(exc.status, f"bad request: {exc}", "bad_request", str(exc))
                    return
                if isinstance(head, http_head.RequestHead):
                    self._hello_done()
                    self.head = head
                    self.state = State.ROUTING
                    self.route, self.route_skipped = self.policy.table.lookup(head.host)
                    if self.route is None:
                        self._refuse_http_request()
                        return
                    self._open_backend()
                    return
            else:
                try:
                    hello = self._reader.feed(data)
                except tls.ClientHelloError as exc:
                    if exc.alert is not None:  # None for non-TLS peers, which would not understand it
                        self._send_alert(exc.alert)
                    raise _Rejected("bad_client_hello", str(exc)) from None
                if isinstance(hello, tls.ClientHello):
                    self._hello_done()
                    self.hello = hello
                    self.state = State.ROUTING
                    self.route, self.route_skipped = self.policy.table.lookup(hello.sni, hello.alpn)
                    if self.route is None:
                        self._send_alert(tls.AlertDescription.UNRECOGNIZED_NAME)
                        raise _Rejected("no_route", f"no route for sni {hello.sni!r}"
                                        + "".join(f"; {why}" for why in self.route_skipped))
                    self._open_backend()
                    return

    def _hello_done(self) -> None:
        self._cancel_timer()
        self._reader = None

    def _quiet_client(self) -> None:
        """Before a wait (a DNS query, a connect in progress): a client watched for its hello is no
        longer read, or a level-triggered epoll would report its next bytes over and over. It stays
        registered: the relay watches it again with one epoll_ctl. Not done when the hello is
        complete: a connection that relays in the same callback keeps its mask, which is the one
        the relay wants, and no epoll_ctl is made at all."""
        if self._client_watched and self.client is not None:
            self._watch(self.client, 0, self._on_quiet_event)

    def _on_quiet_event(self, fd: int, events: int) -> None:
        # A socket registered with no interest reports only ERR/HUP, and level-triggered: stop
        # watching it, or the loop would spin; the relay's first read or write meets the error.
        if self._poller is not None:
            self._poller.forget(fd)

    def _hello_timeout(self) -> None:
        self._timer = None
        if self.policy.protocol == "http":
            self._http_error(408, "no complete request head before the deadline", "head_timeout",
                             "no complete request head before the deadline")
            return
        raise _Rejected("hello_timeout", "no complete ClientHello before the deadline")

    def _http_error(self, status: int, message: str, outcome: str, reason: str) -> None:
        """Answer in HTTP and linger (a task: the slow path), then end with `outcome`."""
        self._cancel_timer()
        if self._client_watched and self._poller is not None and self.client is not None:
            self._poller.forget(self.client.fileno())  # the linger waits with the loop's own reader
            self._client_watched = False
        self._spawn(self._answer_then_reject(status, message, outcome, reason))

    async def _answer_then_reject(self, status: int, message: str, outcome: str, reason: str) -> None:
        await self._send_http_error(status, message)
        raise _Rejected(outcome, reason)

    def _refuse_http_request(self) -> None:
        assert self.head is not None
        if self.head.host is None:
            self._http_error(400, "bad request: no Host name to route on", "no_host",
                             "request names no host, and the table has no fallback")
            return
        self._http_error(503, f"no route for host {self.head.host}", "no_route",
                         f"no route for host {self.head.host!r}")

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

    # -- the backend: resolve, connect -----------------------------------------------------------

    def _open_backend(self) -> None:
        """Connect to one of the route's backends. Several: in the balancer's order, each within its
        share of one connect_timeout; a failed one is held down (skipped by the next connections) and
        the next is tried, so the client sees an error only when all fail."""
        route = self.route
        assert route is not None
        targets: list[BackendAddress] = list(route.backends)
        if len(targets) > 1 and self.balancer is not None:
            targets = self.balancer.order(targets, time.monotonic())
        self._targets = targets
        self._try_target()

    def _attempt(self, fn: Callable[..., None], *args: Any) -> None:
        """One step of trying the current target: its failure moves on to the next target."""
        try:
            fn(*args)
        except _Rejected as exc:
            self._target_failed(exc)

    def _target_failed(self, exc: _Rejected) -> None:
        target = self._targets[self._target_index]
        self._failures.append(exc)
        balancer = self.balancer if len(self._targets) > 1 else None
        if balancer is not None and balancer.failed(target, time.monotonic(), exc.reason):
            log.warning("backend_down", backend=str(target), reason=exc.reason, hold_down=balancer.hold_down)
        self._target_index += 1
        self._try_target()

    def _try_target(self) -> None:
        """Start on the current target; raises the final rejection when none is left."""
        if self._target_index >= len(self._targets):
            failures = self._failures
            if len(failures) == 1:
                raise failures[0]
            raise _Rejected("connect_failed", "; ".join(f.reason for f in failures))
        self._attempt(self._start_target, self._targets[self._target_index])

    def _start_target(self, target: BackendAddress) -> None:
        """Resolve (from the cache at once; a query is the slow path, a task), then connect, using
        1/left of the connect_timeout remaining (the rest is for the backends after it). The timeout
        starts with the first connect, after the first resolve."""
        if isinstance(target, UnixAddress):
            self.state = State.CONNECTING
            self.backend_address, self.backend_host = str(target), None
            self._connect_start([target.path], socket.AF_UNIX, 0, str(target))
            return
        self.state = State.RESOLVING
        self.backend_host = target.host
        try:
            addresses = self.resolver.resolve_now(target.host)
        except ResolveError as exc:
            raise _Rejected("resolve_failed", str(exc)) from None
        if addresses is None:
            self._quiet_client()
            self._spawn(self._resolve_slowly(target))
            return
        self._resolved(target, addresses)

    async def _resolve_slowly(self, target: Any) -> None:
        try:
            addresses = await self.resolver.resolve(target.host)
        except ResolveError as exc:
            self._attempt(self._raise, _Rejected("resolve_failed", str(exc)))
            return
        self._task = None  # the query is over: from here on, callbacks again
        self._attempt(self._resolved, target, addresses)

    @staticmethod
    def _raise(exc: Exception) -> None:
        raise exc

    def _resolved(self, target: Any, addresses: list[str]) -> None:
        assert self.route is not None
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
        self._connect_start(allowed, 0, target.port, None)

    def _share(self, left: int) -> float:
        assert self.loop is not None
        now = self.loop.time()
        if self._connect_deadline is None:
            self._connect_deadline = now + self.policy.limits.connect_timeout
        return now + max(0.0, self._connect_deadline - now) / left

    def _connect_start(self, addresses: list[Any], family: int, port: int, unix_label: str | None) -> None:
        """Try each address in turn within this target's share of the connect_timeout; a dead address
        gets its share of the time left, so one black hole cannot use up the whole budget."""
        self._addresses = addresses
        self._address_index = 0
        self._address_errors = []
        self._address_family = family  # AF_UNIX, or 0: by the address
        self._port = port
        self._unix_label = unix_label
        # Its share of the connect_timeout is computed when a connect first has to wait: most
        # complete inside connect() (loopback) or fail at once, and then no clock is read.
        self._target_deadline = None
        self._connect_next()

    def _address_failed(self, why: str) -> None:
        if self._unix_label is not None:
            raise _Rejected("connect_failed", f"{self._unix_label}: {why}")
        self._address_errors.append(f"{peer_text(self.backend_address)}: {why}")
        self._connect_next()

    def _connect_next(self) -> None:
        assert self.loop is not None
        index = self._address_index
        if index >= len(self._addresses):
            raise _Rejected("connect_failed", "; ".join(self._address_errors))
        self._address_index += 1
        address = self._addresses[index]
        if self._address_family == _AF_UNIX:
            family, target = _AF_UNIX, address
        else:
            family = _AF_INET6 if ":" in address else _AF_INET
            target = (address, self._port)
            self.backend_address = target
        # The C socket type, as the server's accepted sockets (server._accept).
        sock = raw_socket(family, _STREAM_NONBLOCK)
        try:
            if family != _AF_UNIX:
                sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
                # Registered BEFORE connect(): the kernel captures the backend's end of a local
                # backend's connection when it becomes ESTABLISHED, before the backend can accept().
                if self.relay.shortcut is not None:
                    self._ticket = self._shortcut_ticket(sock, target)
            # `address` is an IP literal (Resolver's contract): no name lookup happens here.
            err = sock.connect_ex(target)
        except OSError as exc:
            self._drop_attempt(sock)
            # The errno says why; an address Python cannot parse (gaierror) has none.
            self._address_failed(os.strerror(exc.errno) if exc.errno else str(exc))
            return
        except BaseException:
            self._drop_attempt(sock)
            raise
        if err == 0:
            self._connected(sock, 0)
            return
        if err not in _CONNECT_PENDING:
            self._drop_attempt(sock)
            self._address_failed(os.strerror(err))
            return
        # In progress: write the first bytes now. On loopback (and whenever the handshake is done by
        # the time connect returns) this succeeds and no readiness watch or SO_ERROR read is needed;
        # a socket still in SYN_SENT says EAGAIN, a refused one its error. Not when the relay hands
        # the pair to the kernel at once: its hand-off must follow the first bytes within the same
        # callback, before the backend can answer (what it answers first would be copied instead).
        # A short-circuit ticket changes nothing here: bytes can only be sent once our end is
        # ESTABLISHED, and they reach the backend's end after the handshake's last ACK, which is
        # when the kernel captured it; the registration (above) was made before connect().
        try:
            if self.relay.handoff_at_once:
                raise BlockingIOError
            sent = sock.send(self._first_bytes())
        except (BlockingIOError, InterruptedError):
            self._connecting = sock
            self._quiet_client()
            self._watch(sock, _OUT, self._on_connect_event)
            # This address's share of the time left for the target: the rest is for the ones after it.
            target_deadline = self._target_deadline
            if target_deadline is None:
                target_deadline = self._target_deadline = self._share(len(self._targets) - self._target_index)
            now = self.loop.time()
            self._set_timer(now + (target_deadline - now) / (len(self._addresses) - index),
                            self._connect_timeout)
            return
        except OSError as exc:
            self._drop_attempt(sock)
            self._address_failed(os.strerror(exc.errno) if exc.errno else str(exc))
            return
        self._connected(sock, sent)

    def _drop_attempt(self, sock: socket.socket) -> None:
        """A connect attempt failed: close its socket, then release its short-circuit registration."""
        self._close(sock)
        self._release_ticket()

    def _release_ticket(self) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self.relay.shortcut.finish(ticket)  # type: ignore[union-attr]

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

    def _on_connect_event(self, fd: int, events: int) -> None:
        self._step(self._attempt, self._connect_ready)

    def _connect_ready(self) -> None:
        sock = self._connecting
        assert sock is not None
        self._cancel_timer()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connecting = None
            self._drop_attempt(sock)
            self._address_failed(os.strerror(err))
            return
        self._connecting = None
        self._connected(sock, 0)

    def _connect_timeout(self) -> None:
        self._timer = None
        sock = self._connecting
        assert sock is not None
        self._connecting = None
        self._drop_attempt(sock)
        self._attempt(self._address_failed, "connect timeout")

    def _first_bytes(self) -> bytes:
        """What the backend gets first: the PROXY header (if the route wants one) and every byte read
        from the client so far. Made once: a failed connect sends the same bytes to the next one."""
        if self._first is None:
            assert self.route is not None
            first = bytes(self.buffered)
            if self.route.proxy_protocol:
                header = self._proxy_header(self.route.proxy_protocol)
                self.added_up = len(header)
                first = header + first
            self._first = first
        return self._first

    def _connected(self, backend: socket.socket, sent: int) -> None:
        """Connected (`sent` of the first bytes already written): the relay owns both sockets now."""
        target = self._targets[self._target_index]
        if len(self._targets) > 1 and self.balancer is not None:
            if self.balancer.connected(target):
                log.info("backend_up", backend=str(target), by="connection")
            self._balanced = target
        if self._failures:
            self._tried = [f.reason for f in self._failures]
        self.state = State.RELAYING
        first = self._first if self._first is not None else self._first_bytes()
        client, self.client = self.client, None
        assert client is not None and self.loop is not None
        # The relay owns the registration from here on and releases it after both sockets closed.
        ticket, self._ticket = self._ticket, None
        relay = self.relay
        if self._address_family == _AF_UNIX and relay.mode != _UNIX_COPY.mode:
            self._unix = True
            relay = _UNIX_COPY
        self._running = relay.start(self.loop, client, backend, first[sent:] if sent else first,
                                    self.policy.limits.idle_timeout, self._relay_done, sent, ticket)

    def _relay_done(self, result: RelayResult | BaseException) -> None:
        self._running = None
        if isinstance(result, BaseException):
            access_log.error("connection_error", client=peer_text(self.client_address),
                             exc_info=result)
            self._end("internal_error", repr(result))
            return
        if self._unix:
            result.fallback_reason = UNIX_COPY_REASON
        self._end(result.outcome._value_, None, result)  # not .value: an enum property, slower

    def _send_alert(self, description: tls.AlertDescription) -> None:
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
