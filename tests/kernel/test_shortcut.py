# The local-backend short-circuit ([ebpf] shortcut_cgroup) at the relay level, on the real kernel: a
# backend listening in a throwaway cgroup, the relay in copy and in splice mode, the kernel sending
# the backend's replies straight to the client socket. Each pitfall of the design has a test: order,
# half-close both ways, resets both ways, a non-blocking backend facing a slow client, sendfile, a full
# map, and a socket the proxy did not open (never captured, shown from the map contents). Cleanup
# (nothing attached, nothing pinned, no cgroup left) is checked by the fixtures themselves.
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from sniproxy.kernel.loader import DataPlane
from sniproxy.kernel.shortcut import CAPTURED, REFUSED, ShortcutMaps, key_text
from sniproxy.relay import Outcome, Relay
from sniproxy.relay.shortcut import Shortcut

from . import cgroups
from .harness import payload, recv_stream, send_stream, sha


def bpftool_cgroup(path: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", path], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out) if out.strip() else []


@contextlib.contextmanager
def loaded(cgroup: str, pin_dir: str, **sizes: int) -> Iterator[ShortcutMaps]:
    """A ShortcutMaps for the block; afterwards nothing of it may be attached or pinned."""
    maps = ShortcutMaps.load(cgroup, pin_dir, **sizes)
    try:
        assert [p["name"] for p in bpftool_cgroup(cgroup)] == ["shortcut_ops"]
        yield maps
    finally:
        maps.close()
        assert bpftool_cgroup(cgroup) == [], "shortcut_ops still attached after close()"
        for name in ("shortcut_conns", "shortcut_socks", "shortcut_peers", "shortcut_stats"):
            assert not os.path.exists(os.path.join(pin_dir, name)), f"{name} left pinned"


@pytest.fixture(scope="module")
def cgroup() -> Iterator[str]:
    cgroups.sweep_stale()
    with cgroups.temporary("relay") as path:
        yield path


@pytest.fixture(scope="module")
def shortcut_maps(cgroup: str, pin_dir: str) -> Iterator[ShortcutMaps]:
    with loaded(cgroup, pin_dir + "-shortcut") as maps:
        yield maps


@pytest.fixture(params=["copy", "splice"])
def relay(request, dataplane: DataPlane, shortcut_maps: ShortcutMaps, cgroup: str) -> Iterator[Relay]:
    """Client -> backend by copy or by the egress splice (handed off at once); backend -> client by
    the short-circuit. Every test leaves the short-circuit's maps as empty as it found them."""
    relay = Relay() if request.param == "copy" else Relay(dataplane.splice_table, splice_after=0)
    relay.shortcut = Shortcut(shortcut_maps, cgroup)
    yield relay
    assert shortcut_maps.registered() == []
    assert shortcut_maps.captured_keys() == []


def backend_listener(cgroup: str) -> socket.socket:
    """A listening socket owned by `cgroup`: the connections it accepts pass its sock_ops program."""
    with cgroups.inside(cgroup):
        s = socket.create_server(("127.0.0.1", 0), backlog=128)
    s.setblocking(False)
    return s


def client_listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0), backlog=128)
    s.setblocking(False)
    return s


def _blocking_send(sock: socket.socket, data: bytes, shut: bool) -> None:
    view = memoryview(data)
    for i in range(0, len(data), 1 << 20):
        sock.sendall(view[i:i + (1 << 20)])
    if shut:
        sock.shutdown(socket.SHUT_WR)


def _blocking_recv(sock: socket.socket, limit: int | None) -> tuple[int, str]:
    import hashlib

    h, n = hashlib.sha256(), 0
    while limit is None or n < limit:
        data = sock.recv(1 << 20 if limit is None else min(1 << 20, limit - n))
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


async def bsend(sock: socket.socket, data: bytes, shut: bool = True) -> None:
    """Send as a blocking backend does (a thread): the short-circuit serves blocking sockets; a
    non-blocking one stays on loopback (test_nonblocking_backend_stays_on_loopback)."""
    await asyncio.to_thread(_blocking_send, sock, data, shut)


async def brecv(sock: socket.socket, limit: int | None = None) -> tuple[int, str]:
    return await asyncio.to_thread(_blocking_recv, sock, limit)


