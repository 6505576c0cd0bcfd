# No open proxy by default; PROXY protocol towards backends carries the real client address; PROXY
# headers are accepted only from trusted balancers; per-address connection limits.
from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import real_client_hello

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


async def parse_proxy_header(reader: asyncio.StreamReader) -> tuple[str, str, int]:
    """An independent reading of the header (not the proxy's own parser): (version, src ip, src port)."""
    first = await reader.readexactly(1)
    if first == b"P":
        line = first + await reader.readuntil(b"\r\n")
        _, _proto, src, _dst, sport, _dport = line.decode().strip().split(" ")
        return "v1", src, int(sport)
    head = first + await reader.readexactly(15)
    assert head[:12] == V2_SIG and head[12] == 0x21
    body = await reader.readexactly(struct.unpack("!H", head[14:16])[0])
    if head[13] == 0x11:
        return "v2", str(ipaddress.IPv4Address(body[:4])), struct.unpack("!H", body[8:10])[0]
    return "v2", str(ipaddress.IPv6Address(body[:16])), struct.unpack("!H", body[32:34])[0]


@pytest.fixture
async def header_backend():
    """Reads a PROXY header, then the ClientHello record, and answers with what the header said."""
    seen = []

    async def serve(reader, writer):
        try:
            version, ip, port = await parse_proxy_header(reader)
            hello = await reader.readexactly(5)
            await reader.readexactly(int.from_bytes(hello[3:5], "big"))
            seen.append((version, ip, port))
            writer.write(f"{version} {ip} {port}\n".encode())
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    server.seen = seen
    server.port = server.sockets[0].getsockname()[1]
    yield server
    server.close()


async def hello_and_answer(port: int, sni: str, prefix: bytes = b"", host: str = "127.0.0.1") -> tuple[bytes, int]:
    reader, writer = await asyncio.open_connection(host, port)
    local_port = writer.get_extra_info("sockname")[1]
    writer.write(prefix + real_client_hello(sni))
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    return answer, local_port


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_to_backend_carries_the_client_address(header_backend, start_proxy, version):
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [("pp.test", f"127.0.0.1:{header_backend.port}", version)])
                        + configs.common())
    answer, client_port = await hello_and_answer(port, "pp.test")
    assert answer.decode().split() == [version, "127.0.0.1", str(client_port)]
    (event,) = await proxy.access()
    assert event["client"] == f"127.0.0.1:{client_port}" and event["outcome"] == "closed"


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_bytes_up_counts_the_clients_bytes_not_our_proxy_header(header_backend, start_proxy,
                                                                       relay_mode, version):
    """bytes_up is what the client sent; the PROXY header the proxy adds is not (issue 15)."""
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [("pp.test", f"127.0.0.1:{header_backend.port}", version)])
                        + configs.common())
    hello = real_client_hello("pp.test")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(hello)
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(version.encode())
    (event,) = await proxy.access()
    assert event["bytes_up"] == len(hello), (event["bytes_up"], len(hello))
    assert event["bytes_down"] == len(answer)


def dynamic_config(port: int, backend_port: int, dns_address: str, allow) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("*", f"*:{backend_port}", "v1")], allow_private=allow)
            + configs.common(dns_address))


async def test_dynamic_route_to_loopback_is_refused_by_default(header_backend, dns, start_proxy):
    dns.add("inside.test", ["127.0.0.1"])
    port = free_port()
    proxy = start_proxy(dynamic_config(port, header_backend.port, dns.address, allow=False))
    answer, _ = await hello_and_answer(port, "inside.test")
    assert answer == b""
    assert header_backend.seen == []
    (event,) = await proxy.access()
    assert event["outcome"] == "backend_refused" and "127.0.0.1" in event["reason"]


@pytest.mark.parametrize("allow", [True, ["127.0.0.0/8"]])
async def test_dynamic_route_to_loopback_is_allowed_with_the_flag(header_backend, dns, start_proxy, allow):
    dns.add("inside.test", ["127.0.0.1"])
    port = free_port()
    start_proxy(dynamic_config(port, header_backend.port, dns.address, allow=allow))
    answer, client_port = await hello_and_answer(port, "inside.test")
    assert answer.decode().split() == ["v1", "127.0.0.1", str(client_port)]


def accepting_config(port: int, backend_port: int, trusted: str) -> str:
    return (f'[[listener]]\nbind = "127.0.0.1:{port}"\ntable = "default"\n'
            f'accept_proxy_protocol = true\ntrusted = ["{trusted}"]\n\n'
            + configs.table("default", [("pp.test", f"127.0.0.1:{backend_port}", "v2")])
            + configs.common())


@pytest.mark.parametrize("incoming", [
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n",
    V2_SIG + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 443),
])
async def test_proxy_header_from_a_trusted_balancer_names_the_client(header_backend, start_proxy, incoming):
    port = free_port()
    proxy = start_proxy(accepting_config(port, header_backend.port, "127.0.0.0/8"))
    answer, balancer_port = await hello_and_answer(port, "pp.test", prefix=incoming)
    # The backend's v2 header carries the client the balancer named, not the balancer.
    assert answer.decode().split() == ["v2", "203.0.113.7", "40000"]
    (event,) = await proxy.access()
    assert event["client"] == "203.0.113.7:40000" and event["via"] == f"127.0.0.1:{balancer_port}"


async def test_proxy_header_from_an_untrusted_source_is_rejected(header_backend, start_proxy):
    port = free_port()
    proxy = start_proxy(accepting_config(port, header_backend.port, "10.0.0.0/8"))
    answer, _ = await hello_and_answer(port, "pp.test", prefix=b"PROXY TCP4 203.0.113.7 127.0.0.1 1 443\r\n")
    assert answer == b"" and header_backend.seen == []
    (event,) = await proxy.access()
    assert event["outcome"] == "proxy_protocol_untrusted"


async def test_missing_proxy_header_on_an_accepting_listener_is_rejected(header_backend, start_proxy):
    port = free_port()
    proxy = start_proxy(accepting_config(port, header_backend.port, "127.0.0.0/8"))
    answer, _ = await hello_and_answer(port, "pp.test")
    assert answer == b""
    (event,) = await proxy.access()
    assert event["outcome"] == "bad_proxy_header"


async def test_per_address_limit_closes_the_extra_connections(header_backend, start_proxy):
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [("pp.test", f"127.0.0.1:{header_backend.port}", "v1")])
                        + configs.common(limits={"max_connections_per_ip": 3}))
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await asyncio.sleep(0.2)
    extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(5):
        assert await extra_reader.read() == b""
    (event,) = await proxy.until(lambda e: e.get("outcome") == "over_limit_per_ip")
    assert event["client"].startswith("127.0.0.1:")
    for _, writer in held:
        writer.close()
    extra_writer.close()
    await proxy.access(count=4)
    # Once the held ones are gone, the address may connect again.
    answer, _ = await hello_and_answer(port, "pp.test")
    assert answer.startswith(b"v1 127.0.0.1")
