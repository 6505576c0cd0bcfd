# protocol = "http" listeners, end to end with real curl and a real HTTP server behind the real proxy:
# the Host header routes with the same tables as SNI, the request reaches its backend byte for byte,
# and bad input gets an HTTP answer that curl prints (400, 503), never a silent close.
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.http_backend import HttpBackend


@pytest.fixture
def http_backends():
    made = {name: HttpBackend(name) for name in ("a", "b", "fallback")}
    yield made
    for backend in made.values():
        backend.close()


def http_proxy_config(backends: dict[str, HttpBackend], ports: dict[str, int],
                      limits: dict[str, float] | None = None) -> str:
    a, b, fb = backends["a"].port, backends["b"].port, backends["fallback"].port
    return (configs.listener(f"127.0.0.1:{ports['strict']}", "web", protocol="http")
            + configs.listener(f"127.0.0.1:{ports['fb']}", "webfb", protocol="http")
            + configs.table("web", [("a.test", f"127.0.0.1:{a}"), ("*.b.test", f"127.0.0.1:{b}")])
            + configs.table("webfb", [("a.test", f"127.0.0.1:{a}")], fallback=f"127.0.0.1:{fb}")
            + configs.common(limits=limits))


@pytest.fixture
def http_proxy(http_backends, start_proxy):
    ports = {"strict": free_port(), "fb": free_port()}
    proxy = start_proxy(http_proxy_config(http_backends, ports,
                                          {"max_http_head_size": 2048, "http_head_timeout": 1.0}))
    proxy.ports = ports
    return proxy


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) as curl prints them; curl must itself succeed (exit 0)."""
    done = subprocess.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body.removesuffix("\n")


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_curl_host_routes_to_its_backend_byte_exact(http_backends, start_proxy, relay_mode, tmp_path):
    ports = {"strict": free_port(), "fb": free_port()}
    proxy = start_proxy(http_proxy_config(http_backends, ports))
    url = f"http://127.0.0.1:{ports['strict']}/x?y=1"
    # The Host goes to the backend as sent (case, port): the proxy forwards the request untouched.
    assert curl("-H", "Host: A.Test:8080", url) == (200, "backend=a host=A.Test:8080 path=/x?y=1")
    assert curl("-H", "Host: deep.b.test", url) == (200, "backend=b host=deep.b.test path=/x?y=1")

    body = os.urandom(3 << 20)
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    status, answer = curl("-H", "Host: www.b.test", "--data-binary", f"@{path}", url)
    assert (status, answer) == (200, f"backend=b received={len(body)} "
                                     f"sha256={hashlib.sha256(body).hexdigest()}")

    events = proxy.wait_for(lambda e: e.get("event") == "access", count=3)
    assert [(e["protocol"], e["sni"], e["route"], e["outcome"]) for e in events] == [
        ("http", "a.test", "a.test", "closed"),
        ("http", "deep.b.test", "*.b.test", "closed"),
        ("http", "www.b.test", "*.b.test", "closed"),
    ]
    assert all(e["relay"] == proxy.expected_relay for e in events)
    assert events[2]["bytes_up"] > len(body)


def test_absolute_form_target_routes_on_its_authority(http_proxy):
    # RFC 9112 3.2.2: the target's authority wins over Host, so proxy and backend agree on the name.
    status, body = curl("--request-target", "http://a.test/abs", "-H", "Host: nobody.test",
                        f"http://127.0.0.1:{http_proxy.ports['strict']}/")
    assert (status, body) == (200, "backend=a host=nobody.test path=http://a.test/abs")


def test_no_host_gets_400_or_the_fallback(http_proxy, http_backends):
    # HTTP/1.0 may omit Host; with no fallback there is nothing to route on.
    status, body = curl("--http1.0", "-H", "Host:", f"http://127.0.0.1:{http_proxy.ports['strict']}/")
    assert (status, body) == (400, "bad request: no Host name to route on")
    # An IP address is no name either, like a ClientHello without SNI.
    status, body = curl("-H", "Host: 127.0.0.1", f"http://127.0.0.1:{http_proxy.ports['strict']}/")
    assert status == 400
    # A table with a fallback sends both there.
    status, body = curl("--http1.0", "-H", "Host:", f"http://127.0.0.1:{http_proxy.ports['fb']}/n")
    assert (status, body) == (200, "backend=fallback host= path=/n")
    events = http_proxy.wait_for(lambda e: e.get("event") == "access", count=3)
    assert [(e["outcome"], e["route"]) for e in events] == [
        ("no_host", None), ("no_host", None), ("closed", "fallback")]
    assert all(e["state"] in ("routing", "relaying") for e in events)


def test_no_route_gets_503_or_the_fallback(http_proxy):
    status, body = curl("-H", "Host: nobody.test", f"http://127.0.0.1:{http_proxy.ports['strict']}/")
    assert (status, body) == (503, "no route for host nobody.test")
    status, body = curl("-H", "Host: nobody.test", f"http://127.0.0.1:{http_proxy.ports['fb']}/")
    assert (status, body) == (200, "backend=fallback host=nobody.test path=/")
    events = http_proxy.wait_for(lambda e: e.get("event") == "access", count=2)
    assert [(e["outcome"], e["sni"]) for e in events] == [("no_route", "nobody.test"),
                                                          ("closed", "nobody.test")]


def test_head_too_large_gets_400_and_the_proxy_keeps_serving(http_proxy):
    url = f"http://127.0.0.1:{http_proxy.ports['strict']}/"
    status, body = curl("-H", "Host: a.test", "-H", "X-Big: " + "z" * 4000, url)
    assert status == 400
    # Whole in one read, the head is measured; split over reads, h11 stops it at the cap.
    assert body.startswith("bad request: too_large: ") and "2048" in body, body
    # Also when the head never ends (h11's incomplete-head cap): a raw client sends 64 KiB of header.
    answer = raw_request(http_proxy.ports["strict"], b"GET / HTTP/1.1\r\nHost: a.test\r\nX: " + b"z" * 65536)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert b"too_large" in answer
    assert curl("-H", "Host: a.test", url) == (200, "backend=a host=a.test path=/")
    events = http_proxy.wait_for(lambda e: e.get("event") == "access", count=3)
    assert [e["outcome"] for e in events] == ["bad_request", "bad_request", "closed"]


@pytest.mark.parametrize("request_bytes, reason", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40 + b"\r\n\r\n", b"malformed"),  # TLS
    (b"GET / HTTP/1.1\r\n\r\n", b"Missing mandatory Host"),  # HTTP/1.1 must send Host (RFC 9112)
    (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", b"multiple Host"),
    (b"GET / HTTP/1.1\r\nHost: bad name\r\n\r\n", b"bad_host"),
    (b"GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n", b"bad_host"),
])
def test_malformed_request_gets_400(http_proxy, request_bytes, reason):
    # The fallback does not apply: the request itself is refused, like a broken ClientHello.
    answer = raw_request(http_proxy.ports["fb"], request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"Connection: close" in head
    assert reason in body
    (event,) = http_proxy.wait_for(lambda e: e.get("event") == "access")
    assert event["outcome"] == "bad_request" and event["protocol"] == "http"


def test_incomplete_head_gets_408_at_the_deadline(http_proxy):
    started = time.monotonic()
    answer = raw_request(http_proxy.ports["strict"], b"GET / HTTP/1.1\r\nHost: a.test\r\n")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert 0.9 <= time.monotonic() - started < 5
    (event,) = http_proxy.wait_for(lambda e: e.get("event") == "access")
    assert (event["outcome"], event["state"]) == ("head_timeout", "reading_head")
