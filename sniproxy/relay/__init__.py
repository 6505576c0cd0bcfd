# The relay layer: moves a routed connection's bytes until both sides are done. Every connection
# starts in the userspace copy engine (relay.copy); with a splice table it is handed to the kernel
# (relay.handoff, relay.spliced) once it has moved `splice_after` bytes either way, so a short
# connection never costs a bpf() call. A connection to a local backend may also carry a short-circuit
# ticket (relay.shortcut): the kernel then moves backend -> client itself and the phases here see
# only the client's bytes and the backend's FIN/RST; the ticket is released after both sockets
# closed, and its byte count folded into the result. Invariant: Relay.relay() owns both sockets from the call on,
# delivers `first` to the backend before anything else, and closes both before it returns.
from __future__ import annotations

import asyncio
import contextlib
import socket

from .copy import FINISHED, CopyPhase
from .result import Outcome, RelayResult

__all__ = ["Outcome", "Relay", "RelayResult"]

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

    async def relay(self, client: socket.socket, backend: socket.socket, first: bytes,
                    idle_timeout: float, ticket=None) -> RelayResult:  # noqa: ANN001
        """`ticket`: the short-circuit registration of this connection (Shortcut.prepare), if any."""
        if ticket is None:
            return await self._relay(client, backend, first, idle_timeout, None)
        try:
            result = await self._relay(client, backend, first, idle_timeout, ticket)
        finally:
            # Both sockets are closed by now (or on the way out with an exception): release.
            finished = self.shortcut.finish(ticket)  # type: ignore[attr-defined]
        result.shortcut = finished.captured
        result.shortcut_bytes = finished.moved(ticket, result.bytes_down)
        result.shortcut_fallback = finished.reason
        result.bytes_down += result.shortcut_bytes
        return result

    async def _relay(self, client: socket.socket, backend: socket.socket, first: bytes,
                     idle_timeout: float, ticket) -> RelayResult:  # noqa: ANN001
        loop = asyncio.get_running_loop()
        handoff_at = None if self.table is None else self.splice_after
        copy = CopyPhase(loop, client, backend, idle_timeout, handoff_at)
        if ticket is not None:
            copy.activity = ticket.last_activity
            copy.on_close = lambda: ticket.measure(client, copy.down.shut)
        fallback: str | None = None
        try:
            how = await copy.run(first)
            while how != FINISHED:
                # A quiet point: hand the pair to the kernel, or say why not and keep copying.
                spliced = await self._hand_off(loop, copy)
                if isinstance(spliced, str):
                    fallback = spliced
                    copy.handoff_at = None
                    how = await copy.run()
                    continue
                return await self._run_spliced(loop, copy, spliced, idle_timeout, ticket)
        except BaseException:
            copy.close(abort=True)
            raise
        if self.table is not None and fallback is None:
            fallback = f"moved under [ebpf] splice_after = {self.splice_after} bytes"
        return RelayResult(mode="copy", bytes_up=copy.up.moved, bytes_down=copy.down.moved,
                           outcome=copy.outcome or Outcome.CLOSED, fallback_reason=fallback)

    async def _hand_off(self, loop: asyncio.AbstractEventLoop, copy: CopyPhase):  # noqa: ANN202
        from .handoff import Refused, flush_waiting, insert

        if self._buffer is None:
            from .handoff import READ_BUFFER

            self._buffer = bytearray(READ_BUFFER)
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

    async def _run_spliced(self, loop: asyncio.AbstractEventLoop, copy: CopyPhase, inserted,  # noqa: ANN001
                           idle_timeout: float, ticket=None) -> RelayResult:  # noqa: ANN001
        from .spliced import SplicedConnection

        assert self._buffer is not None
        conn = SplicedConnection(loop, self.table, inserted.pair, copy.client, copy.backend,  # type: ignore[arg-type]
                                 inserted.client_base, inserted.backend_base, self._buffer)
        watcher = self._watcher_for(loop)
        try:
            await conn.run(watcher, idle_timeout)
        finally:
            copy.closed = True
            if ticket is not None:
                ticket.measure(copy.client, conn.down.finished)
            copy.client.close()
            copy.backend.close()
            # The counters live in the slots until they are reused: read them before giving them back.
            up_kernel, down_kernel = inserted.pair.a.redir_bytes, inserted.pair.b.redir_bytes
            with contextlib.suppress(OSError):
                self.table.remove(inserted.pair)  # type: ignore[attr-defined]
            if watcher.empty and self._watcher is watcher:
                watcher.close()
                self._watcher = None
        return RelayResult(
            mode="splice",
            bytes_up=copy.up.moved + conn.up.forwarded + up_kernel,
            bytes_down=copy.down.moved + conn.down.forwarded + down_kernel,
            outcome=conn.outcome or Outcome.CLOSED,
            kernel_bytes=up_kernel + down_kernel,
            kernel_up=up_kernel,
            kernel_down=down_kernel,
        )