class Pair:
    def __init__(self, client, backend, task, first, ticket, proxy_port) -> None:  # noqa: ANN001
        self.client, self.backend, self.task, self.first = client, backend, task, first
        self.ticket, self.proxy_port = ticket, proxy_port

    def close(self) -> None:
        self.client.close()
        self.backend.close()


async def open_pair(relay: Relay, cl: socket.socket, bl: socket.socket, hello: bytes = b"HELLO\n",
                    idle_timeout: float = 30.0, before_relay=None) -> Pair:  # noqa: ANN001
    """As the server does it: accept the client, read its hello, bind + register + connect the
    backend socket, start relay.relay() with the ticket."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, cl.getsockname())
    proxy_client, _ = await loop.sock_accept(cl)
    proxy_client.setblocking(False)
    await loop.sock_sendall(client, hello)
    first = b""
    while len(first) < len(hello):
        first += await loop.sock_recv(proxy_client, 65536)
    proxy_backend = socket.socket()
    proxy_backend.setblocking(False)
    ticket = relay.shortcut.prepare(proxy_client, proxy_backend, bl.getsockname())
    assert not isinstance(ticket, str), ticket
    await loop.sock_connect(proxy_backend, bl.getsockname())
    backend, _ = await loop.sock_accept(bl)
    backend.setblocking(True)  # a blocking backend (threads in these tests)
    if before_relay is not None:
        await before_relay(backend)
    task = asyncio.create_task(relay.relay(proxy_client, proxy_backend, first, idle_timeout, ticket=ticket))
    return Pair(client, backend, task, first, ticket, proxy_backend.getsockname()[1])


async def test_download_goes_by_the_shortcut_byte_exact(relay: Relay, cgroup: str,
                                                        shortcut_maps: ShortcutMaps) -> None:
    cl, bl = client_listener(), backend_listener(cgroup)
    before = shortcut_maps.stats()
    pair = await open_pair(relay, cl, bl)
    assert await brecv(pair.backend, len(pair.first)) == (len(pair.first), sha(pair.first))
    reply = payload(1, 64_000_000)
    _, got = await asyncio.gather(bsend(pair.backend, reply), recv_stream(pair.client))
    assert got == (len(reply), sha(reply))
    pair.client.shutdown(socket.SHUT_WR)
    assert await brecv(pair.backend) == (0, sha(b""))
    result = await asyncio.wait_for(pair.task, 10)
    pair.close()
    assert result.outcome is Outcome.CLOSED
    assert result.shortcut and result.shortcut_bytes == len(reply), result
    assert result.bytes_down == len(reply) and result.bytes_up == len(pair.first)
    after = shortcut_maps.stats()
    assert after.captured - before.captured == 1
    # The verdict's own count is at least the bytes (a part resent by a non-blocking backend counts
    # again: ebpf/shortcut.h); the relay's count above is exact.
    assert after.redir_bytes - before.redir_bytes >= len(reply)
    cl.close()
    bl.close()


async def test_capture_happens_before_accept_returns(relay: Relay, cgroup: str,
                                                     shortcut_maps: ShortcutMaps) -> None:
    """The order invariant: the sock_ops program captures the backend's socket when it becomes
    ESTABLISHED, before the backend can accept() it, so no byte of a captured connection can take
    the loopback path ahead of a redirected one. A backend that speaks first (before reading
    anything) still has every byte redirected, none over loopback."""
    cl, bl = client_listener(), backend_listener(cgroup)
    greeting = payload(7, 3_000_000)
    seen_states = []

    async def speak_first(backend: socket.socket) -> None:
        regs = {key_text(k)[1]: c for k, c in shortcut_maps.registered()}
        seen_states.append(next(iter(regs.values())).state if len(regs) == 1 else None)
        asyncio.get_running_loop().create_task(bsend(backend, greeting, shut=False))

    for _ in range(20):
        pair = await open_pair(relay, cl, bl, before_relay=speak_first)
        got = await recv_stream(pair.client, len(greeting))
        assert got == (len(greeting), sha(greeting))
        pair.client.shutdown(socket.SHUT_WR)
        await brecv(pair.backend)
        pair.backend.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(pair.task, 10)
        pair.close()
        assert result.shortcut and result.shortcut_bytes == len(greeting) == result.bytes_down, result
    assert seen_states == [CAPTURED] * 20
    cl.close()
    bl.close()


async def test_half_close_client_first(relay: Relay, cgroup: str) -> None:
    """Request, client FIN (passed to the backend over loopback by the relay), then the reply by the
    short-circuit, then the backend's FIN, which arrives after its last byte."""
    cl, bl = client_listener(), backend_listener(cgroup)
    pair = await open_pair(relay, cl, bl)
    request = payload(3, 2_000_000)
    await send_stream(pair.client, request)  # ends with shutdown(SHUT_WR)
    got = await asyncio.wait_for(brecv(pair.backend), 10)
    assert got == (len(pair.first) + len(request), sha(pair.first + request))
    reply = payload(4, 20_000_000)
    _, got_reply = await asyncio.gather(bsend(pair.backend, reply), recv_stream(pair.client))
    assert got_reply == (len(reply), sha(reply))
    result = await asyncio.wait_for(pair.task, 10)
    pair.close()
    assert result.outcome is Outcome.CLOSED and result.shortcut
    assert (result.bytes_up, result.bytes_down, result.shortcut_bytes) == (got[0], len(reply), len(reply))
    cl.close()
    bl.close()


