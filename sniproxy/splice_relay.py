# SpliceRelay: hands a routed connection's two sockets to the kernel (sock_map + sk_skb verdict), so
# bytes move without entering this process; only hang-ups, hold notifications and held-back bytes
# wake it. Invariant: every byte reaches the peer exactly once and in order, whichever path moved it:
# userspace writes toward a socket only while nothing redirected toward it is still queued, and the
# verdict redirects from a socket only after userspace forwarded every byte the verdict left there.
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import select
import socket
import struct
import termios
import time

from .kernel.errors import SpliceError
from .kernel.maps import ConnStats
from .kernel.splice import SplicedPair, SpliceTable
from .relay import CopyRelay, Outcome, RelayResult

TCP_INQ = 36
_SO_SNDBUFFORCE = 32
TCP_CM_INQ = TCP_INQ
# Bytes left in a receive queue before insertion must be read whole (a partly read skb would later be
# run through the verdict from offset 0 again); this bounds what one recv may need.
_READ_BUFFER = 4 << 20
# Send buffer given to spliced sockets (SO_SNDBUFFORCE when allowed): the psock backlog retries a
# full send buffer only after one jiffy, so a stream moves at most ~sndbuf/2 per 4 ms.
DEFAULT_SNDBUF = 8 << 20
DEFAULT_RCVBUF = None  # measured: a fixed SO_RCVBUF let held bytes pile up (see report)

_HANGUP = select.EPOLLRDHUP | select.EPOLLONESHOT


_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info


def written_total(sock: socket.socket) -> int:
    """Every byte ever put into the socket's send stream: acknowledged (tcpi_bytes_acked, which also
    counts an active open's SYN, hence the baselines) plus still queued (SIOCOUTQ: unacked + unsent).
    TCP_INFO is read first: an ACK between the two reads moves bytes from the queue to the acked count
    after we read it, so the sum can only come out low, never high."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_ACKED + 8)
    acked = struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + outq


class _Reset(Exception):
    def __init__(self, side: str) -> None:
        super().__init__(side)
        self.side = side


class _Watcher:
    """One epoll for the hang-ups (RDHUP/HUP/ERR, never IN) of every spliced socket of one event loop,
    plus the ring buffer on which the verdict announces holds. Lives while it has sockets to watch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: SpliceTable) -> None:
        self.loop = loop
        self.table = table
        self.epoll = select.epoll()
        self.hangup: dict[int, _Direction] = {}  # fd -> the direction whose source it is
        self.by_cookie: dict[int, _Direction] = {}
        loop.add_reader(self.epoll.fileno(), self._on_epoll)
        if table.events_fd >= 0:
            loop.add_reader(table.events_fd, self._on_events)

    def add(self, direction: _Direction) -> None:
        fd = direction.src.fileno()
        self.hangup[fd] = direction
        self.by_cookie[direction.src_cookie] = direction
        self.epoll.register(fd, _HANGUP)

    def discard(self, direction: _Direction) -> None:
        fd = direction.src_fd
        if self.hangup.get(fd) is direction:
            del self.hangup[fd]
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        if self.by_cookie.get(direction.src_cookie) is direction:
            del self.by_cookie[direction.src_cookie]

    @property
    def empty(self) -> bool:
        return not self.hangup and not self.by_cookie

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        if self.table.events_fd >= 0:
            self.loop.remove_reader(self.table.events_fd)
        self.epoll.close()

    def _on_epoll(self) -> None:
        for fd, events in self.epoll.poll(0):
            direction = self.hangup.get(fd)
            if direction is None:
                continue
            if events & (select.EPOLLERR | select.EPOLLHUP):
                # Error, or both halves closed: nothing more to watch on this socket.
                self.hangup.pop(fd, None)
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)
            else:
                # FIN arrived: keep watching for errors (always reported) only.
                with contextlib.suppress(OSError):
                    self.epoll.modify(fd, select.EPOLLONESHOT)
            direction.on_hangup(events)

    def _on_events(self) -> None:
        for event in self.table.read_events():
            direction = self.by_cookie.get(event.cookie)
            if direction is not None:
                direction.kick()


