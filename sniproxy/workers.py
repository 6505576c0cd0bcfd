# `[server] workers`: the proxy as N processes forked from a supervisor that did, once, everything
# needing privileges or a compiler (BPF programs, XDP, pinned maps, listening sockets). The supervisor
# never accepts: it forwards SIGHUP/SIGTERM, restarts a worker that dies or stalls, and is the one
# process that speaks to systemd. On SIGHUP it re-reads the listeners first, binds the new ones and
# offers each worker its sockets over a unix socket (SCM_RIGHTS) before forwarding the signal.
# Invariant: every listening socket stays open in the supervisor, so connections queued on a dead
# worker's socket wait for its replacement instead of being reset.
from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from sniproxy import metrics
from sniproxy.config import MAX_WORKERS
from sniproxy.listeners import WorkerSockets, offer
from sniproxy.systemd import Notifier

log = structlog.get_logger("sniproxy.workers")

# A worker beats this often (its Server's heartbeat timer, on its event loop)...
HEARTBEAT_SECONDS = 1.0
# ...and one silent this long has a stalled loop: it is killed and replaced. The environment may
# shorten it (tests stop a worker with SIGSTOP and wait for its replacement).
STALL_SECONDS = float(os.environ.get("SNIPROXY_WORKER_STALL_SECONDS", "20"))
# A worker that dies sooner than this after its start is restarted with a growing delay (crash loop).
_QUICK_DEATH = 10.0
_MAX_RESTART_DELAY = 5.0
# A worker that has not started serving after this long failed to start.
START_TIMEOUT = 60.0

# Worker -> supervisor messages on its pipe: one byte each, except a failed reload, which is
# _RELOAD_FAILED, the error text (no newline) and a newline. One write each, below PIPE_BUF: atomic.
_READY, _BEAT, _RELOAD_OK, _RELOAD_FAILED = b"R", b".", b"O", b"F"
_MAX_ERROR_BYTES = 1000
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def worker_count(setting: int | str) -> int:
    """`workers` of [server] as a number: "auto" is one per CPU this process may run on."""
    if setting == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    assert isinstance(setting, int)
    return setting


class ChannelNotifier(Notifier):
    """A worker's Notifier: READY, WATCHDOG and how a reload ended go to the supervisor through a pipe
    (the supervisor tells systemd for all workers); STATUS, RELOADING and STOPPING stay in the worker."""

    def __init__(self, fd: int) -> None:
        super().__init__(None, watchdog_usec=int(HEARTBEAT_SECONDS * 2_000_000))
        self._fd = fd

    @property
    def enabled(self) -> bool:
        return True

    @property
    def watchdog_interval(self) -> float | None:
        return HEARTBEAT_SECONDS

    def notify(self, *fields: str) -> bool:
        codes = b"".join({"READY=1": _READY, "WATCHDOG=1": _BEAT}.get(f, b"") for f in fields)
        if not codes:
            return False
        return self._send(codes)

    def reloaded(self, error: str | None) -> bool:
        if error is None:
            return self._send(_RELOAD_OK)
        text = " ".join(error.split()).encode()[:_MAX_ERROR_BYTES]
        return self._send(_RELOAD_FAILED + text + b"\n")

    def _send(self, data: bytes) -> bool:
        try:
            os.write(self._fd, data)
        except OSError:  # the supervisor is gone or not reading: nothing to tell
            return False
        return True


@dataclass
class _Worker:
    index: int
    pid: int = 0
    channel: int = -1  # read end of its pipe
    inbox: int = -1  # our end of its SOCK_SEQPACKET pair: listening sockets offered on reload
    started: float = 0.0
    last_heard: float = 0.0
    ready: bool = False
    reload_answer: str | None = None  # since the last SIGHUP: "" in force, else the worker's error
    pending: bytes = b""  # an incomplete message read from the channel
    restarts: int = 0
    restart_at: float | None = None  # a replacement is due at this time (crash-loop backoff)
    delay: float = 0.1


