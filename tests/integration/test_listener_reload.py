# SIGHUP adds and removes [[listener]] blocks: a new listener serves at once, a removed one stops
# accepting while its open connections finish byte for byte, and a listener that cannot be bound
# leaves the whole previous configuration running. With one process, and with two workers (whose
# supervisor binds the new sockets and hands them over with SCM_RIGHTS).
from __future__ import annotations

import asyncio
import signal
import socket

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.workers import until_every_worker_served
from tests.support.backends import (DataBackend, TlsBackend, client_context, data_client, pattern_digest,
                                    server_context, who)


@pytest.fixture
async def backends(ca):
    app = await TlsBackend("a", server_context(ca, "app.test")).start()
    data = await DataBackend().start()
    yield app, data
    await app.close()
    await data.close()


def text(ports: list[int], app_port: int, data_port: int, workers: int) -> str:
    return ("".join(configs.listener(f"127.0.0.1:{p}") for p in ports)
            + configs.table("default", [("app.test", f"127.0.0.1:{app_port}"),
                                        ("data.test", f"127.0.0.1:{data_port}")])
            + configs.common(limits={"shutdown_grace": 5.0})
            + f"\n[server]\nworkers = {workers}\n")


async def reload(proxy, workers: int, count: int) -> None:
    """SIGHUP, then wait until every process has answered the `count`-th reload."""
    proxy.signal(signal.SIGHUP)
    if workers == 1:
        await proxy.until(lambda e: e.get("event") in ("reloaded", "reload_failed"), count=count)
    else:
        # A rejected file ends in workers_reload_failed (the supervisor's summary), else workers_reloaded.
        await proxy.until(lambda e: e.get("event") in ("workers_reloaded", "workers_reload_failed"),
                          count=count)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


