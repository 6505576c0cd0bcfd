# The relay layer: moves a routed connection's bytes until both sides are done. Every connection
# starts in the userspace copy engine (relay.copy); with a splice table it is handed to the kernel
# (relay.handoff, relay.spliced) once it has moved `splice_after` bytes either way, so a short
# connection never costs a bpf() call. A connection to a local backend may also carry a short-circuit
# ticket (relay.shortcut): the kernel then moves backend -> client itself and the phases here see
# only the client's bytes and the backend's FIN/RST; the ticket is released after both sockets
# closed, and its byte count folded into the result. Invariant: Relay.start() (and its awaitable form
# relay()) owns both sockets from the call on, delivers `first` to the backend before anything else,
# closes both, and reports exactly once. A connection that is never handed off runs on callbacks
# only; the hand-off and the kernel phase run in a task of their own.
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import Callable

from .copy import FINISHED, HANDOFF, CopyPhase
from .result import Outcome, RelayResult

__all__ = ["Outcome", "Relay", "RelayResult", "Running"]

_TCP_ESTABLISHED = 1  # tcp_info.tcpi_state

# Default [ebpf] splice_after: at ~110 us of extra proxy CPU per handed-off pair, the kernel path
# pays for itself from about 1 MB moved (docs/benchmarks.md).
DEFAULT_SPLICE_AFTER = 1 << 20


