# Moves a connection's bytes once the ClientHello has been routed: CopyRelay copies in userspace,
# SpliceRelay (sniproxy.splice_relay) hands the sockets to the kernel. Both take ownership of the two
# sockets, deliver `first` to the backend before anything else, and close both sockets before returning.
from __future__ import annotations

import asyncio
import dataclasses
import enum
import socket
import time
from typing import Protocol


class Outcome(str, enum.Enum):
    """How a relayed connection ended (the access log's `outcome` field)."""

    CLOSED = "closed"  # both directions finished with FIN
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"  # cut by the server's drain deadline


@dataclasses.dataclass
class RelayResult:
    mode: str  # "copy" or "splice"
    bytes_up: int  # client -> backend, including the ClientHello
    bytes_down: int  # backend -> client
    outcome: Outcome
    fallback_reason: str | None = None  # why a splice was attempted but the copy path carried it


class Relay(Protocol):
    mode: str

    def use_worker(self, index: int) -> None:
        """Called once in a worker process ([server] workers), after the fork, before relaying."""

    async def relay(
        self, client: socket.socket, backend: socket.socket, first: bytes, idle_timeout: float
    ) -> RelayResult: ...


# Past this much unsent data towards one side, reading from the other side pauses: memory per
# connection stays bounded whatever the speed difference between client and backend.
_WRITE_HIGH_WATER = 256 * 1024
_WRITE_LOW_WATER = 64 * 1024


class _Side(asyncio.Protocol):
    """One socket of a copied pair; forwards what it reads to its peer's transport."""

    def __init__(self, relay: _CopiedPair, name: str) -> None:
        self.pair = relay
        self.name = name
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.eof = False
        # The backend side starts reading before the client side's transport exists (the ServerHello
        # can arrive in between): hold what arrives until the peer is ready.
        self.held: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER, _WRITE_LOW_WATER)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            for data in peer.held:
                self.transport.write(data)
            peer.held.clear()
            if peer.eof:
                self.transport.write_eof()
            peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.pair.last_activity = time.monotonic()
        assert self.peer is not None
        if self.peer.transport is None:
            self.held.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # Half-close: pass the FIN on (after the peer's buffer drains) and keep the other way open.
        self.eof = True
        assert self.peer is not None
        if self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.write_eof()
        self.pair.maybe_finish()
        return True

    # The peer's transport calls these on our protocol when *our* outgoing buffer fills or drains;
    # the fix is to stop reading from the peer, which is what feeds that buffer.
    def pause_writing(self) -> None:
        if self.peer and self.peer.transport and not self.peer.transport.is_closing():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None:
            self.pair.reset_by(self)
        self.pair.maybe_finish()
        self.pair.maybe_done()


class _CopiedPair:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.client = _Side(self, "client")
        self.backend = _Side(self, "backend")
        self.client.peer, self.backend.peer = self.backend, self.client
        self.last_activity = time.monotonic()
        self.outcome: Outcome | None = None
        # Set once both sockets are gone: the one thing CopyRelay waits for.
        self.done: asyncio.Future[None] = loop.create_future()
        self.idle_timer: asyncio.TimerHandle | None = None

    def reset_by(self, side: _Side) -> None:
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_RESET if side is self.client else Outcome.BACKEND_RESET
        # What the reset side sent before its RST is still delivered: close() flushes, then closes.
        # A peer that never reads would hold the flush forever; the idle timeout aborts it.
        assert side.peer is not None
        if side.peer.transport is not None:
            side.peer.transport.close()

    def maybe_finish(self) -> None:
        if self.client.eof and self.backend.eof:
            self.outcome = self.outcome or Outcome.CLOSED
            # close() flushes what is still buffered before closing the socket.
            for side in (self.client, self.backend):
                if side.transport is not None:
                    side.transport.close()
        elif self.client.lost or self.backend.lost:
            # One socket is gone for good (error or both halves closed on it): nothing more can flow.
            for side in (self.client, self.backend):
                if side.transport is not None and not side.transport.is_closing():
                    side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.backend):
            if side.transport is not None:
                side.transport.abort()

    def maybe_done(self) -> None:
        if self.client.lost and self.backend.lost and not self.done.done():
            self.done.set_result(None)

    def watch_idle(self, idle_timeout: float) -> None:
        """A timer re-armed for the time left since the last byte, not once per byte: data_received
        only stamps last_activity."""
        remaining = self.last_activity + idle_timeout - time.monotonic()
        if remaining > 0:
            self.idle_timer = self.loop.call_later(remaining, self.watch_idle, idle_timeout)
            return
        self.idle_timer = None
        self.outcome = self.outcome or Outcome.IDLE_TIMEOUT
        self.abort()


class CopyRelay:
    """Userspace copy with backpressure and half-close; the fallback for every splice failure."""

    mode = "copy"

    def use_worker(self, index: int) -> None:
        pass  # nothing shared between processes

    async def relay(
        self,
        client: socket.socket,
        backend: socket.socket,
        first: bytes,
        idle_timeout: float,
        fallback_reason: str | None = None,
    ) -> RelayResult:
        loop = asyncio.get_running_loop()
        pair = _CopiedPair(loop)
        try:
            await loop.connect_accepted_socket(lambda: pair.backend, backend)
        except BaseException:
            client.close()
            backend.close()
            raise
        # `first` goes out before the client side is read at all, so nothing the client sends later
        # (not even its FIN, which may already be queued) can overtake it.
        assert pair.backend.transport is not None
        if first:
            pair.backend.transport.write(first)
        try:
            await loop.connect_accepted_socket(lambda: pair.client, client)
        except BaseException:
            client.close()
            pair.abort()
            raise
        try:
            await self._wait(pair, idle_timeout)
        except asyncio.CancelledError:
            pair.outcome = pair.outcome or Outcome.SHUTDOWN
            pair.abort()
            raise
        return RelayResult(
            mode=self.mode,
            bytes_up=len(first) + pair.client.received,
            bytes_down=pair.backend.received,
            outcome=pair.outcome or Outcome.CLOSED,
            fallback_reason=fallback_reason,
        )

    @staticmethod
    async def _wait(pair: _CopiedPair, idle_timeout: float) -> None:
        """Until both sockets are gone; past idle_timeout without a byte either way, abort them
        (which ends in the same place)."""
        pair.watch_idle(idle_timeout)
        try:
            await pair.done
        finally:
            if pair.idle_timer is not None:
                pair.idle_timer.cancel()