SIZE = 40 << 20


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_adds_a_listener_while_a_transfer_runs_on_the_old_one(backends, start_proxy, ca,
                                                                             workers):
    app, data = backends
    old, new = free_port(), free_port()
    proxy = start_proxy(text([old], app.port, data.port, workers))
    transfer = asyncio.create_task(
        data_client("127.0.0.1", old, "data.test", SIZE, SIZE, seed=3, pause=0.01))
    await asyncio.sleep(0.3)
    assert refused(new)

    proxy.config_path.write_text(text([old, new], app.port, data.port, workers))
    await reload(proxy, workers, 1)
    assert not transfer.done(), "the transfer should still be running across the reload"
    added = [e for e in proxy.events() if e.get("event") == "listener_added"]
    assert [e["listener"] for e in added] == [f"127.0.0.1:{new}"] * workers
    ctx = client_context(ca)
    answers = await asyncio.gather(*(who("127.0.0.1", new, "app.test", ctx) for _ in range(24)))
    assert answers == ["backend=a alpn=None"] * 24
    assert await who("127.0.0.1", old, "app.test", ctx) == "backend=a alpn=None"

    # Byte-exact both ways: what the client got, and what the backend got (seed + 1 goes up).
    assert await transfer == {"received": SIZE, "sha256": pattern_digest(SIZE, 3)}
    assert data.results == [{"received": SIZE, "sha256": pattern_digest(SIZE, 4)}]
    events = await proxy.access(count=26)
    assert {e["outcome"] for e in events} == {"closed"}
    on_new = [e for e in events if e["listener"] == f"127.0.0.1:{new}"]
    assert len(on_new) == 24
    if workers == 2:  # both workers took the new socket: both accept from it

        async def burst() -> int:
            answers = await asyncio.gather(*(who("127.0.0.1", new, "app.test", ctx) for _ in range(8)))
            assert answers == ["backend=a alpn=None"] * 8
            return 8

        await until_every_worker_served(proxy, burst, where=lambda e: e["listener"] == f"127.0.0.1:{new}")


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_removes_a_listener_and_its_open_connection_finishes(backends, start_proxy, ca,
                                                                          workers):
    app, data = backends
    kept, gone = free_port(), free_port()
    proxy = start_proxy(text([kept, gone], app.port, data.port, workers))
    transfer = asyncio.create_task(
        data_client("127.0.0.1", gone, "data.test", SIZE, SIZE, seed=5, pause=0.01))
    await asyncio.sleep(0.3)

    proxy.config_path.write_text(text([kept], app.port, data.port, workers))
    await reload(proxy, workers, 1)
    removed = [e for e in proxy.events() if e.get("event") == "listener_removed"]
    assert [e["listener"] for e in removed] == [f"127.0.0.1:{gone}"] * workers
    assert not transfer.done(), "the transfer should still be running across the reload"
    # Nothing accepts there any more: no worker, and no socket left in the supervisor or in flight.
    assert refused(gone)
    assert await who("127.0.0.1", kept, "app.test", client_context(ca)) == "backend=a alpn=None"

    assert await transfer == {"received": SIZE, "sha256": pattern_digest(SIZE, 5)}
    assert data.results == [{"received": SIZE, "sha256": pattern_digest(SIZE, 6)}]
    events = await proxy.access(count=2)
    assert [(e["listener"], e["outcome"]) for e in events] == [
        (f"127.0.0.1:{kept}", "closed"), (f"127.0.0.1:{gone}", "closed")]


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_listener_that_cannot_be_bound_keeps_the_previous_config(backends, start_proxy, ca,
                                                                        workers):
    app, data = backends
    port, taken, later = free_port(), free_port(), free_port()
    proxy = start_proxy(text([port], app.port, data.port, workers))
    blocker = socket.create_server(("127.0.0.1", taken))
    try:
        proxy.config_path.write_text(text([port, later, taken], app.port, data.port, workers))
        await reload(proxy, workers, 1)
        failed = [e for e in proxy.events() if e.get("event") == "reload_failed"]
        # The process that binds (the supervisor, with workers) names the listener and the reason...
        (binder,) = [e for e in failed if "worker" not in e or workers == 1]
        assert binder["error"] == f"cannot bind 127.0.0.1:{taken}: Address already in use", binder
        # ...and each worker, finding no socket offered, keeps its configuration too.
        assert sorted(e.get("worker") for e in failed if e is not binder) == \
            ([] if workers == 1 else [0, 1])
        assert all("the supervisor offered no socket" in e["error"] for e in failed if e is not binder)
        if workers == 2:  # the supervisor's summary (and STATUS=) names the cause, not its symptom
            (summary,) = [e for e in proxy.events() if e.get("event") == "workers_reload_failed"]
            assert summary["error"] == binder["error"]
        # All or nothing: the listener that could be bound was not left open either.
        assert refused(later)
        assert not [e for e in proxy.events() if e.get("event") in ("listener_added", "reloaded")]
    finally:
        blocker.close()
    ctx = client_context(ca)
    assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"
    # Once the port is free the same file loads.
    await reload(proxy, workers, 2)
    assert await who("127.0.0.1", taken, "app.test", ctx) == "backend=a alpn=None"
    assert await who("127.0.0.1", later, "app.test", ctx) == "backend=a alpn=None"


async def test_reload_adds_an_http_listener_to_two_workers(backends, start_proxy, tmp_path):
    """Port 80's case: a running TLS proxy gets a plain-HTTP listener by SIGHUP, served by both
    workers, routed on Host by the same table (curl, a real HTTP backend)."""
    from tests.integration.test_http_listener import curl
    from tests.support.http_backend import HttpBackend

    app, data = backends
    web = HttpBackend("web")
    try:
        tls_port, http_port = free_port(), free_port()

        def config(with_http: bool) -> str:
            listeners = configs.listener(f"127.0.0.1:{tls_port}")
            if with_http:
                listeners += configs.listener(f"127.0.0.1:{http_port}", protocol="http")
            return (listeners
                    + configs.table("default", [("app.test", f"127.0.0.1:{app.port}"),
                                                ("web.test", f"127.0.0.1:{web.port}")])
                    + configs.common() + "\n[server]\nworkers = 2\n")

        proxy = start_proxy(config(False))
        proxy.config_path.write_text(config(True))
        await reload(proxy, 2, 1)
        url = f"http://127.0.0.1:{http_port}/p"

        async def burst() -> int:
            answers = await asyncio.gather(*(asyncio.to_thread(curl, "-H", "Host: web.test", url)
                                             for _ in range(16)))
            assert answers == [(200, "backend=web host=web.test path=/p")] * 16
            return 16

        events = await until_every_worker_served(proxy, burst)  # both took the new http listener
        assert {(e["protocol"], e["sni"], e["outcome"]) for e in events} == {("http", "web.test", "closed")}
    finally:
        web.close()