class Relay:
    """One per process. Without a table: copy only (mode "copy"). With one (mode "splice"): copy,
    then hand off at splice_after bytes (0: at once); a hand-off the kernel refuses keeps copying."""

    def __init__(self, table: object | None = None, *, splice_after: int = DEFAULT_SPLICE_AFTER,
                 sndbuf: int | None = None, rcvbuf: int | None = None) -> None:
        self.table = table
        # The local-backend short-circuit (relay.shortcut.Shortcut), set by dataplane when
        # [ebpf] shortcut_cgroup loads; None: off.
        self.shortcut = None
        self.mode = "copy" if table is None else "splice"
        self.splice_after = splice_after
        # splice_after = 0: every pair goes to the kernel as soon as the first bytes are written. An
        # attribute, not a property: every connection asks (fixed for the Relay's life).
        self.handoff_at_once = table is not None and splice_after == 0
        self._buffer: bytearray | None = None
        self._watcher = None
        self._workers = (0, 1)
        self._buffers = None
        if table is not None:
            from .handoff import DEFAULT_SNDBUF, HANDOFF_RCVBUF

            self.sndbuf = DEFAULT_SNDBUF if sndbuf is None else sndbuf
            self.rcvbuf = HANDOFF_RCVBUF if rcvbuf is None else rcvbuf

    def use_worker(self, index: int, workers: int = 1) -> None:
        """Called once in a worker process ([server] workers), after the fork, before relaying: pairs
        handed off here wake this worker's ring and use its share of the slots."""
        if self.table is not None:
            self.table.use_worker(index, workers)  # type: ignore[attr-defined]

    def forget_worker(self, index: int, workers: int) -> None:
        """In the supervisor, after worker `index` died: drop its pairs' map entries (the kernel
        closed its sockets, which took them out of sock_map), and say how many."""
        if self.table is not None:
            count = self.table.forget_worker(index, workers)  # type: ignore[attr-defined]
            if count:
                import structlog

                structlog.get_logger("sniproxy.relay").warning("worker_pairs_forgotten", worker=index,
                                                               entries=count)

    def start(self, loop: asyncio.AbstractEventLoop, client: socket.socket, backend: socket.socket,
              first: bytes, idle_timeout: float, on_done: Callable[[RelayResult | BaseException], None],
              sent: int = 0, ticket=None) -> Running:  # noqa: ANN001
        """Relay from callbacks: on_done(result) once both sockets are closed (or the exception of a
        bug). `sent`: bytes of the client's already written to the backend (a connect that completed
        with the first write), counted in bytes_up. `ticket`: the short-circuit registration of this
        connection (Shortcut.prepare, made before the backend's connect()), if any: released after
        both sockets are closed, before on_done."""
        running = Running(self, loop, client, backend, idle_timeout, on_done, ticket)
        running.copy.start(running.copy_ended, first, sent)
        return running

    async def relay(self, client: socket.socket, backend: socket.socket, first: bytes,
                    idle_timeout: float, ticket=None) -> RelayResult:  # noqa: ANN001
        """start() as an awaitable; cancelled, it cuts the connection and returns once it is closed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[RelayResult | BaseException] = loop.create_future()
        running = self.start(loop, client, backend, first, idle_timeout,
                             lambda r: done.done() or done.set_result(r), ticket=ticket)
        try:
            result = await asyncio.shield(done)
        except asyncio.CancelledError:
            running.cancel()
            await asyncio.wait([done])
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    def copied(self, copy: CopyPhase, fallback: str | None) -> RelayResult:
        if self.table is not None and fallback is None:
            fallback = f"moved under [ebpf] splice_after = {self.splice_after} bytes"
        return RelayResult(mode="copy", bytes_up=copy.up.moved, bytes_down=copy.down.moved,
                           outcome=copy.outcome or Outcome.CLOSED, fallback_reason=fallback)

    def _ensure_buffer(self) -> None:
        """The kernel phase's buffer, for what it forwards itself: made at the first hand-off."""
        if self._buffer is None:
            from .handoff import kernel_buffer_size

            self._buffer = bytearray(kernel_buffer_size(self.rcvbuf))

    def hand_off_now(self, copy: CopyPhase, ticket=None):  # noqa: ANN001, ANN201
        """The hand-off without waiting, when nothing waits in either receive queue (the usual case
        right after the first bytes): the kernel takes the pair in the callback that wrote them,
        before the backend can answer. None: something (or a FIN) waits; the task flushes it."""
        from .handoff import Refused, insert

        self._ensure_buffer()
        copy.detach()
        for sock in (copy.client, copy.backend):
            # Asked without touching the receive queue (no MSG_PEEK: a peek is the suspect of an
            # earlier duplication, docs/benchmarks.md): still ESTABLISHED (no FIN in), nothing unread.
            try:
                if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED:
                    return None
                if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]:
                    return None
            except OSError:
                return None
        try:
            inserted = insert(self.table, copy.client, copy.backend, self._buffer_sizes())  # type: ignore[arg-type]
        except Refused as exc:
            return str(exc)
        # Watched from the same callback: a hold the verdict announces from now on finds its pair.
        return self.splice_begin(copy.loop, copy, inserted, ticket)

    async def after_handoff(self, loop: asyncio.AbstractEventLoop, copy: CopyPhase, now=None,  # noqa: ANN001
                            ticket=None) -> RelayResult:  # noqa: ANN001
        """The copy phase stopped at a quiet point: hand the pair to the kernel, or keep copying.
        `now`: what hand_off_now() gave (None: nothing yet); `ticket`: the connection's short-circuit
        registration, measured just before the kernel phase closes the client socket."""
        how = HANDOFF
        fallback: str | None = None
        try:
            while how != FINISHED:
                # A quiet point: hand the pair to the kernel, or say why not and keep copying.
                spliced, now = (now if now is not None else await self._hand_off(loop, copy)), None
                if isinstance(spliced, str):
                    fallback = spliced
                    copy.handoff_at = None
                    how = await copy.run()
                    continue
                begun = spliced if isinstance(spliced, Begun) else self.splice_begin(loop, copy, spliced, ticket)
                return await self._run_spliced(begun, copy.idle_timeout)
        except BaseException:
            copy.close(abort=True)
            raise
        return self.copied(copy, fallback)

    async def _hand_off(self, loop: asyncio.AbstractEventLoop, copy: CopyPhase):  # noqa: ANN202
        from .handoff import Refused, flush_waiting, insert

        self._ensure_buffer()
        copy.detach()
        try:
            await flush_waiting(loop, (copy.up, copy.down), self._buffer)
        except OSError as exc:
            return f"flushing before the hand-off failed: {exc.strerror or exc}"
        if copy.up.eof or copy.down.eof:
            return "a side half-closed before the hand-off"
        try:
            return insert(self.table, copy.client, copy.backend, self._buffer_sizes())  # type: ignore[arg-type]
        except Refused as exc:
            return str(exc)

    def _buffer_sizes(self):  # noqa: ANN202
        """Decided at the first hand-off of this process (after any privilege drop), logged once."""
        if self._buffers is None:
            import structlog

            from .handoff import BufferSizes

            self._buffers = BufferSizes.plan(self.sndbuf, self.rcvbuf)
            structlog.get_logger("sniproxy.relay").info(
                "splice_buffers", sndbuf=self._buffers.sndbuf, rcvbuf=self._buffers.rcvbuf,
                note=self._buffers.note)
        return self._buffers

    def _watcher_for(self, loop: asyncio.AbstractEventLoop):  # noqa: ANN202
        from .spliced import Watcher

        if self._watcher is None or self._watcher.loop is not loop:
            self._watcher = Watcher(loop, self.table)  # type: ignore[arg-type]
        return self._watcher

    def splice_begin(self, loop: asyncio.AbstractEventLoop, copy: CopyPhase, inserted, ticket=None) -> Begun:  # noqa: ANN001
        """The kernel phase's state for an inserted pair, watched (hang-ups, holds) from this call on."""
        from .spliced import SplicedConnection

        assert self._buffer is not None
        conn = SplicedConnection(loop, self.table, inserted.pair, copy.client, copy.backend,  # type: ignore[arg-type]
                                 inserted.client_base, inserted.backend_base, self._buffer)
        watcher = self._watcher_for(loop)
        conn.attach(watcher)
        return Begun(copy, inserted, conn, watcher, ticket)

    async def _run_spliced(self, begun: Begun, idle_timeout: float) -> RelayResult:
        try:
            await begun.conn.run(begun.watcher, idle_timeout)
        except BaseException:
            self.splice_end(begun)
            raise
        return self.splice_end(begun)

    def splice_end(self, begun: Begun) -> RelayResult:
        """Close the pair's sockets, take it out of the maps; its result. Once (later calls: the same)."""
        if begun.result is not None:
            return begun.result
        copy, inserted, conn, watcher = begun.copy, begun.inserted, begun.conn, begun.watcher
        watcher.discard(conn.up)
        watcher.discard(conn.down)
        copy.closed = True
        if begun.ticket is not None:
            begun.ticket.measure(copy.client, conn.down.finished)
        copy.client.close()
        copy.backend.close()
        # The counters live in the slots until they are reused: read them before giving them back.
        up_kernel, down_kernel = inserted.pair.a.redir_bytes, inserted.pair.b.redir_bytes
        with contextlib.suppress(OSError):
            self.table.remove(inserted.pair)  # type: ignore[attr-defined]
        if watcher.empty and self._watcher is watcher:
            watcher.close()
            self._watcher = None
        begun.result = RelayResult(
            mode="splice",
            bytes_up=copy.up.moved + conn.up.forwarded + up_kernel,
            bytes_down=copy.down.moved + conn.down.forwarded + down_kernel,
            outcome=conn.outcome or Outcome.CLOSED,
            kernel_bytes=up_kernel + down_kernel,
            kernel_up=up_kernel,
            kernel_down=down_kernel,
        )
        return begun.result


