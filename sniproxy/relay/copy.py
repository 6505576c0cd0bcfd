# The userspace copy engine: both directions of a connection driven by callbacks on the raw
# non-blocking sockets (no transport, no task), with bounded buffers and half-close. Readiness comes
# from one epoll per event loop (Poller), not from loop.add_reader: uvloop stops a reader's poll
# handle for good when its socket reports POLLERR (a backend's RST while we were not reading it) and
# never calls it, so the connection would hang; our own epoll delivers ERR/HUP like any event. It ends when
# both directions are finished, or when the hand-off asked for has a quiet point: nothing read from
# either socket is still unwritten and neither socket is being read. Invariant: bytes leave in the
# order they arrived; at most one chunk per direction is held here (reading a source stops while its
# chunk waits for the destination), so memory per connection is bounded. The copy phase reports its
# end through a callback (start/on_end), so a short connection costs no task and no future; run() is
# the awaitable form for the hand-off's task.
from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
import weakref
from collections.abc import Callable

from .result import Outcome

CHUNK = 256 * 1024

HANDOFF = "handoff"
FINISHED = "finished"


# Reading also asks for EPOLLRDHUP: a FIN that came with the last data is then read in the same
# wake-up (a short connection's backend answers and closes at once: one wake-up and one dispatch
# fewer per connection). connection.py watches a client with the same mask, so the relay takes its
# registration over without an epoll_ctl.
_IN, _OUT, _ERR = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP
_RDHUP = select.EPOLLRDHUP
_TCP_CLOSE = 7  # tcp_info.tcpi_state
_SHUT_WR = socket.SHUT_WR


