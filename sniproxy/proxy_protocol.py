# HAProxy PROXY protocol v1 (text) and v2 (binary), sans-IO: encode a header for a backend, and read
# one from a trusted load balancer. Invariant: the reader never buffers more than one maximal header
# and returns the bytes that followed it untouched.
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the spec's bound for a v1 line, CRLF included
_V2_MAX_BODY = 2048  # addresses plus TLVs; real balancers send far less
_V2_CMD_LOCAL = 0x20
_V2_CMD_PROXY = 0x21
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21

Endpoint = tuple[str, int]  # (ip literal, port)


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY header; the connection must be closed."""


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    source: Endpoint | None  # None: LOCAL / UNKNOWN — the balancer speaks for itself
    destination: Endpoint | None
    rest: bytes  # what followed the header (the start of the ClientHello)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def encode_v1(source: Endpoint, destination: Endpoint) -> bytes:
    if _family(source[0]) != _family(destination[0]):
        # Mixed families cannot be expressed; v1 has UNKNOWN for that (the backend uses the socket).
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if _family(source[0]) == 4 else "TCP6"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(source: Endpoint, destination: Endpoint) -> bytes:
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        else:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes((_V2_CMD_PROXY, family)) + struct.pack("!H", len(body)) + body


def encode(version: str, source: Endpoint, destination: Endpoint) -> bytes:
    return encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)


class ProxyHeaderReader:
    """feed(data) -> NEED_DATA | ProxyHeader; raises ProxyHeaderError."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> _NeedData | ProxyHeader:
        self._buffer += data
        buf = bytes(self._buffer)
        if buf[:1] == b"P":
            return self._v1(buf)
        if buf[:1] == b"\r":
            return self._v2(buf)
        if buf:
            raise ProxyHeaderError("expected a PROXY protocol header")
        return NEED_DATA

    def _v1(self, buf: bytes) -> _NeedData | ProxyHeader:
        if not b"PROXY "[: len(buf)] == buf[:6]:
            raise ProxyHeaderError("expected a PROXY protocol header")
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) >= _V1_MAX:
                raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
            return NEED_DATA
        if end + 2 > _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        fields = buf[:end].decode("ascii", "replace").split(" ")
        rest = buf[end + 2 :]
        if len(fields) >= 2 and fields[1] == "UNKNOWN":
            return ProxyHeader(None, None, rest)
        if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
            raise ProxyHeaderError(f"malformed PROXY v1 line: {buf[:end]!r}")
        version = 4 if fields[1] == "TCP4" else 6
        try:
            src, dst = ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3])
            sport, dport = int(fields[4]), int(fields[5])
        except ValueError:
            raise ProxyHeaderError(f"malformed PROXY v1 addresses: {buf[:end]!r}") from None
        if src.version != version or dst.version != version or not (
            0 <= sport <= 65535 and 0 <= dport <= 65535
        ):
            raise ProxyHeaderError(f"inconsistent PROXY v1 line: {buf[:end]!r}")
        return ProxyHeader((str(src), sport), (str(dst), dport), rest)

    def _v2(self, buf: bytes) -> _NeedData | ProxyHeader:
        if V2_SIGNATURE[: len(buf)] != buf[:12]:
            raise ProxyHeaderError("expected a PROXY protocol header")
        if len(buf) < 16:
            return NEED_DATA
        command, family = buf[12], buf[13]
        (length,) = struct.unpack("!H", buf[14:16])
        if command >> 4 != 2 or command & 0x0F > 1:
            raise ProxyHeaderError(f"unsupported PROXY v2 version/command 0x{command:02x}")
        if length > _V2_MAX_BODY:
            raise ProxyHeaderError(f"PROXY v2 header of {length} bytes is too large")
        if len(buf) < 16 + length:
            return NEED_DATA
        body, rest = buf[16 : 16 + length], buf[16 + length :]
        if command == _V2_CMD_LOCAL:
            return ProxyHeader(None, None, rest)
        if family == _V2_TCP4 and length >= 12:
            src4, dst4 = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
            sport, dport = struct.unpack("!HH", body[8:12])
            return ProxyHeader((str(src4), sport), (str(dst4), dport), rest)
        if family == _V2_TCP6 and length >= 36:
            src6, dst6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
            sport, dport = struct.unpack("!HH", body[32:36])
            return ProxyHeader((str(src6), sport), (str(dst6), dport), rest)
        if family >> 4 == 0:  # AF_UNSPEC: the balancer does not know; use the connection itself
            return ProxyHeader(None, None, rest)
        raise ProxyHeaderError(f"unsupported PROXY v2 address family 0x{family:02x} ({length} bytes)")