class _Direction:
    """Bytes from src to dst: normally the kernel's; held-back bytes are forwarded from here."""

    def __init__(self, pair: _Pair, name: str, src: socket.socket, dst: socket.socket,
                 src_cookie: int, dst_cookie: int) -> None:
        self.pair = pair
        self.name = name
        self.src, self.dst = src, dst
        self.src_fd = src.fileno()
        self.src_cookie, self.dst_cookie = src_cookie, dst_cookie
        self.consumed = 0  # bytes read from src that the verdict left to us (compare: pass_bytes)
        self.stale = 0  # bytes read from src that were queued before insertion (never seen by it)
        self.forwarded = 0
        self.wake = asyncio.Event()
        self.dst_base = 0  # written_total(dst) when the pair was inserted
        self.sent = 0  # bytes we wrote to dst since then
        self.src_eof = False
        # src's FIN is in (EPOLLRDHUP). A flag, not only a kick: a kick that lands while run() is between
        # its wake-up and wake.clear() is lost, and the FIN adds nothing to pass_bytes that _catch_up
        # would wait for (seen: a released direction waited for its EOF until the idle timeout).
        self.hung_up = False
        self.finished = False  # dst shut down for writing (or nothing more can flow)

    def kick(self) -> None:
        self.wake.set()

    def on_hangup(self, events: int) -> None:
        err = 0
        with contextlib.suppress(OSError):
            err = self.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err or (events & select.EPOLLERR):
            self.pair.reset_by(self.name)
        else:
            self.hung_up = True
            self.kick()

    def _stats(self, cookie: int) -> ConnStats:
        st = self.pair.table.stats(cookie)
        if st is None:
            raise asyncio.CancelledError  # torn down under us
        return st

    async def run(self) -> None:
        try:
            while not self.src_eof:
                if not self.hung_up:
                    await self.wake.wait()
                self.wake.clear()
                await self._forward_held()
            await self._wait_drained()
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
        except _Reset as e:
            self.pair.reset_by(e.side)
            return
        self.finished = True
        self.pair.direction_finished()

    async def _wait_drained(self) -> None:
        """Until every byte the verdict redirected toward dst is in dst's send stream, so that what we
        write next follows it. Exact: dst's stream grew by what we wrote plus what the psock backlog
        wrote, and the backlog writes exactly the bytes the verdict redirected (src's redir_bytes).
        sk_msg's `queued` is not used here: it misses bytes (see conn_ctl.queued_adj)."""
        delay = 0.0005
        while True:
            try:
                from_kernel = written_total(self.dst) - self.dst_base - self.sent
            except OSError as e:
                raise _Reset(self.pair.other(self.name)) from e
            if from_kernel >= self._stats(self.src_cookie).redir_bytes:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def _forward_held(self) -> None:
        """Forward what the verdict left on src, then let it redirect again (release). src is not read
        until the queue toward dst has drained (our writes must follow every redirected byte), so the
        held bytes stay in src's receive memory and its TCP window closes by itself meanwhile. The
        release is exact: release_at == pass_bytes only when every passed byte is in dst's send queue.
        No TCP_WINDOW_CLAMP while catching up: measured here, it does not slow a loopback sender (4 KiB
        windows still carry 1.3 GB/s), and restoring it sends no window update, so a sender that saw a
        zero window waited in persist backoff for tens of seconds (the 8-stream stall)."""
        await self._wait_drained()
        await self._catch_up()

    async def _catch_up(self) -> None:
        loop = self.pair.loop
        while True:
            data = self._read()
            if data is None:  # EAGAIN
                if self.consumed < self._stats(self.src_cookie).pass_bytes or self.hung_up:
                    # passed bytes (or the EOF behind them) still on their way to the receive queue
                    await self._readable(0.05)
                    continue
            elif not data:
                if self.consumed < self._stats(self.src_cookie).pass_bytes:
                    await asyncio.sleep(0.001)  # the FIN overtook bytes still in the psock backlog
                    continue
                self.src_eof = True
                return
            else:
                try:
                    await loop.sock_sendall(self.dst, data)
                except OSError as e:
                    raise _Reset(self.pair.other(self.name)) from e
                self.sent += len(data)
                self.forwarded += len(data)
                self.pair.touch()
                if self.consumed != self._stats(self.src_cookie).pass_bytes:
                    continue
            # Every byte the verdict left here is in dst's send queue: redirect again. Nothing was
            # redirected toward dst since the drain and sk_msg has seen every send before it, so the
            # queue toward dst is empty now: whatever sk_msg's count still says, it missed.
            queued_adj = self._stats(self.dst_cookie).queued
            self.pair.table.release(self.src_cookie, self.consumed, queued_adj)
            if self._stats(self.src_cookie).pass_bytes == self.consumed:
                return
            # A byte was left to us between the check and the release: the verdict still holds, and
            # may have redirected bytes in between that ours must follow.
            await self._wait_drained()

    def _read(self) -> bytes | None:
        buf = self.pair.relay._buffer
        try:
            n, ancdata, _flags, _addr = self.src.recvmsg_into([buf], socket.CMSG_SPACE(4))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise _Reset(self.name) from e
        if n == 0:
            return b""
        # A TCP_CM_INQ control message means tcp_recvmsg read the socket's own queue: bytes that were
        # there before insertion. Bytes the verdict passed come through the psock without one.
        if any(level == socket.IPPROTO_TCP and kind == TCP_CM_INQ for level, kind, _ in ancdata):
            self.stale += n
        else:
            self.consumed += n
        return bytes(buf[:n])

    async def _readable(self, timeout: float) -> None:
        loop = self.pair.loop
        fut = loop.create_future()
        loop.add_reader(self.src_fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(self.src_fd)


class _Pair:
    def __init__(self, relay: SpliceRelay, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 backend: socket.socket, spliced: SplicedPair) -> None:
        self.relay = relay
        self.table = relay.table
        self.loop = loop
        self.client, self.backend = client, backend
        self.spliced = spliced
        self.up = _Direction(self, "client", client, backend, spliced.a_cookie, spliced.b_cookie)
        self.down = _Direction(self, "backend", backend, client, spliced.b_cookie, spliced.a_cookie)
        self.outcome: Outcome | None = None
        self.done = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.last_activity = time.monotonic()

    def other(self, name: str) -> str:
        return "backend" if name == "client" else "client"

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def direction_finished(self) -> None:
        if self.up.finished and self.down.finished:
            self.outcome = self.outcome or Outcome.CLOSED
            self.done.set()

    def reset_by(self, side: str) -> None:
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_RESET if side == "client" else Outcome.BACKEND_RESET
        self.abort()

    def abort(self) -> None:
        """Cut both sides now: RST toward both peers (SO_LINGER 0), stop both directions."""
        for sock in (self.client, self.backend):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.done.set()

    def activity(self) -> int:
        total = self.up.forwarded + self.down.forwarded
        for cookie in (self.spliced.a_cookie, self.spliced.b_cookie):
            st = self.table.stats(cookie)
            if st is not None:
                total += st.rx_bytes + st.tx_bytes
        return total

    async def watch_idle(self, idle_timeout: float) -> None:
        interval = min(max(idle_timeout / 4, 0.01), 5.0)
        seen = self.activity()
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), interval)
            if self.done.is_set():
                return
            now_seen = self.activity()
            if now_seen != seen:
                seen = now_seen
                self.touch()
            elif time.monotonic() - self.last_activity >= idle_timeout:
                self.outcome = self.outcome or Outcome.IDLE_TIMEOUT
                self.abort()
                return


