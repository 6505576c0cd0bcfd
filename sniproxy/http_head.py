# Owns turning a plain-HTTP client's first bytes into a RequestHead: the name to route on (Host, or the
# authority of an absolute-form target), parsed by h11. Invariant: sans-IO; feed() gives NEED_DATA, a
# RequestHead or a RequestHeadError, and never buffers more than max_size plus the last feed.
"""Sans-IO HTTP/1.x request head reader, for a `protocol = "http"` listener.

Decisions a caller may need to know:

* h11 parses the request line and the header fields (RFC 9112): anything it refuses is MALFORMED,
  including an HTTP/1.1 request without a Host header or with two of them (RFC 9112 3.2: a server
  MUST answer 400), and any version but 1.0 and 1.1 (h2c's prior-knowledge preface has no Host). An HTTP/1.0 request may come without Host: `host` is then None.
* The routing name is the request-target's authority when the target is in absolute form
  ("GET http://a.test/ HTTP/1.1") or authority form (CONNECT), else the Host header (RFC 9112 3.2.2:
  the target's authority wins over Host). The port is stripped, the name is lower-cased and one
  trailing dot dropped; it is not IDNA-converted: an IDN travels as A-labels ("xn--") as it does in
  SNI, and a name that is not ASCII LDH (plus '_') is BAD_HOST.
* An IP literal (v4, or v6 in brackets) or an empty Host is no name at all (`host` None), exactly
  like a TLS client without SNI: only a table's fallback can serve it.
* The head is everything up to and including the blank line. Its size counts against max_size
  whether it arrives in one read or in many; bytes after it (a body, pipelined requests) are the
  proxy's to forward and are not looked at.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from typing import ClassVar

import h11

from sniproxy.config import is_hostname, normalize_hostname

__all__ = [
    "NEED_DATA",
    "NeedData",
    "RequestHead",
    "RequestHeadError",
    "RequestHeadErrorReason",
    "RequestHeadReader",
    "error_response",
]

_DEFAULT_MAX_SIZE = 16384


class RequestHeadErrorReason(enum.Enum):
    MALFORMED = enum.auto()  # h11 refused the request line or a header field
    TOO_LARGE = enum.auto()  # no end of the head within max_size bytes
    BAD_HOST = enum.auto()  # the Host (or target authority) is not a host name, IP literal or port


class RequestHeadError(Exception):
    """The client's bytes are not an acceptable HTTP/1.x request head; answer 400 and close."""

    status: ClassVar[int] = 400

    def __init__(self, reason: RequestHeadErrorReason, detail: str) -> None:
        super().__init__(f"{reason.name.lower()}: {detail}")
        self.reason = reason
        self.detail = detail


class NeedData:
    """Singleton: the head is not complete yet."""

    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclasses.dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    http_version: str  # "1.0" / "1.1"
    host: str | None  # the routing name (normalised), None when the request names no host
    size: int  # bytes of the head, blank line included