async def test_half_close_backend_first(relay: Relay, cgroup: str) -> None:
    """The backend replies and sends its FIN; the client then still uploads, and the backend gets it."""
    cl, bl = client_listener(), backend_listener(cgroup)
    pair = await open_pair(relay, cl, bl)
    reply = payload(5, 20_000_000)
    _, got_reply = await asyncio.gather(bsend(pair.backend, reply), recv_stream(pair.client))
    assert got_reply == (len(reply), sha(reply))  # EOF came after the last byte
    upload = payload(6, 5_000_000)
    _, got_up = await asyncio.gather(send_stream(pair.client, upload), brecv(pair.backend))
    assert got_up == (len(pair.first) + len(upload), sha(pair.first + upload))
    result = await asyncio.wait_for(pair.task, 10)
    pair.close()
    assert result.outcome is Outcome.CLOSED and result.shortcut
    assert (result.bytes_down, result.shortcut_bytes) == (len(reply), len(reply))
    cl.close()
    bl.close()


def _abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


async def test_backend_reset_mid_transfer(relay: Relay, cgroup: str) -> None:
    """The backend's RST comes over the loopback connection: the relay ends the client's connection
    (what the backend sent before is delivered) and logs backend_reset; nothing hangs."""
    cl, bl = client_listener(), backend_listener(cgroup)
    pair = await open_pair(relay, cl, bl)
    part = payload(8, 8_000_000)
    _, got = await asyncio.gather(bsend(pair.backend, part, shut=False),
                                  recv_stream(pair.client, len(part)))
    assert got == (len(part), sha(part))
    _abort(pair.backend)
    result = await asyncio.wait_for(pair.task, 10)
    try:  # the copy engine ends it with a FIN after what came before, the splice phase with a RST
        rest = await asyncio.wait_for(recv_stream(pair.client), 10)
        assert rest[0] == 0
    except ConnectionResetError:
        pass
    pair.client.close()
    assert result.outcome is Outcome.BACKEND_RESET and result.shortcut
    assert result.shortcut_bytes == len(part)
    cl.close()
    bl.close()


async def test_client_reset_mid_transfer(relay: Relay, cgroup: str, shortcut_maps: ShortcutMaps) -> None:
    """The client resets while the backend streams: the backend's sends fail (the redirect finds no
    client socket: EACCES; or, once the relay released the connection, the loopback path meets the
    proxy's closed socket: a reset). Never a silent loss: the backend must see an error."""
    cl, bl = client_listener(), backend_listener(cgroup)
    pair = await open_pair(relay, cl, bl)
    loop = asyncio.get_running_loop()
    sent = 0
    error: OSError | None = None

    def stream() -> None:
        nonlocal sent, error
        chunk = payload(9, 1 << 20)
        try:
            while True:
                pair.backend.sendall(chunk)
                sent += len(chunk)
        except OSError as exc:
            error = exc
            pair.backend.close()  # as a server does when a send fails

    streamer = asyncio.create_task(asyncio.to_thread(stream))
    received = 0
    while received < 4_000_000:
        received += len(await loop.sock_recv(pair.client, 1 << 20))
    _abort(pair.client)
    result = await asyncio.wait_for(pair.task, 10)
    await asyncio.wait_for(streamer, 10)
    assert error is not None and error.errno in (errno.EACCES, errno.ECONNRESET, errno.EPIPE), error
    assert result.outcome is Outcome.CLIENT_RESET and result.shortcut
    assert sent >= received
    cl.close()
    bl.close()