class SpliceRelay:
    """Relay through the kernel's sockhash; falls back to `fallback` (CopyRelay) per connection when the
    kernel refuses the sockets. Same contract as CopyRelay: owns and closes both sockets."""

    mode = "splice"

    def __init__(self, table: SpliceTable, fallback: CopyRelay, *, sndbuf: int | None = DEFAULT_SNDBUF,
                 rcvbuf: int | None = DEFAULT_RCVBUF) -> None:
        self.table = table
        self.fallback = fallback
        self.sndbuf = sndbuf
        self.rcvbuf = rcvbuf
        self._buffer = bytearray(_READ_BUFFER)
        self._watcher: _Watcher | None = None

    def use_worker(self, index: int) -> None:
        """Pairs spliced from this process wake its own ring of hold events (one per worker)."""
        self.table.use_worker(index)

    def _watcher_for(self, loop: asyncio.AbstractEventLoop) -> _Watcher:
        if self._watcher is None or self._watcher.loop is not loop:
            self._watcher = _Watcher(loop, self.table)
        return self._watcher

    def _release_watcher(self, watcher: _Watcher) -> None:
        if watcher.empty and self._watcher is watcher:
            watcher.close()
            self._watcher = None

    @staticmethod
    def _read_waiting(sock: socket.socket) -> bytes:
        """What is in the receive queue now, read whole (a short read means the queue was empty at
        that instant, so no skb is left half-read) before the socket is inserted. Stops there: a client
        that keeps streaming would otherwise hold the event loop in this loop until it finished (seen
        with 8 fast streams: every other connection starved, then fell back to copy after its FIN)."""
        chunks = []
        while True:
            try:
                data = sock.recv(_READ_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            chunks.append(data)
            if len(data) < _READ_BUFFER:
                break
        return b"".join(chunks)

    def _prepare(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_INQ, 1)
        if self.sndbuf:
            try:
                # Past net.core.wmem_max (root / CAP_NET_ADMIN): the send buffer is what the psock
                # backlog can push per jiffy-delayed retry, so it caps a spliced stream's rate.
                sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, self.sndbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.rcvbuf:
            # Bounds what one hold leaves for us to copy (redirecting keeps this queue empty).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)

    async def relay(self, client: socket.socket, backend: socket.socket, first: bytes,
                    idle_timeout: float) -> RelayResult:
        loop = asyncio.get_running_loop()
        try:
            first = first + self._read_waiting(client)
            self._prepare(client)
            self._prepare(backend)
            # Nothing was ever written to either socket yet, so these are stable: no ACK can move
            # bytes between the two reads of written_total.
            backend_base, client_base = written_total(backend), written_total(client)
        except OSError:
            client.close()
            backend.close()
            return RelayResult(self.mode, 0, 0, Outcome.CLIENT_RESET)
        # `first` is in the backend's send queue before the sockets are inserted, so both directions
        # start released: whatever the client sends next, redirected or not, can only follow it. (A
        # client that streams from its first byte never gives the proxy an empty receive queue to
        # wait for; holding it until then meant copying it all in userspace.)
        if first:
            try:
                await loop.sock_sendall(backend, first)
            except OSError:
                client.close()
                backend.close()
                return RelayResult(self.mode, len(first), 0, Outcome.BACKEND_RESET)
        try:
            spliced = self.table.add_pair(client, backend, release_at=0)
        except SpliceError as e:
            result = await self.fallback.relay(client, backend, b"", idle_timeout, fallback_reason=str(e))
            return dataclasses.replace(result, bytes_up=result.bytes_up + len(first))
        except OSError:
            client.close()
            backend.close()
            return RelayResult(self.mode, len(first), 0, Outcome.CLIENT_RESET)
        pair = _Pair(self, loop, client, backend, spliced)
        pair.up.dst_base, pair.up.sent = backend_base, len(first)
        pair.down.dst_base = client_base
        watcher = self._watcher_for(loop)
        stats = None
        try:
            watcher.add(pair.up)
            watcher.add(pair.down)
            async with asyncio.TaskGroup() as tg:
                pair.tasks.append(tg.create_task(pair.down.run()))
                pair.tasks.append(tg.create_task(pair.up.run()))
                pair.tasks.append(tg.create_task(pair.watch_idle(idle_timeout)))
                await pair.done.wait()
                if pair.outcome is not Outcome.CLOSED:
                    pair.abort()
        except asyncio.CancelledError:
            pair.outcome = pair.outcome or Outcome.SHUTDOWN
            pair.abort()
            raise
        finally:
            watcher.discard(pair.up)
            watcher.discard(pair.down)
            self._release_watcher(watcher)
            stats = self.table.remove(spliced)
            client.close()
            backend.close()
        # Each byte counted once where it entered: `first` and bytes left over from before insertion
        # by us, everything after by the verdict (rx_bytes = redirected + passed to us and forwarded).
        return RelayResult(
            mode=self.mode,
            bytes_up=len(first) + pair.up.stale + stats.a["rx_bytes"],
            bytes_down=pair.down.stale + stats.b["rx_bytes"],
            outcome=pair.outcome or Outcome.CLOSED,
        )
