# [server] workers: N processes accept on the listening sockets the supervisor bound (shared); every
# byte arrives in every relay mode, a dead or stalled worker is replaced while the others serve the
# connections that arrive meanwhile, SIGHUP reaches every worker, SIGTERM drains them all.
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from tests.conftest import free_port
from tests.integration.test_data_integrity import data_proxy_config, run_transfers
from tests.support import configs
from tests.support.backends import DataBackend, TlsBackend, client_context, server_context, who
from tests.support.workers import until_every_worker_served

WORKERS = "\n[server]\nworkers = 2\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it is dead for our purposes once its parent reaped it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _started(proxy) -> list[int]:
    (event,) = proxy.wait_for(lambda e: e.get("event") == "workers_started")
    return event["pids"]


async def test_workers_share_the_listener_and_every_byte_arrives(start_proxy, relay_mode):
    backend = await DataBackend().start()
    try:
        port = free_port()
        proxy = start_proxy(data_proxy_config(backend.port, port) + WORKERS)
        pids = _started(proxy)
        assert len(pids) == 2 and proxy.proc.pid not in pids
        sizes = [(1 << 20, 3 << 20), (3 << 20, 1 << 20)] * 12

        async def burst() -> int:
            backend.results.clear()
            await run_transfers(port, backend, sizes)
            return len(sizes)

        # Both workers take connections from the shared listening socket (asserted inside).
        events = await until_every_worker_served(proxy, burst)
        assert len(events) % len(sizes) == 0
        assert {e["outcome"] for e in events} == {"closed"}
        assert {e["relay"] for e in events} == {proxy.expected_relay}
        # Both workers write to one stdout: every line must still be one whole JSON event.
        for line in proxy.text().splitlines():
            json.loads(line)
    finally:
        await backend.close()


@pytest.fixture
async def app_backend(ca):
    backend = await TlsBackend("a", server_context(ca, "app.test")).start()
    yield backend
    await backend.close()


def _app_proxy(start_proxy, backend: TlsBackend, env: dict[str, str] | None = None):
    """A 2-worker proxy routing app.test to `backend`; returns it with its port."""
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [("app.test", f"127.0.0.1:{backend.port}")])
                        + configs.common() + WORKERS, env=env)
    return proxy, port


async def _ask_many(port: int, ca, count: int) -> list[str]:
    ctx = client_context(ca)
    return list(await asyncio.gather(*(who("127.0.0.1", port, "app.test", ctx) for _ in range(count))))


async def test_a_killed_worker_is_replaced_and_connections_queued_meanwhile_are_served(start_proxy, ca,
                                                                                        app_backend):
    proxy, port = _app_proxy(start_proxy, app_backend)
    pids = _started(proxy)
    os.kill(pids[1], signal.SIGKILL)
    # Connect at once: the surviving worker takes every connection from the shared listening socket
    # (the supervisor keeps it open) while the dead one is replaced.
    assert await _ask_many(port, ca, 30) == ["backend=a alpn=None"] * 30
    (exited,) = await proxy.until(lambda e: e.get("event") == "worker_exited")
    assert exited["worker"] == 1 and "SIGKILL" in exited["reason"]
    (restarted,) = await proxy.until(lambda e: e.get("event") == "worker_restarted")
    assert restarted["worker"] == 1 and restarted["pid"] not in pids
    assert not _pid_alive(pids[1]) and _pid_alive(pids[0])
    assert len(await proxy.access(count=30)) == 30

    async def burst() -> int:
        assert await _ask_many(port, ca, 10) == ["backend=a alpn=None"] * 10
        return 10

    await until_every_worker_served(proxy, burst)  # the replacement serves too


async def test_a_stalled_worker_is_killed_and_replaced(start_proxy, ca, app_backend):
    proxy, port = _app_proxy(start_proxy, app_backend, env={"SNIPROXY_WORKER_STALL_SECONDS": "2"})
    pids = _started(proxy)
    os.kill(pids[0], signal.SIGSTOP)  # its event loop stops: no heartbeat
    (stalled,) = await proxy.until(lambda e: e.get("event") == "worker_stalled", timeout=15)
    assert stalled["pid"] == pids[0]
    await proxy.until(lambda e: e.get("event") == "worker_restarted", timeout=15)
    assert await _ask_many(port, ca, 20) == ["backend=a alpn=None"] * 20


async def test_sighup_reloads_every_worker(start_proxy, ca):
    a = await TlsBackend("a", server_context(ca, "app.test")).start()
    b = await TlsBackend("b", server_context(ca, "app.test")).start()
    try:
        port = free_port()

        def text(backend_port: int) -> str:
            return (configs.listener(f"127.0.0.1:{port}")
                    + configs.table("default", [("app.test", f"127.0.0.1:{backend_port}")])
                    + configs.common() + WORKERS)

        proxy = start_proxy(text(a.port))
        _started(proxy)
        ctx = client_context(ca)
        proxy.config_path.write_text(text(b.port))
        proxy.signal(signal.SIGHUP)
        await proxy.until(lambda e: e.get("event") == "workers_reloaded")
        reloaded = {e["worker"] for e in proxy.events() if e.get("event") == "reloaded"}
        assert reloaded == {0, 1}

        async def burst() -> int:
            answers = await asyncio.gather(*(who("127.0.0.1", port, "app.test", ctx) for _ in range(24)))
            assert answers == ["backend=b alpn=None"] * 24
            return 24

        await until_every_worker_served(proxy, burst)  # each answered from the reloaded file
    finally:
        await a.close()
        await b.close()


