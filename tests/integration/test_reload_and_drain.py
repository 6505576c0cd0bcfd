# SIGHUP swaps routes for new connections without touching established ones, and a broken file keeps
# the old routes; SIGTERM stops accepting and lets open connections finish within the grace period.
from __future__ import annotations

import asyncio
import signal

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import (DataBackend, TlsBackend, client_context, data_client, pattern_digest,
                                    real_client_hello, server_context, who)


@pytest.fixture
async def servers(ca):
    a = await TlsBackend("a", server_context(ca, "app.test")).start()
    b = await TlsBackend("b", server_context(ca, "app.test")).start()
    data = await DataBackend().start()
    yield a, b, data
    for s in (a, b, data):
        await s.close()


def config_text(port: int, app_port: int, data_port: int, grace: float = 5.0) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("app.test", f"127.0.0.1:{app_port}"),
                                        ("data.test", f"127.0.0.1:{data_port}")])
            + configs.common(limits={"shutdown_grace": grace}))


async def test_sighup_changes_routes_while_a_transfer_continues(servers, start_proxy, ca, relay_mode):
    a, b, data = servers
    port = free_port()
    proxy = start_proxy(config_text(port, a.port, data.port))
    ctx = client_context(ca)
    assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"

    size = 40 << 20
    transfer = asyncio.create_task(data_client("127.0.0.1", port, "data.test", size, size, seed=7, pause=0.01))
    await asyncio.sleep(0.3)
    proxy.config_path.write_text(config_text(port, b.port, data.port))
    proxy.signal(signal.SIGHUP)
    await proxy.until(lambda e: e.get("event") == "reloaded")
    assert not transfer.done(), "the transfer should still be running across the reload"
    assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"

    proxy.config_path.write_text("[[listener]]\nbind = 'not an address'\n")
    proxy.signal(signal.SIGHUP)
    (failed,) = await proxy.until(lambda e: e.get("event") == "reload_failed")
    assert "listener[0].bind" in failed["error"]
    assert not transfer.done()
    assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"

    assert await transfer == {"received": size, "sha256": pattern_digest(size, 7)}
    assert data.results[-1]["received"] == size
    events = await proxy.access(count=4)
    assert all(e["outcome"] == "closed" for e in events)


async def test_sigterm_drains_open_connections(servers, start_proxy, relay_mode):
    a, _, data = servers
    port = free_port()
    proxy = start_proxy(config_text(port, a.port, data.port, grace=20.0))
    size = 10 << 20
    transfer = asyncio.create_task(data_client("127.0.0.1", port, "data.test", size, size, seed=3, pause=0.01))
    await asyncio.sleep(0.3)
    proxy.signal(signal.SIGTERM)
    await proxy.until(lambda e: e.get("event") == "draining")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    assert await transfer == {"received": size, "sha256": pattern_digest(size, 3)}
    assert await asyncio.to_thread(proxy.proc.wait, 20) == 0
    (event,) = await proxy.access()
    assert event["outcome"] == "closed"


async def test_sigterm_cuts_connections_still_open_after_the_grace_period(servers, start_proxy, relay_mode):
    a, _, data = servers
    port = free_port()
    proxy = start_proxy(config_text(port, a.port, data.port, grace=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(real_client_hello("data.test") + b"0 1\n")  # an idle relayed connection
    await asyncio.sleep(0.3)
    proxy.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proxy.proc.wait, 10) == 0
    (event,) = await proxy.access()
    assert event["outcome"] == "shutdown"
    async with asyncio.timeout(5):
        try:  # cut means closed: with a FIN (copy) or a reset (splice aborts the kernel's queue)
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
    writer.close()


async def test_a_reload_that_changes_ebpf_keeps_the_running_data_plane_and_says_so(servers, start_proxy, ca):
    """[ebpf] is loaded once, at start: a reload that turns splice on keeps copying, logs
    reload_ebpf_unchanged, and applies the rest of the file (here a route change)."""
    a, b, data = servers
    port = free_port()
    proxy = start_proxy(config_text(port, a.port, data.port))
    ctx = client_context(ca)
    assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"
    changed = config_text(port, b.port, data.port).replace("splice = false", "splice = true\nqueue_limit = 1048576")
    assert "splice = true" in changed
    proxy.config_path.write_text(changed)
    proxy.signal(signal.SIGHUP)
    await proxy.until(lambda e: e.get("event") == "reloaded")
    (kept,) = [e for e in proxy.events() if e.get("event") == "reload_ebpf_unchanged"]
    assert kept["reason"] == "[ebpf] needs a restart" and kept["level"] == "warning"
    assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"
    events = await proxy.access(count=2)
    assert [e["relay"] for e in events] == ["copy", "copy"]
