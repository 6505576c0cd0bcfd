# Issue 16, through the real proxy process with real TLS clients and servers: ALPN-based routes
# (openssl s_client -alpn acme-tls/1 and curl --http2 to one name reach different backends), and a
# route with two backends (shared; one SIGKILLed mid-test gets no new connections during the
# hold-down and costs clients no error; active health checks take it out and bring it back).
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who
from tests.support.proxyproc import REPO

NAME = "acme.example.test"


# ---------------------------------------------------------------------------------------------------
# ALPN


@pytest.fixture
async def alpn_backends(ca):
    acme = await TlsBackend("acme", server_context(ca, NAME, alpn=("acme-tls/1",))).start()
    # http/1.1 only: curl offers h2 too, and TlsBackend speaks HTTP/1.1 (the hello still says h2).
    web = await TlsBackend("web", server_context(ca, NAME, alpn=("http/1.1",))).start()
    yield acme, web
    await acme.close()
    await web.close()


async def run(*argv: str, stdin: bytes = b"", timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_acme_alpn_and_http2_reach_different_backends(alpn_backends, start_proxy, ca_pem):
    acme, web = alpn_backends
    port = free_port()
    proxy = start_proxy(
        configs.listener(f"127.0.0.1:{port}")
        + "[table.default]\nroutes = [\n"
        f'  {{ match = "{NAME}", alpn = "acme-tls/1", backend = "127.0.0.1:{acme.port}" }},\n'
        f'  {{ match = "{NAME}", backend = "127.0.0.1:{web.port}" }},\n'
        "]\n\n"
        + configs.common())

    code, out, err = await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", NAME,
        "-alpn", "acme-tls/1", "-CAfile", str(ca_pem), "-verify_return_error", "-ign_eof",
        stdin=b"WHO\nQUIT\n")
    assert code == 0, err
    assert "ALPN protocol: acme-tls/1" in out
    assert "backend=acme alpn=acme-tls/1" in out

    code, out, err = await run(
        "curl", "--silent", "--show-error", "--http2", "--cacert", str(ca_pem),
        "--resolve", f"{NAME}:{port}:127.0.0.1", f"https://{NAME}:{port}/")
    assert code == 0, err
    assert out == "backend=web alpn=http/1.1\n"

    events = await proxy.access(count=2)
    by_route = {tuple(e["alpn"]): e for e in events}
    assert by_route[("acme-tls/1",)]["backend"] == f"127.0.0.1:{acme.port}"
    assert by_route[("h2", "http/1.1")]["backend"] == f"127.0.0.1:{web.port}"
    assert (acme.connections, web.connections) == (1, 1)


async def test_alpn_only_route_refuses_other_clients(alpn_backends, start_proxy, ca):
    acme, _web = alpn_backends
    port = free_port()
    proxy = start_proxy(
        configs.listener(f"127.0.0.1:{port}")
        + f'[table.default]\nroutes = [{{ match = "{NAME}", alpn = ["acme-tls/1"], '
          f'backend = "127.0.0.1:{acme.port}" }}]\n\n'
        + configs.common())
    with pytest.raises(Exception) as info:  # TLS alert unrecognized_name from the proxy
        await who("127.0.0.1", port, NAME, client_context(ca, ("h2",)))
    assert "UNRECOGNIZED_NAME" in str(info.value).upper() or "unrecognized" in str(info.value)
    (event,) = await proxy.access()
    assert event["outcome"] == "no_route" and event["alpn"] == ["h2"]
    assert acme.connections == 0


# ---------------------------------------------------------------------------------------------------
# Several backends


class BackendProcess:
    """tests/support/tls_server_proc.py: a TLS backend in a process of its own, to SIGKILL."""

    def __init__(self, name: str, port: int, pem: Path) -> None:
        self.name, self.port, self.pem = name, port, pem
        self.proc: subprocess.Popen | None = None

    def start(self) -> BackendProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.tls_server_proc", self.name, "127.0.0.1",
             str(self.port), str(self.pem)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), line
        self.port = int(line.split()[1])
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def backend_pair(ca, tmp_path):
    pem = tmp_path / "backend.pem"
    ca.issue_cert("pool.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    made: list[BackendProcess] = []

    def make(name: str, port: int = 0) -> BackendProcess:
        made.append(BackendProcess(name, port, pem).start())
        return made[-1]

    yield make
    for backend in made:
        backend.kill()


def pool_config(port: int, a: BackendProcess, b: BackendProcess, backends: str) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + f'[table.default]\nroutes = [{{ match = "pool.test", backend = ["{a.address}", "{b.address}"] }}]\n\n'
            + configs.common(limits={"connect_timeout": 2.0})
            + "\n[backends]\n" + backends)


async def who_many(port: int, ca, n: int) -> list[str]:
    ctx = client_context(ca)
    return [await who("127.0.0.1", port, "pool.test", ctx) for _ in range(n)]