async def test_sigterm_drains_every_worker_then_exits_zero(start_proxy, relay_mode):
    backend = await DataBackend().start()
    try:
        port = free_port()
        proxy = start_proxy(data_proxy_config(backend.port, port, limits={"shutdown_grace": 20.0}) + WORKERS)
        pids = _started(proxy)
        # Transfers in flight when the stop comes finish whole (the drain), on both workers.
        sizes = [(8 << 20, 8 << 20)] * 8
        transfers = asyncio.ensure_future(run_transfers(port, backend, sizes, after_eof=True))
        await asyncio.sleep(0.5)  # connected and accepted; the transfers take seconds
        proxy.signal(signal.SIGTERM)
        await transfers
        deadline = time.monotonic() + 30
        while proxy.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert proxy.proc.returncode == 0, proxy.text()[-3000:]
        assert not any(_pid_alive(pid) for pid in pids)
        stopped = {e.get("worker") for e in proxy.events() if e.get("event") == "stopped"}
        assert stopped == {0, 1, None}  # both workers and the supervisor
    finally:
        await backend.close()


async def test_a_second_proxy_on_the_same_port_is_refused_not_silently_sharing_it(start_proxy, ca):
    """SO_REUSEPORT would let a second proxy of the same user join the port and take half the
    clients; the supervisor's plain bind first makes that a start failure."""
    port = free_port()
    text = configs.listener(f"127.0.0.1:{port}") + configs.table("default", [], "127.0.0.1:9") + configs.common()
    first = start_proxy(text + WORKERS)
    _started(first)
    second = start_proxy(text + WORKERS, wait=False)
    deadline = time.monotonic() + 30
    while second.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert second.proc.returncode == 1
    (failed,) = [e for e in second.events() if e.get("event") == "start_failed"]
    assert "Address already in use" in failed["error"]
    assert not [e for e in second.events() if e.get("event") == "workers_started"]
    assert first.proc.poll() is None


async def test_max_connections_is_split_between_workers(start_proxy):
    """max_connections = 2 with 2 workers: each worker holds at most one connection, so of 10 clients
    waiting mid-hello at most 2 are held and the rest are refused at accept (`over_limit`)."""
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}") + configs.table("default", [], "127.0.0.1:9")
                        + configs.common(limits={"max_connections": 2, "client_hello_timeout": 30.0})
                        + WORKERS)
    _started(proxy)
    clients = []
    try:
        for _ in range(10):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            clients.append(writer)
        await proxy.until(lambda e: e.get("outcome") == "over_limit", count=8)
        await asyncio.sleep(0.3)  # a ninth would show up now if a worker held two
        refused = [e for e in proxy.events() if e.get("outcome") == "over_limit"]
        # 8 when the kernel spread the clients over both workers, 9 when all went to one
        assert len(refused) in (8, 9), refused
    finally:
        for writer in clients:
            writer.close()


async def test_the_supervisor_drops_the_map_entries_of_a_killed_workers_spliced_pairs(start_proxy):
    """Issue 15 #6: a worker SIGKILLed with spliced pairs leaves no splice_slots entry behind (the
    kernel took its sockets out of sock_map when it closed them; the supervisor does the rest)."""
    from tests.support.backends import real_client_hello
    from tests.support.soak import map_entry_counts

    held: list[asyncio.StreamWriter] = []
    backend = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    pin_dir = f"/sys/fs/bpf/sniproxy-test-workers-{os.getpid()}"
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [("app.test", "127.0.0.1:%d" % backend.sockets[0].getsockname()[1])])
                        + configs.common(splice=True, pin_dir=pin_dir, kernel_cache=False) + WORKERS)
    clients = []
    try:
        pids = _started(proxy)
        for _ in range(12):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(real_client_hello("app.test"))
            clients.append(writer)
        deadline = time.monotonic() + 10
        while map_entry_counts(pin_dir)["splice_slots"] < 24:
            assert time.monotonic() < deadline, map_entry_counts(pin_dir)
            await asyncio.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await proxy.until(lambda e: e.get("event") == "worker_restarted", timeout=15)
        deadline = time.monotonic() + 10
        while (counts := map_entry_counts(pin_dir)) != {"sock_map": 0, "splice_slots": 0}:
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.05)
        forgotten = [e for e in proxy.events() if e.get("event") == "worker_pairs_forgotten"]
        assert sum(e["entries"] for e in forgotten) == 24
    finally:
        for w in clients + held:
            w.close()
        backend.close()
        proxy.stop()
        import shutil
        shutil.rmtree(pin_dir, ignore_errors=True)