@dataclass
class Supervisor:
    """Forks `count` workers; `serve(index, channel_fd, inbox_fd)` runs in each child and returns its
    exit code. `sockets.shared()` are the listening sockets every worker accepts on; `inbox_fd`
    receives the sockets of listeners a reload adds."""

    count: int
    sockets: WorkerSockets
    serve: Callable[[int, int, int], int]
    notifier: Notifier = field(default_factory=Notifier.disabled)
    shutdown_grace: float = 30.0
    # Called on SIGHUP before the workers hear of it: re-read the file and make `sockets` follow its
    # listeners (and what a replaced worker will serve). Errors are its own to log.
    reconfigure: Callable[[], str | None] | None = None
    # Called with a worker's index once it is reaped, before its replacement starts: kernel state
    # the dead process owned (its spliced pairs' map entries) is cleaned up here.
    on_worker_exit: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        self._generation = 0
        self._workers = [_Worker(i) for i in range(self.count)]
        self._signals: list[int] = []
        self.last_reload_error: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- running ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Until SIGTERM/SIGINT (exit 0 once every worker has drained), or until a worker fails to
        start (exit 1, the others stopped)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            for worker in self._workers:
                self._spawn(worker)
            if not self._wait_started():
                self._stop_all()
                return 1
            log.info("workers_started", workers=self.count, pids=[w.pid for w in self._workers])
            self.notifier.ready(self.status_line())
            self._supervise()
            return 0
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self._workers:
                if worker.channel >= 0:
                    os.close(worker.channel)
                    worker.channel = -1
                if worker.inbox >= 0:
                    os.close(worker.inbox)
                    worker.inbox = -1
            os.close(self._wake_r)
            os.close(self._wake_w)

    def status_line(self) -> str:
        alive = sum(1 for w in self._workers if w.pid)
        line = f"workers={alive}/{self.count} restarts={sum(w.restarts for w in self._workers)}"
        # A rejected file leaves the previous config running: `systemctl status` says so, and why.
        return line if self.last_reload_error is None else f"{line} last_reload=failed: {self.last_reload_error}"

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _wait_started(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self._workers):
            self._poll(min(1.0, max(deadline - time.monotonic(), 0.0)))
            taken = self._take_signals()
            if signal.SIGTERM in taken or signal.SIGINT in taken:
                log.info("stop_requested", phase="starting")
                return False
            if signal.SIGHUP in taken:
                # Not lost: the file may have changed after the workers read it. Handled once every
                # worker serves (a SIGHUP before a worker's event loop runs would kill it).
                self._signals.append(signal.SIGHUP)
            dead = self._reap()
            if dead:
                log.error("start_failed", error=f"worker {dead[0][0].index} exited while starting "
                          f"({_describe(dead[0][1])})")
                return False
            if time.monotonic() >= deadline:
                log.error("start_failed", error=f"workers not serving after {START_TIMEOUT:g} s")
                return False
        return True

    def _supervise(self) -> None:
        beat_every = self.notifier.watchdog_interval or 5.0
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                if self.notifier.watchdog_interval is not None:
                    self.notifier.watchdog()
                self.notifier.status(self.status_line())
                next_beat = now + min(beat_every, 5.0)
            due = [w.restart_at for w in self._workers if w.restart_at is not None]
            self._poll(max(0.0, min([next_beat - now, 1.0, *(d - now for d in due)])))
            for sig in self._take_signals():
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self._stop_all()
                    return
                if sig == signal.SIGHUP:
                    self._reload()
            for worker, status in self._reap():
                self._schedule_restart(worker, f"exited ({_describe(status)})")
            now = time.monotonic()
            for worker in self._workers:
                if worker.pid and now - worker.last_heard > STALL_SECONDS:
                    log.error("worker_stalled", worker=worker.index, pid=worker.pid,
                              silent_seconds=round(now - worker.last_heard, 1))
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                    worker.last_heard = now  # reaped (and replaced) once SIGCHLD comes in
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restart_at = None
                    worker.restarts += 1
                    metrics.worker_restarted()
                    self._spawn(worker)
                    log.info("worker_restarted", worker=worker.index, pid=worker.pid, restarts=worker.restarts)

    def _schedule_restart(self, worker: _Worker, why: str) -> None:
        now = time.monotonic()
        worker.delay = min(worker.delay * 2, _MAX_RESTART_DELAY) if now - worker.started < _QUICK_DEATH else 0.1
        worker.restart_at = now + worker.delay
        log.error("worker_exited", worker=worker.index, reason=why, restart_in_seconds=worker.delay)

    def _reload(self) -> None:
        """Forward SIGHUP; tell systemd READY again once every worker re-read its config (each says
        how its reload ended, then READY: a rejected file leaves its previous config running), with
        the first worker's error in STATUS= when any rejected it."""
        self.notifier.reloading()
        # The supervisor's own reason (a listener it could not bind) says more than the workers' "no
        # socket offered" that follows from it: STATUS= shows it first.
        own_error = self.reconfigure() if self.reconfigure is not None else None
        # Every worker gets its whole current set, not just what is new: one that refused an earlier
        # reload still finds what it lacks. Offers are queued before the signal, so a worker reads
        # them when it reloads.
        self._generation += 1
        for worker in self._workers:
            if worker.pid and worker.inbox >= 0:
                try:
                    offer(worker.inbox, self._generation, self.sockets.shared())
                except OSError as exc:
                    log.error("listener_offer_failed", worker=worker.index, error=str(exc))
        for worker in self._workers:
            worker.ready = False
            worker.reload_answer = None
            self._kill(worker, signal.SIGHUP)
        deadline = time.monotonic() + 10.0
        while not all(w.ready or not w.pid for w in self._workers) and time.monotonic() < deadline:
            self._poll(0.2)
            for worker, status in self._reap():
                self._schedule_restart(worker, f"exited ({_describe(status)})")
        failed = [(w.index, w.reload_answer if w.reload_answer is not None
                   else "no answer within 10 s" if w.pid else "exited while reloading")
                  for w in self._workers if w.reload_answer != ""]
        if failed:
            self.last_reload_error = own_error or failed[0][1]
            log.error("workers_reload_failed", workers=[i for i, _ in failed], error=self.last_reload_error,
                      kept="previous configuration")
        else:
            self.last_reload_error = None
            log.info("workers_reloaded", workers=self.count)
        self.notifier.ready(self.status_line())

    def _stop_all(self) -> None:
        """SIGTERM every worker (each drains its connections for up to shutdown_grace), then wait;
        SIGKILL what is still there well after that."""
        alive = [w for w in self._workers if w.pid]
        self.notifier.stopping(f"stopping: {len(alive)} worker(s) draining")
        log.info("stopping", workers=len(alive))
        for worker in alive:
            worker.restart_at = None
            self._kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace + 5.0
        while any(w.pid for w in self._workers):
            if time.monotonic() >= deadline:
                for worker in self._workers:
                    if worker.pid:
                        log.error("worker_killed", worker=worker.index, pid=worker.pid,
                                  reason="still running after the shutdown grace")
                        self._kill(worker, signal.SIGKILL)
                deadline = float("inf")
            self._poll(0.2)
            self._take_signals()
            self._reap()
        log.info("stopped")

    # -- processes ----------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        if worker.channel >= 0:
            os.close(worker.channel)
        if worker.inbox >= 0:
            os.close(worker.inbox)
            worker.inbox = -1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inbox, worker_inbox = ours.detach(), theirs.detach()
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_end, False)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or buffered lines would be printed by both processes
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70  # EX_SOFTWARE
            try:
                os.close(read_end)
                os.close(inbox)
                self._become_worker(worker.index)
                code = self.serve(worker.index, write_end, worker_inbox)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                # No atexit handlers, no finalizers: those belong to the supervisor (BCC's would
                # detach the programs every worker shares).
                os._exit(code)
        os.close(write_end)
        os.close(worker_inbox)
        worker.inbox = inbox
        now = time.monotonic()
        worker.pid, worker.channel, worker.started, worker.last_heard, worker.ready = pid, read_end, now, now, False

    def _become_worker(self, index: int) -> None:
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for worker in self._workers:
            if worker.channel >= 0:
                os.close(worker.channel)
            if worker.inbox >= 0:
                os.close(worker.inbox)
        structlog.contextvars.bind_contextvars(worker=index)

    def _kill(self, worker: _Worker, sig: int) -> None:
        if worker.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    def _reap(self) -> list[tuple[_Worker, int]]:
        dead = []
        for worker in self._workers:
            if not worker.pid:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid:
                metrics.process_gone(worker.pid)
                worker.pid = 0
                worker.ready = False
                dead.append((worker, status))
                if self.on_worker_exit is not None:
                    try:
                        self.on_worker_exit(worker.index)
                    except Exception as exc:  # cleanup must never stop the supervisor
                        log.error("worker_cleanup_failed", worker=worker.index, error=str(exc))
        return dead

    def _take_signals(self) -> list[int]:
        taken, self._signals = self._signals, []
        return taken

    def _poll(self, timeout: float) -> None:
        """Wait for a signal or a worker's message; read every message waiting."""
        fds = [self._wake_r] + [w.channel for w in self._workers if w.channel >= 0]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            readable = []
        for fd in readable:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                continue
            worker = next((w for w in self._workers if w.channel == fd), None)
            if worker is None:
                continue
            try:
                data = os.read(fd, 512)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
                continue
            if not data:  # every writer closed: the worker is gone; SIGCHLD tells the rest
                os.close(fd)
                worker.channel = -1
                continue
            worker.last_heard = time.monotonic()
            self._read_messages(worker, data)

    @staticmethod
    def _read_messages(worker: _Worker, data: bytes) -> None:
        data = worker.pending + data
        worker.pending = b""
        i = 0
        while i < len(data):
            code = data[i:i + 1]
            if code == _RELOAD_FAILED:
                end = data.find(b"\n", i)
                if end < 0:  # the rest comes with the next read
                    worker.pending = data[i:]
                    return
                worker.reload_answer = data[i + 1:end].decode(errors="replace")
                i = end + 1
                continue
            if code == _READY:
                worker.ready = True
            elif code == _RELOAD_OK:
                worker.reload_answer = ""
            i += 1


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
