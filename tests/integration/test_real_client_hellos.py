"""Real ClientHellos from Python's ssl, openssl s_client and curl, captured on a loopback listener
that records what arrives and closes, then read by ClientHelloReader."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from sniproxy.tls import NEED_DATA, ClientHello, ClientHelloReader

CLIENT_TIMEOUT = 5.0
# Clients send the hello in one flight and then wait for the server, so a short silence ends it.
IDLE = 0.2


class CaptureServer:
    """Accepts one connection on 127.0.0.1, records its bytes until the client goes quiet, closes."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(CLIENT_TIMEOUT)
        self.port: int = self._listener.getsockname()[1]
        self.received = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            chunks = []
            try:
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
                    conn.settimeout(IDLE)
            except OSError:  # the idle timeout, or a reset: either way the flight is over
                pass
            self.received = b"".join(chunks)

    def wait(self) -> bytes:
        self._thread.join(CLIENT_TIMEOUT + 1)
        assert not self._thread.is_alive(), "capture server never finished"
        return self.received

    def close(self) -> None:
        self._listener.close()
        self._thread.join(CLIENT_TIMEOUT + 1)


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    try:
        yield server
    finally:
        server.close()


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed, so its real ClientHello cannot be captured")
    return path


def python_ssl(port: int, name: str | None, alpn: list[str], **options: object) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    if "maximum_version" in options:
        context.maximum_version = options["maximum_version"]  # type: ignore[assignment]
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=name):
                pass
        except OSError:  # the capture server hangs up instead of answering
            pass


def openssl_s_client(port: int, name: str | None, alpn: list[str], *extra: str) -> None:
    command = [need_binary("openssl"), "s_client", "-connect", f"127.0.0.1:{port}"]
    command += ["-servername", name] if name else ["-noservername"]
    if alpn:
        command += ["-alpn", ",".join(alpn)]
    subprocess.run(
        [*command, *extra],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CLIENT_TIMEOUT + 5,
        check=False,
    )


def curl(port: int, name: str | None, alpn: list[str]) -> None:
    assert name is not None and alpn == ["h2", "http/1.1"], "curl's offer is fixed"
    subprocess.run(
        [
            need_binary("curl"),
            "--silent",
            "--resolve",
            f"{name}:{port}:127.0.0.1",
            f"https://{name}:{port}/",
            "-k",
            "--max-time",
            "3",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CLIENT_TIMEOUT + 5,
        check=False,
    )


Client = Callable[[int, str | None, list[str]], None]

CASES: list[tuple[str, Client, str | None, list[str]]] = [
    ("python_ssl", python_ssl, "python.sni.test", ["h2", "http/1.1"]),
    ("python_ssl_no_sni_no_alpn", python_ssl, None, []),
    (
        "python_ssl_tls12",
        lambda port, name, alpn: python_ssl(port, name, alpn, maximum_version=ssl.TLSVersion.TLSv1_2),
        "tls12.sni.test",
        ["http/1.1"],
    ),
    ("openssl_s_client", openssl_s_client, "openssl.sni.test", ["h2", "http/1.1"]),
    ("openssl_s_client_no_sni", openssl_s_client, None, ["acme-tls/1"]),
    (
        "openssl_s_client_tls12_no_ticket",
        lambda port, name, alpn: openssl_s_client(port, name, alpn, "-tls1_2", "-no_ticket"),
        "under_score.sni.test",
        ["http/1.1"],
    ),
    ("curl", curl, "curl.sni.test", ["h2", "http/1.1"]),
]


@pytest.mark.parametrize(("client", "name", "alpn"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_real_client_hello(capture: CaptureServer, client: Client, name: str | None, alpn: list[str]) -> None:
    client(capture.port, name, alpn)
    data = capture.wait()
    assert data, "the client sent nothing"

    hello = ClientHelloReader().feed(data)
    assert isinstance(hello, ClientHello)
    assert hello.sni == name
    assert hello.alpn == tuple(alpn)
    assert hello.legacy_version == 0x0303
    assert hello.record_bytes == len(data)  # the client waits for the server after its hello

    reader = ClientHelloReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is NEED_DATA
    assert reader.feed(data[-1:]) == hello