class Poller:
    """One level-triggered epoll for every copied socket of one event loop, itself watched by the loop
    (an epoll fd never reports POLLERR). One epoll_ctl per interest change, none per event."""

    # Weak: a loop that is gone (tests make many) takes its poller with it.
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int, int], None]] = {}
        self.masks: dict[int, int] = {}
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    # The last one asked for (one process runs one loop): no weak-key lookup per connection.
    _last: weakref.ref[Poller] | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Poller:
        last = cls._last() if cls._last is not None else None
        if last is not None and last.loop is loop:
            return last
        poller = cls._by_loop.get(loop)
        if poller is None:
            poller = cls._by_loop[loop] = cls(loop)
        cls._last = weakref.ref(poller)
        return poller

    def set(self, fd: int, mask: int, handler: Callable[[int, int], None]) -> None:
        """Watch fd for mask (0: none); a socket no longer in `handlers` is (re)registered. A socket
        keeps one registration for its whole life (hello, connect, copy): the handler changes hands
        for free, and only a changed mask costs an epoll_ctl."""
        known = self.masks.get(fd)
        if known is None:
            self.epoll.register(fd, mask)
        elif known != mask:
            self.epoll.modify(fd, mask)
        self.masks[fd] = mask
        self.handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Stop watching a socket that stays open (a hand-off, or one failing while unwatched)."""
        if self.handlers.pop(fd, None) is not None:
            del self.masks[fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def drop(self, fd: int) -> None:
        """Forget a socket about to be closed: closing its only descriptor takes it out of the epoll
        set (EPOLL_CTL_DEL would be one more system call for nothing)."""
        if self.handlers.pop(fd, None) is not None:
            del self.masks[fd]

    def _dispatch(self) -> None:
        for fd, events in self.epoll.poll(0, 512):
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(fd, events)


class Flow:
    """Bytes from src to dst. `name` is the source side ("client" or "backend")."""

    __slots__ = ("name", "src", "dst", "src_fd", "dst_fd", "pending", "moved", "eof", "shut",
                 "reading", "writing", "fin_sent")

    def __init__(self, name: str, src: socket.socket, dst: socket.socket, src_fd: int, dst_fd: int) -> None:
        self.name = name
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src_fd, dst_fd
        self.pending: memoryview | None = None  # read from src, not yet written to dst
        self.moved = 0  # bytes read from src (and the ClientHello for the client's flow)
        self.eof = False  # src sent its FIN
        self.shut = False  # dst was shut down for writing (or will be by close(): see _shut)
        self.fin_sent = False  # dst's FIN is in its send stream already (shutdown() was called)
        self.reading = False
        self.writing = False


def _was_reset(sock: socket.socket) -> bool:
    """At EOF on a socket whose sending side we did not shut (else CLOSE is the clean end of an
    active close, the socket having passed into TIME_WAIT): whether it was in fact reset (TCP state
    CLOSE, not CLOSE_WAIT) and another sender on it took the error first: the local-backend short-circuit's redirect does
    (tcp_sendmsg's error path reads and clears sk_err), and recv() then returns 0 as for a FIN."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:  # not TCP (a unix-socket backend)
        return False


def other(name: str) -> str:
    return "backend" if name == "client" else "client"


class CopyPhase:
    """Copies until the end, or until a hand-off point (see module header). run() returns FINISHED
    (both sockets closed) or HANDOFF (both open, idle, every byte read so far written)."""

    # Defaults as class attributes: one store each saved per connection (every one is replaced in
    # an instance, never mutated).
    handoff_wanted = False
    outcome: Outcome | None = None
    closed = False
    on_end: Callable[[str], None] | None = None  # called once per start(): FINISHED or HANDOFF
    _idle: asyncio.TimerHandle | None = None
    _reset_side: str | None = None
    # Bytes that bypass this engine (the local-backend short-circuit) still count as activity:
    # returns their last time.monotonic(), or None.
    activity: Callable[[], float | None] | None = None
    # Called once just before the sockets are closed (the short-circuit reads the client's
    # counters there).
    on_close: Callable[[], None] | None = None
    # A socket that another sender also writes to (the client's, under the short-circuit's
    # redirect): a reset of it may have been consumed by that sender, so its EOF is checked.
    shared_sender: socket.socket | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, backend: socket.socket,
                 idle_timeout: float, handoff_at: int | None) -> None:
        self.loop = loop
        self.poller = Poller.of(loop)
        self.client, self.backend = client, backend
        client_fd, backend_fd = client.fileno(), backend.fileno()
        self.up = Flow("client", client, backend, client_fd, backend_fd)
        self.down = Flow("backend", backend, client, backend_fd, client_fd)
        self.idle_timeout = idle_timeout
        self.handoff_at = handoff_at  # None: never
        self.last_activity = time.monotonic()

    # -- running -----------------------------------------------------------------------------------
    def start(self, on_end: Callable[[str], None], first: bytes = b"", sent: int = 0) -> None:
        """Start (or resume after a refused hand-off) copying; on_end(how) is called once, when it
        stops. `first` goes to the backend before anything read from the client; `sent` bytes of the
        client's were already written to the backend (counted in up.moved, not written again)."""
        self.on_end = on_end
        self.handoff_wanted = False
        self.up.moved += sent
        if first:
            self.up.moved += len(first)
            self.up.pending = memoryview(first)
            self._write(self.up)
        for flow in (self.up, self.down):
            if flow.pending is None and not flow.eof and not self.closed:
                self._start_reading(flow)
            elif flow.eof and flow.pending is None and not flow.shut:
                self._shut(flow)
        self._check_end()
        if self.on_end is None:
            return  # already over
        if self.handoff_at is not None and (self.handoff_at == 0 or max(self.up.moved, self.down.moved) >= self.handoff_at):
            self._want_handoff()
        if self.on_end is not None:
            self._watch_idle()

    async def run(self, first: bytes = b"") -> str:
        """start() as an awaitable: FINISHED or HANDOFF. Cancelled: aborted, outcome SHUTDOWN."""
        done: asyncio.Future[str] = self.loop.create_future()
        self.start(lambda how: done.done() or done.set_result(how), first)
        try:
            return await done
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cut now (the server's drain deadline): both sockets reset, on_end(FINISHED)."""
        self.outcome = self.outcome or Outcome.SHUTDOWN
        self.close(abort=True)

    def _finish(self, how: str) -> None:
        on_end, self.on_end = self.on_end, None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if on_end is not None:
            on_end(how)

    # -- callbacks ---------------------------------------------------------------------------------
    def _on_readable(self, flow: Flow) -> None:
        try:
            data = flow.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._reset(flow.name)
            return
        self.last_activity = time.monotonic()
        if not data:
            back = self.down if flow is self.up else self.up  # the flow writing into flow.src
            if flow.src is self.shared_sender and not back.shut and _was_reset(flow.src):
                self._reset(flow.name)
                return
            flow.eof = True
            flow.reading = False
            if flow.pending is None:
                self._shut(flow)
            self._check_end()
            if not self.closed:
                self._update(flow)  # stop reading it (unless everything just closed: no call)
            if self.handoff_wanted:
                self._cancel_handoff()
            return
        flow.moved += len(data)
        flow.pending = memoryview(data)
        self._write(flow)
        if self.handoff_at is not None and flow.moved >= self.handoff_at and not self.handoff_wanted:
            self._want_handoff()

    def _write(self, flow: Flow) -> None:
        """Write flow.pending now; what does not fit waits for writability with src not read."""
        assert flow.pending is not None
        try:
            n = flow.dst.send(flow.pending)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._reset(other(flow.name))
            return
        if n == len(flow.pending):
            flow.pending = None
            self._set_writing(flow, False)
            self._after_written(flow)
            return
        flow.pending = flow.pending[n:]
        self._stop_reading(flow)
        self._set_writing(flow, True)

    def _on_writable(self, flow: Flow) -> None:
        if flow.pending is not None:
            self.last_activity = time.monotonic()
            self._write(flow)

    def _after_written(self, flow: Flow) -> None:
        if self._reset_side is not None:
            self._close_after_reset()
        elif flow.eof:
            self._shut(flow)
            self._check_end()
        elif self.handoff_wanted:
            self._maybe_quiet()
        else:
            self._start_reading(flow)

    # -- reading switches ---------------------------------------------------------------------------
    def _start_reading(self, flow: Flow) -> None:
        if not flow.reading and not self.closed:
            flow.reading = True
            self._update(flow)

    def _stop_reading(self, flow: Flow) -> None:
        if flow.reading:
            flow.reading = False
            self._update(flow)

    def _set_writing(self, flow: Flow, on: bool) -> None:
        if flow.writing != on:
            flow.writing = on
            self._update(self.down if flow is self.up else self.up)  # the flow reading flow.dst

    def _update(self, src: Flow) -> None:
        """The epoll interest of the socket src reads: reading src, writing the other flow into it."""
        into = self.down if src is self.up else self.up
        mask = (_IN if src.reading else 0) | (_OUT if into.writing else 0)
        fd = src.src_fd
        poller = self.poller
        if mask or fd in poller.handlers:
            poller.set(fd, mask, self._on_event)

    def _on_event(self, fd: int, events: int) -> None:
        src, into = (self.up, self.down) if fd == self.up.src_fd else (self.down, self.up)
        if events & (_IN | _ERR) and src.reading:
            self._on_readable(src)
            if events & _RDHUP and src.reading and not self.closed:
                self._on_readable(src)  # the FIN behind the data just read: at EOF now, no wake-up more
        if events & (_OUT | _ERR) and into.writing and not self.closed:
            self._on_writable(into)
        if events & _ERR and not (src.reading or into.writing) and not self.closed:
            # Failed while nothing is asked of it (level-triggered ERR/HUP would fire on and on):
            # stop watching; the next read or write of it meets the error.
            self.poller.forget(fd)

    def _shut(self, flow: Flow) -> None:
        flow.shut = True
        if (self.down if flow is self.up else self.up).shut:
            # The last direction: close() follows at once (_check_end) and sends this FIN itself;
            # nothing is unread on that socket (its EOF was read), so it is a FIN, not a reset.
            return
        try:  # not contextlib.suppress: this runs for every connection, and a try costs nothing
            flow.dst.shutdown(_SHUT_WR)
            flow.fin_sent = True
        except OSError:
            pass

    # -- hand-off ----------------------------------------------------------------------------------
    def _want_handoff(self) -> None:
        if self.up.eof or self.down.eof or self.closed:
            return  # a socket that got its FIN cannot enter sock_map: stay here
        self.handoff_wanted = True
        self._stop_reading(self.up)
        self._stop_reading(self.down)
        self._maybe_quiet()

    def _maybe_quiet(self) -> None:
        if self.up.pending is None and self.down.pending is None:
            self._finish(HANDOFF)

    def _cancel_handoff(self) -> None:
        self.handoff_wanted = False
        self.handoff_at = None
        for flow in (self.up, self.down):
            if flow.pending is None and not flow.eof:
                self._start_reading(flow)

    # -- ending --------------------------------------------------------------------------------------
    def _check_end(self) -> None:
        if self.up.shut and self.down.shut:
            self.outcome = self.outcome or Outcome.CLOSED
            self.close()

    def _reset(self, side: str) -> None:
        """side's socket failed. What it sent before is still delivered: the flow from it is flushed,
        then the other socket is closed (bounded by the idle timeout)."""
        if self._reset_side is not None:
            self.close()  # the other side failed too while its last bytes were being flushed
            return
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_RESET if side == "client" else Outcome.BACKEND_RESET
        self._reset_side = side
        for flow in (self.up, self.down):
            self._stop_reading(flow)
        self._close_after_reset()

    def _close_after_reset(self) -> None:
        from_failed = self.up if self._reset_side == "client" else self.down
        if from_failed.pending is None:
            self.close()

    def _watch_idle(self) -> None:
        if self.closed:
            return
        remaining = self.last_activity + self.idle_timeout - time.monotonic()
        if remaining <= 0 and self.activity is not None:
            elsewhere = self.activity()
            if elsewhere is not None and elsewhere > self.last_activity:
                self.last_activity = elsewhere
                remaining = self.last_activity + self.idle_timeout - time.monotonic()
        if remaining > 0:
            self._idle = self.loop.call_later(remaining, self._watch_idle)
            return
        self._idle = None
        self.outcome = self.outcome or Outcome.IDLE_TIMEOUT
        self.close(abort=True)

    def detach(self) -> None:
        """Stop every callback on both sockets (they stay open): the kernel takes them over."""
        for flow in (self.up, self.down):
            flow.reading = flow.writing = False
        self.poller.forget(self.up.src_fd)
        self.poller.forget(self.down.src_fd)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        for flow in (self.up, self.down):
            flow.reading = flow.writing = False
        self.poller.drop(self.up.src_fd)
        self.poller.drop(self.down.src_fd)
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        for sock in (self.client, self.backend):
            if abort:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        self._finish(FINISHED)