async def test_nonblocking_backend_stays_on_loopback(relay: Relay, cgroup: str,
                                                     shortcut_maps: ShortcutMaps) -> None:
    """A non-blocking backend (O_NONBLOCK, as nginx and every event-loop server) is captured but its
    sends are left on the loopback path from the first one: with the redirect, a full client send
    buffer gives it EAGAIN and nothing ever raises EPOLLOUT on its own socket again (nginx stalled
    until its send_timeout: tests/kernel/test_shortcut_nginx.py shows the real server). Every byte
    arrives once, in order, against a slow client; the access log says why, logged once."""
    cl, bl = client_listener(), backend_listener(cgroup)
    before = shortcut_maps.stats()
    with structlog.testing.capture_logs() as logs:
        for round_ in range(2):
            pair = await open_pair(relay, cl, bl)
            pair.backend.setblocking(False)
            pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            loop = asyncio.get_running_loop()
            reply = payload(10 + round_, 24_000_000)

            async def slow_reader() -> tuple[int, str]:
                import hashlib

                h, n = hashlib.sha256(), 0
                while True:
                    data = await loop.sock_recv(pair.client, 256 * 1024)
                    if not data:
                        return n, h.hexdigest()
                    h.update(data)
                    n += len(data)
                    if n < 4_000_000:
                        await asyncio.sleep(0.002)  # slow at first: the send buffers fill

            _, got = await asyncio.wait_for(asyncio.gather(
                send_stream(pair.backend, reply, chunk=1 << 20), slow_reader()), 60)
            assert got == (len(reply), sha(reply))
            pair.client.shutdown(socket.SHUT_WR)
            await recv_stream(pair.backend)
            result = await asyncio.wait_for(pair.task, 10)
            pair.close()
            assert not result.shortcut and result.shortcut_bytes == 0 and result.bytes_down == len(reply)
            assert "non-blocking backend" in result.shortcut_fallback, result
    assert shortcut_maps.stats().fallbacks - before.fallbacks == 2
    assert [e["event"] for e in logs if e["event"].startswith("shortcut_")] == ["shortcut_nonblocking_backend"]
    cl.close()
    bl.close()


async def test_sendfile_backend(relay: Relay, cgroup: str) -> None:
    """A backend that serves a file with sendfile() (MSG_SPLICE_PAGES inside the kernel): the sk_msg
    path carries it, byte-exact."""
    cl, bl = client_listener(), backend_listener(cgroup)
    pair = await open_pair(relay, cl, bl)
    data = payload(11, 48_000_000)
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.write(data)
        f.flush()
        blocking = socket.socket(fileno=os.dup(pair.backend.fileno()))
        blocking.setblocking(True)

        def serve() -> None:
            with open(f.name, "rb") as src:
                blocking.sendfile(src)
            blocking.shutdown(socket.SHUT_WR)
            blocking.close()

        thread = threading.Thread(target=serve)
        thread.start()
        got = await recv_stream(pair.client)
        await asyncio.to_thread(thread.join)
    assert got == (len(data), sha(data))
    pair.client.shutdown(socket.SHUT_WR)
    await brecv(pair.backend)
    result = await asyncio.wait_for(pair.task, 10)
    pair.close()
    assert result.shortcut and result.shortcut_bytes == len(data)
    cl.close()
    bl.close()


