# The sd_notify protocol as the real proxy process speaks it, received on our own NOTIFY_SOCKET (no
# systemd needed): READY=1 only once the listener accepts, WATCHDOG=1 at half of WATCHDOG_USEC from the
# event loop, RELOADING=1 with MONOTONIC_USEC then READY=1 around SIGHUP, STOPPING=1 on SIGTERM.
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who


class NotifySocket:
    """What a service manager sees: one datagram per notification, as a dict of its fields."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if address.startswith("/") else "\0" + address[1:])
        if address.startswith("/"):
            # The proxy sends from its unprivileged user ([server] user), as to systemd's socket (0777).
            os.chmod(address, 0o777)
        self.sock.setblocking(False)
        self.received: list[tuple[float, dict[str, str]]] = []

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.received.append((time.monotonic(), fields))

    async def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 20.0,
                       after: int = 0) -> tuple[int, dict[str, str]]:
        """First message at index >= after that matches; returns (index, fields)."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for i, (_, fields) in enumerate(self.received[after:], after):
                if predicate(fields):
                    return i, fields
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching notification; last ones: {[f for _, f in self.received[-12:]]}")
            await asyncio.sleep(0.02)

    async def collect(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._drain()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # AF_UNIX paths must stay short
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def backends(ca):
    a = await TlsBackend("a", server_context(ca, "app.test")).start()
    b = await TlsBackend("b", server_context(ca, "app.test")).start()
    yield a, b
    await a.close()
    await b.close()


def _config(port: int, backend_port: int) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("app.test", f"127.0.0.1:{backend_port}")])
            + configs.common(limits={"shutdown_grace": 10.0}))


def _now_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_ready_watchdog_reload_stopping(start_proxy, backends, ca, notify_dir) -> None:
    a, b = backends
    notify = NotifySocket(f"{notify_dir}/notify")
    port = free_port()
    ctx = client_context(ca)
    try:
        proxy = start_proxy(_config(port, a.port), wait=False,
                            env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
        ready_at, ready = await notify.wait_for(lambda f: f.get("READY") == "1")
        # READY=1 means the listener is bound: a connection succeeds at once, with no retry.
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert ready["STATUS"] == "relay=copy connections=0 accepted=0 over_limit=0 reloads=0"

        # WATCHDOG_USEC=0.4 s: a ping every 0.2 s from the event loop.
        await notify.collect(1.2)
        pings = [t for t, f in notify.received[ready_at:] if f.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, notify.received
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.4

        # A connection held open shows up in STATUS (the probe connection above was accepted too).
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="app.test")
        writer.write(b"WHO\n")
        assert await reader.readline() == b"backend=a alpn=None\n"
        await notify.wait_for(lambda f: "connections=1 accepted=2 " in f.get("STATUS", ""), after=ready_at)

        # SIGHUP: RELOADING=1 (with the monotonic time of the request), then READY=1 once it is in force.
        proxy.config_path.write_text(_config(port, b.port))
        before = _now_usec()
        mark = len(notify.received)
        proxy.signal(signal.SIGHUP)
        i, reloading = await notify.wait_for(lambda f: f.get("RELOADING") == "1", after=mark)
        assert before <= int(reloading["MONOTONIC_USEC"]) <= _now_usec()
        _, ready = await notify.wait_for(lambda f: f.get("READY") == "1", after=i)
        assert ready["STATUS"].endswith("reloads=1")
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"

        # A rejected file: the same pair of messages, and STATUS says the old config is still running,
        # and why (`systemctl status` shows it).
        proxy.config_path.write_text("[limits]\nmax_connections = 0\n")
        mark = len(notify.received)
        proxy.signal(signal.SIGHUP)
        i, _ = await notify.wait_for(lambda f: f.get("RELOADING") == "1", after=mark)
        _, ready = await notify.wait_for(lambda f: f.get("READY") == "1", after=i)
        assert ready["STATUS"].endswith(f"reloads=1 last_reload=failed: {proxy.config_path}: listener: "
                                        "at least one [[listener]] is required"), ready

        # SIGTERM: STOPPING=1 at once, while the held connection still drains.
        mark = len(notify.received)
        proxy.signal(signal.SIGTERM)
        _, stopping = await notify.wait_for(lambda f: f.get("STOPPING") == "1", after=mark)
        assert stopping["STATUS"] == "stopping: draining 1 connection(s)"
        assert proxy.proc.poll() is None
        writer.write(b"QUIT\n")
        writer.close()
        assert await asyncio.to_thread(proxy.proc.wait, 20) == 0
    finally:
        notify.close()


async def test_abstract_socket_and_foreign_watchdog_pid(start_proxy, backends, notify_dir) -> None:
    """An "@name" NOTIFY_SOCKET is abstract; WATCHDOG_PID naming another process means: do not ping."""
    a, _ = backends
    notify = NotifySocket(f"@sniproxy-test-{notify_dir.rsplit('-', 1)[1]}")
    try:
        start_proxy(_config(free_port(), a.port), wait=False,
                    env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        ready_at, _ = await notify.wait_for(lambda f: f.get("READY") == "1")
        await notify.collect(0.6)
        assert not [f for _, f in notify.received[ready_at:] if "WATCHDOG" in f], notify.received
    finally:
        notify.close()


async def test_workers_supervisor_reports_a_rejected_reload(start_proxy, backends, ca, notify_dir) -> None:
    """With [server] workers the supervisor alone speaks to systemd: a file the workers rejected must
    reach STATUS= with the reason (it used to say workers=2/2 restarts=0 as if all went well), and a
    later good reload clears it."""
    a, b = backends
    notify = NotifySocket(f"{notify_dir}/notify")
    port = free_port()
    ctx = client_context(ca)
    workers = "\n[server]\nworkers = 2\n"
    try:
        proxy = start_proxy(_config(port, a.port) + workers, wait=False, env={"NOTIFY_SOCKET": notify.address})
        _, ready = await notify.wait_for(lambda f: f.get("READY") == "1")
        assert ready["STATUS"] == "workers=2/2 restarts=0"

        proxy.config_path.write_text(_config(port, a.port).replace("max_connections = 10000",
                                                                    "max_connections = 0") + workers)
        mark = len(notify.received)
        proxy.signal(signal.SIGHUP)
        i, _ = await notify.wait_for(lambda f: f.get("RELOADING") == "1", after=mark)
        _, ready = await notify.wait_for(lambda f: f.get("READY") == "1", after=i)
        assert ready["STATUS"] == (f"workers=2/2 restarts=0 last_reload=failed: {proxy.config_path}: "
                                   "limits.max_connections: must be >= 1, got 0"), ready
        (failed,) = await proxy.until(lambda e: e.get("event") == "workers_reload_failed")
        assert failed["level"] == "error" and sorted(failed["workers"]) == [0, 1], failed
        # The periodic STATUS keeps saying it (every few seconds), and the old routes still serve.
        await notify.wait_for(lambda f: "last_reload=failed" in f.get("STATUS", "") and "READY" not in f,
                              after=i, timeout=10)
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"

        proxy.config_path.write_text(_config(port, b.port) + workers)
        mark = len(notify.received)
        proxy.signal(signal.SIGHUP)
        i, _ = await notify.wait_for(lambda f: f.get("RELOADING") == "1", after=mark)
        _, ready = await notify.wait_for(lambda f: f.get("READY") == "1", after=i)
        assert ready["STATUS"] == "workers=2/2 restarts=0", ready
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"
    finally:
        notify.close()
