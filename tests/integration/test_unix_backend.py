# Issue 16: a unix-socket backend (a real Python TLS server listening on a socket file) behind a TLS
# route, bytes checked with SHA-256 both ways, with and without a PROXY header (which names the TCP
# client, as for any backend). In every relay mode the unix leg is copied; with splice on, the access
# log says relay=copy and why.
from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sniproxy import proxy_protocol
from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import client_context, pattern_chunks, pattern_digest, server_context

NAME = "unix.example.test"


@dataclass
class UnixTlsBackend:
    """TLS on a unix stream socket, one thread per connection. Optional PROXY header first (read
    exactly, so no TLS byte is consumed with it). Then per connection: a line `UP DOWN SEED`, UP bytes
    hashed, answered with the hex SHA-256 of what arrived and DOWN pattern bytes, then close."""

    path: Path
    context: ssl.SSLContext
    expect_proxy: bool = False
    results: list[dict] = field(default_factory=list)

    def start(self) -> UnixTlsBackend:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(64)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_proxy_header(self, conn: socket.socket) -> proxy_protocol.ProxyHeader:
        reader = proxy_protocol.ProxyHeaderReader()
        first = conn.recv(16, socket.MSG_WAITALL)
        if first.startswith(b"PROXY "):  # v1: up to CRLF, byte by byte
            data = first
            while not data.endswith(b"\r\n"):
                data += conn.recv(1)
        else:  # v2: 16 fixed bytes, then the length they announce
            data = first + conn.recv(int.from_bytes(first[14:16], "big"), socket.MSG_WAITALL)
        header = reader.feed(data)
        assert isinstance(header, proxy_protocol.ProxyHeader) and header.rest == b""
        return header

    def _serve(self, conn: socket.socket) -> None:
        result: dict = {}
        try:
            conn.settimeout(30)
            if self.expect_proxy:
                header = self._read_proxy_header(conn)
                result["source"], result["destination"] = header.source, header.destination
            tls = self.context.wrap_socket(conn, server_side=True)
            spec = b""
            while not spec.endswith(b"\n"):
                spec += tls.recv(1)
            up, down, seed = (int(x) for x in spec.split())
            digest, received = hashlib.sha256(), 0
            while received < up:
                chunk = tls.recv(min(1 << 16, up - received))
                if not chunk:
                    break
                received += len(chunk)
                digest.update(chunk)
            result.update(received=received, sha256=digest.hexdigest())
            tls.sendall(digest.hexdigest().encode() + b"\n")
            for chunk in pattern_chunks(down, seed):
                tls.sendall(chunk)
            tls.close()
        except (OSError, ssl.SSLError, AssertionError) as exc:
            result["error"] = repr(exc)
            conn.close()
        self.results.append(result)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


async def transfer(port: int, ctx: ssl.SSLContext, up: int, down: int, seed: int) -> dict:
    """Through the proxy: TLS to NAME, send the spec and UP bytes, read the backend's digest line
    and DOWN bytes to EOF."""
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname=NAME, limit=1 << 20)
        local = writer.get_extra_info("sockname")
        writer.write(f"{up} {down} {seed}\n".encode())
        for chunk in pattern_chunks(up, seed + 1):
            writer.write(chunk)
            await writer.drain()
        echoed = (await reader.readline()).decode().strip()
        digest, received = hashlib.sha256(), 0
        while chunk := await reader.read(1 << 18):
            received += len(chunk)
            digest.update(chunk)
        writer.close()
        return {"echoed": echoed, "received": received, "sha256": digest.hexdigest(), "local": local}


@pytest.fixture
def unix_backend(ca, tmp_path):
    made: list[UnixTlsBackend] = []

    def make(expect_proxy: bool = False) -> UnixTlsBackend:
        backend = UnixTlsBackend(tmp_path / f"app{len(made)}.sock", server_context(ca, NAME),
                                 expect_proxy=expect_proxy).start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.mark.parametrize("up, down", [(0, 1 << 20), (3 << 20, 5 << 20)])
async def test_unix_backend_byte_exact(unix_backend, start_proxy, ca, relay_mode, up, down):
    backend = unix_backend()
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [(NAME, f"unix:{backend.path}")])
                        + configs.common())
    ctx = client_context(ca)
    got = await asyncio.gather(*(transfer(port, ctx, up, down, seed) for seed in range(4)))
    for seed, result in enumerate(got):
        assert result["echoed"] == pattern_digest(up, seed + 1), f"connection {seed} upstream"
        assert (result["received"], result["sha256"]) == (down, pattern_digest(down, seed))
    assert sorted(r["sha256"] for r in backend.results) == sorted(pattern_digest(up, s + 1) for s in range(4))
    events = await proxy.access(count=4)
    for event in events:
        assert event["outcome"] == "closed"
        assert event["backend"] == f"unix:{backend.path}" and event["backend_host"] is None
        assert event["relay"] == "copy"
        if proxy.expected_relay == "splice":
            assert "unix-socket backend" in event["splice_fallback"]
        else:
            assert "splice_fallback" not in event
        assert event["bytes_down"] > down and event["bytes_up"] > up  # plus the TLS framing


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_unix_backend_with_proxy_protocol(unix_backend, start_proxy, ca, version):
    backend = unix_backend(expect_proxy=True)
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [(NAME, f"unix:{backend.path}", version)])
                        + configs.common())
    result = await transfer(port, client_context(ca), 100_000, 200_000, 7)
    assert result["echoed"] == pattern_digest(100_000, 8)
    assert (result["received"], result["sha256"]) == (200_000, pattern_digest(200_000, 7))
    (served,) = backend.results
    # The PROXY header names the TCP client and the proxy address it connected to.
    assert served["source"] == ("127.0.0.1", result["local"][1])
    assert served["destination"] == ("127.0.0.1", port)
    (event,) = await proxy.access()
    assert event["outcome"] == "closed" and event["backend"] == f"unix:{backend.path}"


async def test_missing_unix_socket_is_connect_failed(start_proxy, ca, tmp_path):
    port = free_port()
    path = tmp_path / "absent.sock"
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [(NAME, f"unix:{path}")])
                        + configs.common())
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        await transfer(port, client_context(ca), 1, 1, 1)
    (event,) = await proxy.access()
    assert event["outcome"] == "connect_failed"
    assert event["reason"] == f"unix:{path}: No such file or directory"
