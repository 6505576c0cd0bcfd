# SpliceTable: puts a pair of connected TCP sockets into the kernel's splice maps and takes them out
# again, in at most four bpf() calls per pair over its whole life: one batch update of splice_slots
# and one sock_map update per socket at insertion, one batch delete at removal (closing a socket takes
# it out of sock_map by itself). Each socket's slot in splice_state is memory shared with the kernel
# (mmap), read and written without system calls. Invariant: a pair is either fully present (both slots
# filled, both cookies in splice_slots, then both sockets in sock_map) or absent, except a socket that
# went into sock_map alone (see add_pair); slots of one process are never used by another.
from __future__ import annotations

import collections
import ctypes as ct
import dataclasses
import errno
import mmap
import socket
import time
from collections.abc import Callable

from . import maps
from .errors import SpliceError, SpliceTableFull, SpliceUnavailable

SO_COOKIE = 57


def socket_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


@dataclasses.dataclass(frozen=True)
class SplicedPair:
    a_fd: int
    b_fd: int
    a_cookie: int
    b_cookie: int
    a: maps.SpliceSlot  # live views into splice_state (shared memory): the verdict's counters move
    b: maps.SpliceSlot
    a_index: int
    b_index: int


def kick_verdict(sock: socket.socket) -> None:
    """Run the verdict over whatever waits in sock's receive queue. Inserting a socket does not:
    bytes that arrived before it stay there until more data arrives (and with a client that then
    waits for an answer, forever). Setting SO_RCVLOWAT calls tcp_data_ready(), which with a psock
    attached is the verdict's data_ready (measured here: 11 early bytes redirected at once)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _splice_error(err: OSError, what: str) -> SpliceError:
    code = err.errno
    if code == errno.EOPNOTSUPP:
        return SpliceUnavailable(f"{what}: socket not ESTABLISHED (EOPNOTSUPP)", code)
    if code in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return SpliceTableFull(f"{what}: map full ({errno.errorcode.get(code, code)})", code)
    return SpliceError(f"{what}: {err.strerror or err}", code)


class SpliceTable:
    """Typed access to sock_map, splice_slots and splice_state of one DataPlane."""

    def __init__(self, fds: dict[str, int], state: mmap.mmap,
                 open_events: Callable[[int], int] | None = None,
                 read_events: Callable[[], list[maps.SpliceEvent]] | None = None) -> None:
        self._fds = fds
        self._state = state
        self._open_events = open_events
        self._events_fd: int | None = None
        self._read_events = read_events or (lambda: [])
        self.worker = 0  # which process's ring the verdict wakes for pairs added here
        self._free: collections.deque[int] = collections.deque()
        self.use_worker(0, 1)

    def use_worker(self, worker: int, workers: int = 1) -> None:
        """Pairs added from now on wake ring `worker` and take slots from that worker's share of
        splice_state (1/workers of it), so processes never hand out the same slot. A worker process
        calls this after the fork, before it splices anything."""
        if not 0 <= worker < maps.SNIPROXY_MAX_WORKERS or not worker < workers <= maps.SNIPROXY_MAX_WORKERS:
            raise ValueError(f"worker {worker} of {workers} outside 0..{maps.SNIPROXY_MAX_WORKERS - 1}")
        if self._events_fd is not None and worker != self.worker:
            raise RuntimeError("this process already consumes another worker's ring")
        self.worker = worker
        # FIFO reuse: a slot freed last is reused last, so a verdict still running on another CPU
        # for a just-removed socket never adds to the counters of the slot's next owner.
        self._free = collections.deque(slot_range(worker, workers))

    @property
    def events_fd(self) -> int:
        """Pollable fd of this process's ring of hold notifications (-1: none), opened on first use."""
        if self._events_fd is None:
            self._events_fd = self._open_events(self.worker) if self._open_events else -1
        return self._events_fd

    def slot(self, index: int) -> maps.SpliceSlot:
        return maps.SpliceSlot.from_buffer(self._state, index * ct.sizeof(maps.SpliceSlot))

    # -- pairs ---------------------------------------------------------------------------------
    def add_pair(self, a: socket.socket, b: socket.socket, a_toward: int, b_toward: int,
                 release_at: int = 0) -> SplicedPair:
        """Insert both sockets, each direction released at `release_at` (0: redirect from the first
        byte the verdict sees; maps.SNIPROXY_HOLD_ALL: leave everything to userspace until released).
        a_toward / b_toward: written_total() of b / a now (see splice_slot.toward_base). Then both are
        kicked (kick_verdict). Raises SpliceError with every entry undone, except `a` in sock_map when
        only `b` failed to go in: that entry goes when `a` is closed, and `a` reads like any socket
        meanwhile (its slot is gone, so the verdict passes everything)."""
        if len(self._free) < 2:
            raise SpliceTableFull("splice_state: this worker's share of slots is in use", errno.ENOSPC)
        a_cookie, b_cookie = socket_cookie(a), socket_cookie(b)
        a_index, b_index = self._free.popleft(), self._free.popleft()
        now = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns
        sa, sb = self.slot(a_index), self.slot(b_index)
        for slot, cookie, peer, toward in ((sa, a_cookie, b_cookie, a_toward), (sb, b_cookie, a_cookie, b_toward)):
            ct.memset(ct.addressof(slot), 0, ct.sizeof(slot))
            slot.cookie, slot.peer, slot.release_at, slot.toward_base = cookie, peer, release_at, toward
            slot.start_ns = slot.last_ns = now
            slot.worker = self.worker
        pair = SplicedPair(a.fileno(), b.fileno(), a_cookie, b_cookie, sa, sb, a_index, b_index)
        f = self._fds
        try:
            maps.update_batch(f["splice_slots"], (ct.c_uint64 * 2)(a_cookie, b_cookie),
                              (ct.c_uint32 * 2)(a_index, b_index), what="splice_slots")
        except maps.MapError as e:
            self._free.extend((a_index, b_index))
            raise _splice_error(e, "splice_slots") from e
        try:
            for fd, cookie in ((pair.a_fd, a_cookie), (pair.b_fd, b_cookie)):
                # A socket once in sock_map stays there until it is closed, even when its peer can
                # not follow: bytes the verdict passed while the peer was missing sit in the psock,
                # and taking the socket out of the map would purge them (seen: 32 KiB of a backend's
                # greeting lost). With no slot the verdict passes everything, and reads through the
                # psock return it in order.
                maps.update(f["sock_map"], ct.c_uint64(cookie), ct.c_uint32(fd), maps.BPF_NOEXIST,
                            what="sock_map")
        except maps.MapError as e:
            self._release(pair)
            raise _splice_error(e, "sock_map") from e
        kick_verdict(a)
        kick_verdict(b)
        return pair

    def remove(self, pair: SplicedPair) -> None:
        """Forget the pair (one batch delete); call it once both sockets are closed, so that sock_map
        lost them already. The slots' counters stay readable until the slots are reused."""
        self._release(pair)

    def _release(self, pair: SplicedPair) -> None:
        try:
            maps.delete_batch(self._fds["splice_slots"], (ct.c_uint64 * 2)(pair.a_cookie, pair.b_cookie),
                              what="splice_slots")
        finally:
            self._free.extend((pair.a_index, pair.b_index))

    def forget_worker(self, worker: int, workers: int) -> int:
        """After a worker process died: delete splice_slots entries pointing into its share of
        splice_state (its sockets left sock_map when the kernel closed them). Returns how many."""
        share = slot_range(worker, workers)
        value = ct.c_uint32()
        stale = [c for c in maps.keys_u64(self._fds["splice_slots"])
                 if maps.lookup(self._fds["splice_slots"], ct.c_uint64(c), value) and value.value in share]
        for cookie in stale:
            maps.delete(self._fds["splice_slots"], ct.c_uint64(cookie))
        return len(stale)

    def slot_of(self, cookie: int) -> maps.SpliceSlot | None:
        """The slot of a spliced socket, by cookie (one map lookup: for inspection, not hot paths)."""
        index = ct.c_uint32()
        if not maps.lookup(self._fds["splice_slots"], ct.c_uint64(cookie), index):
            return None
        return self.slot(index.value)

    def read_events(self) -> list[maps.SpliceEvent]:
        """Hold notifications written by the verdict since the last call."""
        return self._read_events()

    # -- inspection -------------------------------------------------------------------------------
    def traffic(self) -> maps.TrafficStats:
        return maps.read_traffic(self._fds["traffic_stats"])

    def entries(self) -> dict[str, int]:
        """Number of keys in each per-connection map (0 everywhere when no connection is spliced)."""
        return {name: len(maps.keys_u64(self._fds[name])) for name in ("sock_map", "splice_slots")}


def slot_range(worker: int, workers: int) -> range:
    share = maps.SNIPROXY_MAX_SOCKETS // workers
    return range(worker * share, (worker + 1) * share)