class Begun:
    """A pair in the kernel phase: what splice_end() needs to close it and report it."""

    __slots__ = ("copy", "inserted", "conn", "watcher", "ticket", "result")

    def __init__(self, copy: CopyPhase, inserted, conn, watcher, ticket=None) -> None:  # noqa: ANN001
        self.copy, self.inserted, self.conn, self.watcher = copy, inserted, conn, watcher
        self.ticket = ticket  # the short-circuit's (relay.shortcut.Ticket), or None
        self.result: RelayResult | None = None


class Running:
    """One connection being relayed: the copy phase on callbacks, then (after a hand-off point) a task
    for the hand-off and the kernel phase. cancel() cuts it; on_done follows, exactly once (at once
    while copying)."""

    __slots__ = ("relay", "loop", "copy", "on_done", "task", "begun", "reported", "ticket")

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 backend: socket.socket, idle_timeout: float,
                 on_done: Callable[[RelayResult | BaseException], None], ticket=None) -> None:  # noqa: ANN001
        self.relay = relay
        self.loop = loop
        handoff_at = None if relay.table is None else relay.splice_after
        self.copy = copy = CopyPhase(loop, client, backend, idle_timeout, handoff_at)
        self.on_done = on_done
        self.task: asyncio.Task[None] | None = None
        self.begun: Begun | None = None
        self.reported = False
        self.ticket = ticket
        if ticket is not None:
            # Bytes the kernel moves backend -> client count as activity for the idle timeout, and
            # the client socket's counters are read just before the copy phase closes it (fin_sent:
            # a FIN the copy engine deferred to close() is not in the send stream yet).
            copy.activity = ticket.last_activity
            copy.on_close = lambda: ticket.measure(client, copy.down.fin_sent)
            copy.shared_sender = client

    def _report(self, result: RelayResult | BaseException) -> None:
        if self.reported:
            return
        self.reported = True
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            # Both sockets are closed by now (a bug's exception too: the phases close them first).
            finished = self.relay.shortcut.finish(ticket)  # type: ignore[attr-defined]
            if isinstance(result, RelayResult):
                result.shortcut = finished.captured
                result.shortcut_bytes = finished.moved(ticket, result.bytes_down)
                result.shortcut_fallback = finished.reason
                result.bytes_down += result.shortcut_bytes
        self.on_done(result)

    def copy_ended(self, how: str) -> None:
        if how == FINISHED:
            self._report(self.relay.copied(self.copy, None))
            return
        try:
            now = self.relay.hand_off_now(self.copy, self.ticket)
        except Exception as exc:  # a bug: the connection reports it (access log internal_error)
            self.copy.close(abort=True)
            self._report(exc)
            return
        if isinstance(now, Begun):
            self.begun = now
        self.task = self.loop.create_task(self._after_handoff(now))
        self.task.add_done_callback(self._task_done)

    async def _after_handoff(self, now) -> None:  # noqa: ANN001
        try:
            result: RelayResult | BaseException = await self.relay.after_handoff(self.loop, self.copy, now, self.ticket)
        except asyncio.CancelledError:
            result = self._shut_down()
        except Exception as exc:  # a bug: the connection reports it (access log internal_error)
            result = exc
        self._report(result)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never ran its own except clause.
        if not self.reported:
            self._report(self._shut_down())

    def _shut_down(self) -> RelayResult:
        if self.begun is not None and self.begun.result is None and not self.begun.conn.done.is_set():
            self.begun.conn.outcome = self.begun.conn.outcome or Outcome.SHUTDOWN
            self.begun.conn.abort()
            return self.relay.splice_end(self.begun)
        if self.begun is not None and self.begun.result is not None:
            return self.begun.result
        copy = self.copy
        copy.outcome = copy.outcome or Outcome.SHUTDOWN
        copy.close(abort=True)
        return RelayResult(mode="copy", bytes_up=copy.up.moved, bytes_down=copy.down.moved,
                           outcome=Outcome.SHUTDOWN)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        else:
            self.copy.cancel()