async def test_a_socket_the_proxy_did_not_open_is_never_captured(relay: Relay, cgroup: str,
                                                                 shortcut_maps: ShortcutMaps) -> None:
    """Another client of the same backend port, in the same cgroup, is left alone: only the proxy's
    registered 4-tuple is in shortcut_socks (read from the map itself)."""
    cl, bl = client_listener(), backend_listener(cgroup)
    before = shortcut_maps.stats()
    pair = await open_pair(relay, cl, bl)
    loop = asyncio.get_running_loop()
    stranger = socket.socket()
    stranger.setblocking(False)
    await loop.sock_connect(stranger, bl.getsockname())
    stranger_port = stranger.getsockname()[1]
    served, _ = await loop.sock_accept(bl)
    served.setblocking(True)
    captured = [key_text(k) for k in shortcut_maps.captured_keys()]
    backend_end = f"127.0.0.1:{bl.getsockname()[1]}"
    assert captured == [(backend_end, f"127.0.0.1:{pair.proxy_port}")]
    assert all(proxy_end != f"127.0.0.1:{stranger_port}" for _, proxy_end in captured)
    assert shortcut_maps.stats().foreign - before.foreign == 1
    # The stranger's connection works the ordinary way.
    data = payload(12, 2_000_000)
    _, got = await asyncio.gather(bsend(served, data), recv_stream(stranger))
    assert got == (len(data), sha(data))
    for s in (stranger, served):
        s.close()
    pair.client.shutdown(socket.SHUT_WR)
    pair.backend.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(pair.task, 10)
    pair.close()
    cl.close()
    bl.close()


@pytest.mark.parametrize("full", ["shortcut_socks", "shortcut_conns"])
async def test_full_map_leaves_the_connection_on_the_normal_path(full: str, pin_dir: str) -> None:
    """With room for one connection, the second is not short-circuited: its registration (a full
    shortcut_conns) or its capture (a full shortcut_socks) fails, it runs byte-exact over loopback,
    and the failure is logged once however many connections meet it."""
    sizes = {"max_socks": 1, "max_conns": 8} if full == "shortcut_socks" else {"max_conns": 1}
    with cgroups.temporary("full") as cgroup, loaded(cgroup, f"{pin_dir}-full-{full}", **sizes) as maps:
        relay = Relay()
        relay.shortcut = Shortcut(maps, cgroup)
        cl, bl = client_listener(), backend_listener(cgroup)
        with structlog.testing.capture_logs() as logs:
            first = await open_pair(relay, cl, bl)
            others = []
            for _ in range(3):
                if full == "shortcut_conns":
                    others.append(await _open_unregistered(relay, cl, bl))
                else:
                    others.append(await open_pair(relay, cl, bl))
            for i, pair in enumerate([first, *others]):
                reply = payload(20 + i, 3_000_000)
                _, got = await asyncio.wait_for(asyncio.gather(bsend(pair.backend, reply),
                                                               recv_stream(pair.client)), 30)
                assert got == (len(reply), sha(reply))
                pair.client.shutdown(socket.SHUT_WR)
                await brecv(pair.backend)
                result = await asyncio.wait_for(pair.task, 10)
                pair.close()
                assert result.bytes_down == len(reply)
                if pair is first:
                    assert result.shortcut and result.shortcut_bytes == len(reply)
                else:
                    assert not result.shortcut and result.shortcut_bytes == 0
                    if full == "shortcut_socks":
                        assert "shortcut_socks full" in result.shortcut_fallback, result
        kind = "shortcut_capture_failed" if full == "shortcut_socks" else "shortcut_register_failed"
        assert [e["event"] for e in logs if e["event"].startswith("shortcut_")] == [kind]
        assert maps.registered() == [] and maps.captured_keys() == []
        cl.close()
        bl.close()