class RequestHeadReader:
    """Feed a client's bytes until the request head is complete."""

    def __init__(self, max_size: int = _DEFAULT_MAX_SIZE) -> None:
        self._max_size = max_size
        # h11 refuses an incomplete head past this many buffered bytes; a complete one that arrived
        # whole is measured below.
        self._conn: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=max_size)
        self._fed = 0
        self._head: RequestHead | None = None
        self._error: RequestHeadError | None = None

    def feed(self, data: bytes) -> NeedData | RequestHead:
        """NEED_DATA until the head is complete, then the RequestHead (again for any later feed: those
        bytes belong to the body or the next request). After an error, the same error again."""
        if self._head is not None:
            return self._head
        if self._error is not None:
            raise self._error
        assert self._conn is not None
        try:
            result = self._feed(self._conn, data)
        except RequestHeadError as exc:
            self._error, self._conn = exc, None  # nothing buffered is kept past the answer
            raise
        if isinstance(result, RequestHead):
            self._head, self._conn = result, None
        return result

    @property
    def buffered_size(self) -> int:
        """Bytes held while the head is incomplete (0 once it is complete or refused)."""
        return len(self._conn.trailing_data[0]) if self._conn is not None else 0

    def _feed(self, conn: h11.Connection, data: bytes) -> NeedData | RequestHead:
        self._fed += len(data)
        conn.receive_data(bytes(data))
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise RequestHeadError(RequestHeadErrorReason.TOO_LARGE,
                                       f"no end of the request head within {self._max_size} bytes") from None
            raise RequestHeadError(RequestHeadErrorReason.MALFORMED, str(exc)) from None
        if event is h11.NEED_DATA:
            return NEED_DATA
        if not isinstance(event, h11.Request):  # h11 gives a server nothing else first
            raise RequestHeadError(RequestHeadErrorReason.MALFORMED, f"unexpected {type(event).__name__}")
        if event.http_version not in (b"1.0", b"1.1"):
            # e.g. h2c's prior-knowledge preface ("PRI * HTTP/2.0"): it carries no Host to route on.
            raise RequestHeadError(RequestHeadErrorReason.MALFORMED,
                                   f"HTTP/{event.http_version.decode('ascii', 'replace')} is not HTTP/1.x")
        size = self._fed - len(conn.trailing_data[0])
        if size > self._max_size:
            raise RequestHeadError(RequestHeadErrorReason.TOO_LARGE,
                                   f"request head is {size} bytes, more than {self._max_size}")
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        authority = _target_authority(method, target)
        if authority is None:
            hosts = [value for name, value in event.headers if name == b"host"]
            authority = hosts[0] if hosts else b""
        return RequestHead(method, target, event.http_version.decode("ascii", "replace"),
                           _routing_name(authority), size)


def _target_authority(method: str, target: str) -> bytes | None:
    """The authority of an absolute-form or authority-form target, else None (origin form: use Host)."""
    if method == "CONNECT":
        return target.encode("ascii", "replace")
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme or not scheme.isascii() or not scheme.isalpha():
        return None
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return authority.rpartition("@")[2].encode("ascii", "replace")


def _routing_name(authority: bytes) -> str | None:
    """Host name from "name[:port]" / "ip[:port]" / "[v6][:port]"; None for no name. BAD_HOST else."""
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise RequestHeadError(RequestHeadErrorReason.BAD_HOST,
                               f"Host {authority!r} is not ASCII (IDNs travel as xn-- labels)") from None
    if text == "":
        return None
    if text.startswith("["):
        close = text.find("]")
        rest = text[close + 1:] if close > 0 else None
        if rest is None or not _port_ok(rest, colon=True):
            raise RequestHeadError(RequestHeadErrorReason.BAD_HOST, f"Host {text!r} is not [IPv6]:port")
        try:
            ipaddress.IPv6Address(text[1:close])
        except ValueError:
            raise RequestHeadError(RequestHeadErrorReason.BAD_HOST,
                                   f"Host {text!r}: not an IPv6 address in brackets") from None
        return None
    name, colon, port = text.rpartition(":")
    if not colon:
        name, port = text, ""
    if not _port_ok(port, colon=False):
        raise RequestHeadError(RequestHeadErrorReason.BAD_HOST, f"Host {text!r} has a bad port")
    try:
        ipaddress.IPv4Address(name)
        return None  # an address, not a name: like a ClientHello without SNI
    except ValueError:
        pass
    name = normalize_hostname(name)
    if not is_hostname(name):
        raise RequestHeadError(RequestHeadErrorReason.BAD_HOST, f"Host {text!r} is not a valid host name")
    return name


def _port_ok(text: str, *, colon: bool) -> bool:
    if colon:
        if text == "":
            return True
        if not text.startswith(":"):
            return False
        text = text[1:]
    # RFC 3986 allows an empty port after the colon ("a.test:").
    return text == "" or (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535)


_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection; `message` is the text/plain body."""
    body = (message.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", "replace")
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body
