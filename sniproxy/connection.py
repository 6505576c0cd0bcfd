# One client connection's life: read the ClientHello under a deadline, route, resolve, connect, relay.
# Invariant: handle() always closes both sockets and emits exactly one access-log event, whatever
# happens (bad input, dead backend, cancellation at shutdown); `state` says where it ended.
from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from sniproxy import tls
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


class _Rejected(Exception):
    """Ends a connection before relaying, with the access log's outcome and a human reason."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def _peer_text(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Connection:
    def __init__(
        self,
        client: socket.socket,
        client_address: Any,
        listener: str,
        policy: Policy,
        resolver: Resolver,
        relay: Relay,
    ) -> None:
        self.client = client
        self.client_address = client_address
        self.listener = listener
        self.policy = policy
        self.resolver = resolver
        self.relay = relay
        self.state = State.ACCEPTED
        self.started = time.monotonic()
        self.hello: tls.ClientHello | None = None
        self.route: Route | None = None
        self.backend_address: Any = None
        self.buffered = bytearray()

    async def handle(self) -> None:
        outcome = "error"
        reason: str | None = None
        result: RelayResult | None = None
        backend: socket.socket | None = None
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
            self.state = State.CONNECTING
            backend = await self._connect(addresses)
            self.state = State.RELAYING
            # The relay owns both sockets from here on and closes them.
            client, self.client, relay_backend, backend = self.client, None, backend, None
            result = await self.relay.relay(
                client, relay_backend, bytes(self.buffered), self.policy.limits.idle_timeout
            )
            outcome = result.outcome.value
        except _Rejected as exc:
            outcome, reason = exc.outcome, exc.reason
        except asyncio.CancelledError:
            outcome = Outcome.SHUTDOWN.value
            raise
        except Exception as exc:  # a bug, not bad input: log it loudly but keep the server running
            outcome, reason = "internal_error", repr(exc)
            access_log.exception("connection_error", client=_peer_text(self.client_address))
        finally:
            for sock in (self.client, backend):
                if sock is not None:
                    sock.close()
            self._log(outcome, reason, result)
            self.state = State.CLOSED

    async def _read_hello(self) -> tls.ClientHello:
        self.state = State.READING_HELLO
        loop = asyncio.get_running_loop()
        reader = tls.ClientHelloReader(max_size=self.policy.limits.max_client_hello_size)
        try:
            async with asyncio.timeout(self.policy.limits.client_hello_timeout):
                while True:
                    data = await loop.sock_recv(self.client, _RECV_SIZE)
                    if not data:
                        raise _Rejected("client_closed", "client closed before a complete ClientHello")
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

    async def _connect(self, addresses: list[str]) -> socket.socket:
        """Try each address in turn within one connect_timeout; a dead address gets its share of the
        time left, so one black hole cannot use up the whole budget."""
        assert self.route is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.limits.connect_timeout
        errors: list[str] = []
        for index, address in enumerate(addresses):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            target = (address, self.route.port)
            self.backend_address = target
            share = (deadline - loop.time()) / (len(addresses) - index)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                async with asyncio.timeout(share):
                    await loop.sock_connect(sock, target)
                return sock
            except TimeoutError:
                errors.append(f"{_peer_text(target)}: connect timeout")
            except OSError as exc:
                # uvloop's message is "Connect call failed"; the errno says why.
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                errors.append(f"{_peer_text(target)}: {why}")
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
            "client": _peer_text(self.client_address),
            "listener": self.listener,
            "sni": hello.sni if hello else None,
            "alpn": list(hello.alpn) if hello else [],
            "route": self.route.rule if self.route else None,
            "backend_host": self.route.host if self.route else None,
            "backend": _peer_text(self.backend_address) if self.backend_address else None,
            "bytes_up": result.bytes_up if result else 0,
            "bytes_down": result.bytes_down if result else 0,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "relay": result.mode if result else None,
            "outcome": outcome,
            "state": self.state.value,
        }
        if reason:
            event["reason"] = reason
        if result and result.fallback_reason:
            event["splice_fallback"] = result.fallback_reason
        access_log.info("access", **event)