async def test_two_backends_share_and_a_killed_one_is_held_down(backend_pair, start_proxy, ca):
    a, b = backend_pair("a"), backend_pair("b")
    port = free_port()
    hold_down = 4.0
    proxy = start_proxy(pool_config(port, a, b, f"hold_down = {hold_down}\n"))

    # Both serve: least connections with a round-robin tie-break alternates short connections.
    answers = await who_many(port, ca, 8)
    assert Counter(answers) == {"backend=a alpn=None": 4, "backend=b alpn=None": 4}
    events = await proxy.access(count=8)
    assert Counter(e["backend"] for e in events) == {a.address: 4, b.address: 4}

    a.kill()
    killed_at = time.monotonic()
    # Every client still gets an answer; `a` is tried by one connection only, then held down.
    answers = await who_many(port, ca, 8)
    assert time.monotonic() - killed_at < hold_down, "the round took longer than the hold-down"
    assert answers == ["backend=b alpn=None"] * 8
    events = (await proxy.access(count=16))[8:]
    assert all(e["outcome"] == "closed" and e["backend"] == b.address for e in events), events
    tried = [e for e in events if e.get("backend_failed")]
    assert len(tried) == 1, events
    assert tried[0]["backend_failed"][0].startswith(f"{a.address}: Connection refused")
    (down,) = proxy.wait_for(lambda e: e.get("event") == "backend_down")
    assert down["backend"] == a.address and down["hold_down"] == hold_down

    # After the hold-down, one connection tries `a` again (still dead: held down again, no error).
    await asyncio.sleep(hold_down - (time.monotonic() - killed_at) + 0.5)
    answers = await who_many(port, ca, 4)
    assert answers == ["backend=b alpn=None"] * 4
    events = (await proxy.access(count=20))[16:]
    assert sum(1 for e in events if e.get("backend_failed")) == 1, events


async def test_health_checks_take_a_backend_out_and_back(backend_pair, start_proxy, ca):
    a, b = backend_pair("a"), backend_pair("b")
    port = free_port()
    proxy = start_proxy(pool_config(
        port, a, b, "hold_down = 60\nhealth_check_interval = 0.3\nhealth_check_timeout = 0.3\n"))
    await proxy.until(lambda e: e.get("event") == "health_checks")

    a.kill()
    (down,) = await proxy.until(lambda e: e.get("event") == "backend_down", timeout=5)
    assert down["backend"] == a.address and "health check" in down["reason"]
    # Out before any client hit it: nobody even tries it.
    answers = await who_many(port, ca, 4)
    assert answers == ["backend=b alpn=None"] * 4
    events = await proxy.access(count=4)
    assert not any(e.get("backend_failed") for e in events), events

    backend_pair("a", port=a.port)  # the same address comes back
    (up,) = await proxy.until(lambda e: e.get("event") == "backend_up", timeout=5)
    assert up["backend"] == a.address and up["by"] == "health_check"
    answers = await who_many(port, ca, 4)
    assert Counter(answers) == {"backend=a alpn=None": 2, "backend=b alpn=None": 2}


async def test_all_backends_down_is_one_connect_failed(backend_pair, start_proxy, ca):
    a, b = backend_pair("a"), backend_pair("b")
    port = free_port()
    proxy = start_proxy(pool_config(port, a, b, "hold_down = 30\n"))
    a.kill()
    b.kill()
    for _ in range(2):  # the second finds both held down and still tries both
        with pytest.raises((ConnectionError, OSError)):
            await who("127.0.0.1", port, "pool.test", client_context(ca))
    events = await proxy.access(count=2)
    for event in events:
        assert event["outcome"] == "connect_failed"
        assert a.address in event["reason"] and b.address in event["reason"]
    downs = [e for e in proxy.events() if e.get("event") == "backend_down"]
    assert sorted(e["backend"] for e in downs) == sorted([a.address, b.address])


async def test_reload_turns_health_checks_on_and_keeps_serving(backend_pair, start_proxy, ca):
    a, b = backend_pair("a"), backend_pair("b")
    port = free_port()
    proxy = start_proxy(pool_config(port, a, b, "hold_down = 60\n"))
    assert Counter(await who_many(port, ca, 2)) == {"backend=a alpn=None": 1, "backend=b alpn=None": 1}
    a.kill()
    proxy.config_path.write_text(pool_config(
        port, a, b, "hold_down = 60\nhealth_check_interval = 0.3\nhealth_check_timeout = 0.3\n"))
    proxy.signal(signal.SIGHUP)
    await proxy.until(lambda e: e.get("event") == "reloaded")
    (checks,) = await proxy.until(lambda e: e.get("event") == "health_checks")
    assert sorted(checks["backends"]) == sorted([a.address, b.address])
    (down,) = await proxy.until(lambda e: e.get("event") == "backend_down", timeout=5)
    assert down["backend"] == a.address
    assert await who_many(port, ca, 3) == ["backend=b alpn=None"] * 3
    events = await proxy.access(count=5)
    assert not any(e.get("backend_failed") for e in events[2:]), events