async def _open_unregistered(relay: Relay, cl: socket.socket, bl: socket.socket) -> Pair:
    """open_pair for a connection whose registration is refused (the server then connects anyway)."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, cl.getsockname())
    proxy_client, _ = await loop.sock_accept(cl)
    proxy_client.setblocking(False)
    await loop.sock_sendall(client, b"HELLO\n")
    first = await loop.sock_recv(proxy_client, 65536)
    proxy_backend = socket.socket()
    proxy_backend.setblocking(False)
    refused = relay.shortcut.prepare(proxy_client, proxy_backend, bl.getsockname())
    assert isinstance(refused, str) and "map full" in refused, refused
    await loop.sock_connect(proxy_backend, bl.getsockname())
    backend, _ = await loop.sock_accept(bl)
    backend.setblocking(True)
    task = asyncio.create_task(relay.relay(proxy_client, proxy_backend, first, 30.0))
    return Pair(client, backend, task, first, None, proxy_backend.getsockname()[1])


def test_open_relay_attaches_at_start_and_detaches_at_stop(pin_dir: str) -> None:
    """Through dataplane.open_relay as the CLI uses it: bpftool shows shortcut_ops on the cgroup (and
    both programs by name) while the relay is open, and nothing once it is closed; a path that is no
    cgroup v2 directory leaves the short-circuit off with the reason logged, and the proxy serves."""
    from sniproxy.config import EbpfConfig
    from sniproxy.dataplane import open_relay

    with cgroups.temporary("dp") as cgroup:
        config = EbpfConfig(splice=False, pin_dir=f"{pin_dir}-dp", shortcut_cgroup=cgroup)
        with structlog.testing.capture_logs() as logs, open_relay(config) as relay:
            assert relay.shortcut is not None
            assert [p["name"] for p in bpftool_cgroup(cgroup)] == ["shortcut_ops"]
            progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                              text=True, check=True).stdout)
            ids = relay.shortcut.maps.prog_ids
            names = {p["id"]: p.get("name") for p in progs}
            assert names[ids["shortcut_ops"]] == "shortcut_ops" and names[ids["shortcut_msg"]] == "shortcut_msg"
        assert bpftool_cgroup(cgroup) == []
        assert not os.path.exists(os.path.join(config.pin_dir, "shortcut_conns"))
        assert [e["enabled"] for e in logs if e["event"] == "shortcut"] == [True]
        assert any(e["event"] == "shortcut_detached" for e in logs)

    with structlog.testing.capture_logs() as logs, \
            open_relay(EbpfConfig(splice=False, pin_dir=f"{pin_dir}-dp2", shortcut_cgroup="/tmp")) as relay:
        assert relay.shortcut is None
    [event] = [e for e in logs if e["event"] == "shortcut"]
    assert event["enabled"] is False and "not in a cgroup v2 hierarchy" in event["reason"]


def test_ctypes_mirrors_match_the_maps(shortcut_maps: ShortcutMaps) -> None:
    """kernel/shortcut.py's structs have the sizes the kernel reports for the maps (ebpf/shortcut.h)."""
    import ctypes as ct

    from sniproxy.kernel.shortcut import ShortcutConn, ShortcutKey, ShortcutStats

    def show(name: str) -> dict:
        return json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned",
                                          os.path.join(shortcut_maps.pin_dir, name)],
                                         capture_output=True, text=True, check=True).stdout)

    conns, socks, stats = show("shortcut_conns"), show("shortcut_socks"), show("shortcut_stats")
    assert (conns["bytes_key"], conns["bytes_value"]) == (ct.sizeof(ShortcutKey), ct.sizeof(ShortcutConn))
    assert (socks["bytes_key"], socks["bytes_value"]) == (ct.sizeof(ShortcutKey), 8)
    assert stats["bytes_value"] == ct.sizeof(ShortcutStats)


async def test_idle_timeout_counts_short_circuited_bytes(relay: Relay, cgroup: str) -> None:
    """Bytes the kernel redirects never pass through the relay, yet they are activity: a download
    that takes longer than the idle timeout, with nothing from the client, is not cut."""
    cl, bl = client_listener(), backend_listener(cgroup)
    pair = await open_pair(relay, cl, bl, idle_timeout=1.0)
    chunk = payload(30, 200_000)

    def trickle() -> None:
        for _ in range(12):  # 3 s in all
            pair.backend.sendall(chunk)
            time.sleep(0.25)
        pair.backend.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(asyncio.to_thread(trickle))
    got = await asyncio.wait_for(recv_stream(pair.client), 15)
    await sender
    assert got[0] == 12 * len(chunk)
    pair.client.shutdown(socket.SHUT_WR)
    result = await asyncio.wait_for(pair.task, 10)
    pair.close()
    assert result.outcome is Outcome.CLOSED and result.shortcut_bytes == 12 * len(chunk), result
    cl.close()
    bl.close()
