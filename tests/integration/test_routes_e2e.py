# End to end through the real proxy process with real TLS: each route kind reaches the backend whose
# certificate the client verifies for its SNI, and which then names itself.
from __future__ import annotations

import asyncio
import ssl
import subprocess

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who


@pytest.fixture
async def backends(ca):
    made: dict[str, TlsBackend] = {}

    async def make(name: str, host: str, *cert_names: str) -> TlsBackend:
        made[name] = await TlsBackend(name, server_context(ca, *cert_names), host=host).start()
        return made[name]

    await make("app", "127.0.0.1", "app.example.test")
    await make("wild", "127.0.0.2", "*.example.test", "*.sub.example.test")
    await make("regex", "127.0.0.3", "*.svc.test")
    await make("dynamic", "127.0.0.4", "dyn.test")
    await make("fallback", "127.0.0.1", "fallback.test")
    await make("v6", "::1", "v6.example.test")
    yield made
    for backend in made.values():
        await backend.close()


@pytest.fixture
def routed_proxy(backends, dns, start_proxy, relay_mode):
    dns.add("backend.test", ["127.0.0.2"])
    dns.add("foo.internal.test", ["127.0.0.3"])
    dns.add("dyn.test", ["127.0.0.4"])
    dns.add("v6backend.test", ["::1"])
    b = backends
    main, with_fallback, strict, v6 = (free_port(), free_port(), free_port(), free_port("::1"))
    text = (
        configs.listener(f"127.0.0.1:{main}", "main")
        + configs.listener(f"127.0.0.1:{with_fallback}", "fb")
        + configs.listener(f"127.0.0.1:{strict}", "strict")
        + configs.listener(f"[::1]:{v6}", "v6")
        + configs.table("main", [
            ("app.example.test", f"127.0.0.1:{b['app'].port}"),
            ("v6.example.test", f"[::1]:{b['v6'].port}"),
            ("*.example.test", f"backend.test:{b['wild'].port}"),
            (r"~^(\w+)\.svc\.test$", f"$1.internal.test:{b['regex'].port}"),
            ("*", f"*:{b['dynamic'].port}"),
        ], allow_private=True)  # the test backends live on loopback
        + configs.table("fb", [("app.example.test", f"127.0.0.1:{b['app'].port}")],
                        fallback=f"127.0.0.1:{b['fallback'].port}")
        + configs.table("strict", [("app.example.test", f"127.0.0.1:{b['app'].port}")])
        + configs.table("v6", [("*.example.test", f"v6backend.test:{b['v6'].port}")])
        + configs.common(dns.address)
    )
    proxy = start_proxy(text)
    proxy.ports = {"main": main, "fb": with_fallback, "strict": strict, "v6": v6}
    return proxy


@pytest.mark.parametrize("sni, expected_backend, expected_route", [
    ("app.example.test", "app", "app.example.test"),
    ("APP.Example.Test", "app", "app.example.test"),          # hostnames compare case-insensitively
    ("v6.example.test", "v6", "v6.example.test"),             # IPv6 backend literal
    ("deep.sub.example.test", "wild", "*.example.test"),      # wildcard, more than one label
    ("foo.svc.test", "regex", r"~^(\w+)\.svc\.test$"),        # regex capture builds the backend name
    ("dyn.test", "dynamic", "*"),                            # dynamic: connect to the SNI name itself
])
async def test_each_route_kind_reaches_its_backend(routed_proxy, ca, sni, expected_backend, expected_route):
    answer = await who("127.0.0.1", routed_proxy.ports["main"], sni, client_context(ca, ("h2", "http/1.1")))
    assert answer == f"backend={expected_backend} alpn=http/1.1"
    (event,) = await routed_proxy.access()
    assert event["sni"] == sni.lower()
    assert event["alpn"] == ["h2", "http/1.1"]
    assert event["route"] == expected_route
    assert event["outcome"] == "closed"
    assert event["relay"] == routed_proxy.expected_relay
    assert event["bytes_up"] > 0 and event["bytes_down"] > 0


async def test_unmatched_name_goes_to_fallback(routed_proxy, ca):
    ctx = client_context(ca)
    ctx.check_hostname = False  # the fallback presents its own name, still signed by our CA
    assert await who("127.0.0.1", routed_proxy.ports["fb"], "nomatch.test", ctx) == "backend=fallback alpn=None"
    (event,) = await routed_proxy.access()
    assert event["route"] == "fallback" and event["sni"] == "nomatch.test"


async def test_no_sni_goes_to_fallback(routed_proxy, ca):
    ctx = client_context(ca)
    ctx.check_hostname = False
    reader, writer = await asyncio.open_connection("127.0.0.1", routed_proxy.ports["fb"], ssl=ctx,
                                                   server_hostname="")
    writer.write(b"WHO\n")
    assert (await reader.readline()).strip() == b"backend=fallback alpn=None"
    writer.close()
    await writer.wait_closed()
    (event,) = await routed_proxy.access()
    assert event["sni"] is None and event["route"] == "fallback"


async def test_no_route_and_no_fallback_sends_alert_112(routed_proxy, ca):
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await who("127.0.0.1", routed_proxy.ports["strict"], "other.test", client_context(ca))
    (event,) = await routed_proxy.access()
    assert event["outcome"] == "no_route" and event["sni"] == "other.test"


async def test_ipv6_listener(routed_proxy, ca):
    assert await who("::1", routed_proxy.ports["v6"], "v6.example.test", client_context(ca)) == "backend=v6 alpn=None"
    (event,) = await routed_proxy.access()
    assert event["client"].startswith("[::1]:") and event["backend"].startswith("[::1]:")


async def _run(*argv: str, stdin: bytes = b"", timeout: float = 20) -> subprocess.CompletedProcess:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


async def test_curl_through_proxy_verifies_backend_certificate(routed_proxy, ca_pem):
    port = routed_proxy.ports["main"]
    result = await _run("curl", "-sS", "--max-time", "10", "--cacert", str(ca_pem),
                        "--resolve", f"www.example.test:{port}:127.0.0.1", f"https://www.example.test:{port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "backend=wild alpn=http/1.1"
    (event,) = await routed_proxy.access()
    assert "h2" in event["alpn"] and event["route"] == "*.example.test"


async def test_openssl_s_client_through_proxy(routed_proxy, ca_pem):
    port = routed_proxy.ports["main"]
    result = await _run("openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "app.example.test",
                        "-verify_hostname", "app.example.test", "-CAfile", str(ca_pem), "-verify_return_error",
                        "-alpn", "http/1.1", "-quiet", stdin=b"WHO\nQUIT\n")
    assert result.returncode == 0, result.stderr
    assert b"backend=app alpn=http/1.1" in result.stdout


async def test_openssl_sees_alert_112_without_route(routed_proxy, ca_pem):
    port = routed_proxy.ports["strict"]
    result = await _run("openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "nope.test",
                        "-CAfile", str(ca_pem))
    assert result.returncode != 0
    assert b"unrecognized name" in result.stderr.lower()
