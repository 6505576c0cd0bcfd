# Test backends on loopback: a TLS server that tells who it is (so a client can prove which backend it
# reached, besides verifying the certificate name), and a plain TCP data backend that checksums.
from __future__ import annotations

import asyncio
import hashlib
import ssl
from dataclasses import dataclass, field

import trustme


@dataclass
class TlsBackend:
    """Answers `WHO\\n` with `backend=<name> alpn=<proto>\\n`, a GET with an HTTP response, closes on
    `QUIT\\n`, and echoes anything else."""

    name: str
    context: ssl.SSLContext
    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    server: asyncio.base_events.Server | None = field(default=None, repr=False)

    async def start(self) -> TlsBackend:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        ssl_obj = writer.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj else None
        try:
            while line := await reader.readline():
                if line.startswith(b"GET "):
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    body = f"backend={self.name} alpn={alpn}\n".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
                    await writer.drain()
                    break
                if line.strip() == b"QUIT":
                    break
                if line.strip() == b"WHO":
                    writer.write(f"backend={self.name} alpn={alpn}\n".encode())
                else:
                    writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def server_context(ca: trustme.CA, *names: str, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(ctx)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(ca: trustme.CA, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


async def who(host: str, port: int, sni: str, ctx: ssl.SSLContext, timeout: float = 10.0) -> str:
    """TLS-connect through the proxy with `sni`, verify the certificate for `sni`, ask who answered."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni)
        try:
            writer.write(b"WHO\n")
            await writer.drain()
            return (await reader.readline()).decode().strip()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass


def real_client_hello(sni: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight Python's ssl module sends for `sni`: real ClientHello bytes, no socket."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls_record_length(data: bytes) -> int:
    """Length of the leading TLS records that carry a handshake message (for skipping a hello)."""
    return 5 + int.from_bytes(data[3:5], "big")


@dataclass
class DataBackend:
    """Plain TCP backend for bulk tests: skips the ClientHello record, then for each connection reads
    `expect_up` bytes (hashing them) while sending `send_down` pseudo-random bytes, honouring half-close."""

    host: str = "127.0.0.1"
    port: int = 0
    results: list[dict] = field(default_factory=list)
    server: asyncio.base_events.Server | None = field(default=None, repr=False)

    async def start(self) -> DataBackend:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(5)
            await reader.readexactly(int.from_bytes(header[3:5], "big"))
            # The client's first line after its hello: how much to send back, the seed, and whether to
            # wait for the client's FIN before answering (a half-close request/response).
            spec = (await reader.readline()).split()
            down, seed = int(spec[0]), int(spec[1])
            after_eof = len(spec) > 2 and spec[2] == b"after_eof"
            up_hash = hashlib.sha256()
            received = 0

            async def read_all() -> None:
                nonlocal received
                while chunk := await reader.read(1 << 18):
                    received += len(chunk)
                    up_hash.update(chunk)

            async def write_all() -> None:
                for chunk in pattern_chunks(down, seed):
                    writer.write(chunk)
                    await writer.drain()

            if after_eof:
                await read_all()
                await write_all()
            else:
                await asyncio.gather(read_all(), write_all())
            writer.write_eof()
            await writer.drain()
            self.results.append({"received": received, "sha256": up_hash.hexdigest()})
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.results.append({"error": repr(exc)})
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def pattern_chunks(total: int, seed: int, chunk: int = 1 << 18):
    """Deterministic pseudo-random bytes, cheap to generate: a seeded block rotated per chunk."""
    block = hashlib.sha256(str(seed).encode()).digest() * (chunk // 32)
    sent = 0
    i = 0
    while sent < total:
        n = min(chunk, total - sent)
        rot = (i * 7) % len(block)
        data = (block[rot:] + block[:rot])[:n]
        yield data
        sent += n
        i += 1


def pattern_digest(total: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern_chunks(total, seed):
        h.update(chunk)
    return h.hexdigest()


async def data_client(host: str, port: int, sni: str, up: int, down: int, seed: int,
                      after_eof: bool = False, timeout: float = 120.0, pause: float = 0.0) -> dict:
    """Real ClientHello, then `up` pattern bytes and a FIN, while reading the backend's `down` bytes.
    Returns what arrived: byte count and sha256, for comparison with pattern_digest(). `pause` sleeps
    between 256 KiB chunks, to keep a transfer going for a while."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        writer.write(real_client_hello(sni))
        writer.write(f"{down} {seed}{' after_eof' if after_eof else ''}\n".encode())
        down_hash = hashlib.sha256()
        received = 0

        async def send() -> None:
            for chunk in pattern_chunks(up, seed + 1):
                writer.write(chunk)
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
            writer.write_eof()

        async def receive() -> None:
            nonlocal received
            while chunk := await reader.read(1 << 18):
                received += len(chunk)
                down_hash.update(chunk)

        await asyncio.gather(send(), receive())
        writer.close()
        return {"received": received, "sha256": down_hash.hexdigest()}
