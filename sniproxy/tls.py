# Owns turning a client's first bytes into a ClientHello (records reassembled, SNI and ALPN read).
# Invariant: sans-IO, stdlib only; feed() gives NEED_DATA, a ClientHello or a ClientHelloError, and
# never buffers more than max_size + 8 bytes: an oversized hello is refused from its 4-byte header.
"""Sans-IO TLS ClientHello reader (RFC 8446 5.1 record layer, RFC 6066 SNI, RFC 7301 ALPN).

Decisions a caller may need to know:

* The first byte decides whether the peer speaks TLS at all: 0x16 is a handshake record, a byte with
  the high bit set is an SSLv2-compatible hello (SSLV2), anything else is NOT_TLS. A non-handshake
  record after the first one, before the hello is complete, is NOT_CLIENT_HELLO.
* Only the record version's major byte is checked (must be 3): RFC 8446 says legacy_record_version
  is to be ignored, and real clients send 0x0301 there.
* A record's payload must be 1..2**14 bytes: the ClientHello is always TLSPlaintext, whose limit is
  2**14 (RFC 8446 5.1); zero-length handshake fragments are forbidden by the same section.
* The ClientHello must end on a record boundary (RFC 8446 5.1: messages that precede a key change
  must align with a record); bytes after it in the same record are BAD_LENGTH. Records after it
  (early data, a second flight) are the proxy's business and are ignored here.
* SNI: exactly one entry, of type host_name (what OpenSSL and BoringSSL accept). The name is ASCII
  LDH labels plus '_' (deployed in the wild), 1..63 bytes per label, at most 253 bytes, no label
  starting or ending with '-'. One trailing dot is stripped and the name is lower-cased. RFC 6066
  forbids IP literals: a name whose last label is all digits (which covers dotted IPv4 and its
  short forms) is rejected; IPv6 literals already fail on ':'. Non-ASCII names are rejected: IDNs
  travel as A-labels ("xn--").
* ALPN: protocol names must be non-empty visible ASCII (0x21..0x7e); RFC 8701 GREASE values
  (0x?A?A) are dropped silently, since clients send them precisely so that servers ignore them.
"""

from __future__ import annotations

import enum
import re
import struct
from typing import Any, ClassVar, NamedTuple

__all__ = [
    "NEED_DATA",
    "AlertDescription",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloErrorReason",
    "ClientHelloReader",
    "NeedData",
    "alert_record",
]

_CONTENT_TYPE_ALERT = 21
_CONTENT_TYPE_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_RECORD_HEADER_SIZE = 5
_HANDSHAKE_HEADER_SIZE = 4
_MAX_PLAINTEXT_RECORD = 2**14
_MAX_SESSION_ID = 32
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_SNI_HOST_NAME = 0
_MAX_HOSTNAME = 253
_DEFAULT_MAX_SIZE = 16384


class AlertDescription(enum.IntEnum):
    UNEXPECTED_MESSAGE = 10
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    ILLEGAL_PARAMETER = 47
    DECODE_ERROR = 50
    PROTOCOL_VERSION = 70
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112
    NO_APPLICATION_PROTOCOL = 120


def alert_record(description: AlertDescription) -> bytes:
    """A fatal alert record, with the 0x0303 record version every TLS 1.2/1.3 client accepts."""
    return bytes((_CONTENT_TYPE_ALERT, 3, 3, 0, 2, 2, AlertDescription(description)))


class ClientHelloErrorReason(enum.Enum):
    NOT_TLS = enum.auto()
    SSLV2 = enum.auto()
    UNSUPPORTED_VERSION = enum.auto()
    NOT_CLIENT_HELLO = enum.auto()
    TRUNCATED = enum.auto()
    BAD_LENGTH = enum.auto()
    TOO_LARGE = enum.auto()
    DUPLICATE_EXTENSION = enum.auto()
    BAD_SNI = enum.auto()
    BAD_ALPN = enum.auto()


_R = ClientHelloErrorReason

# The alert a server would send for each reason; None where the peer does not speak TLS records,
# so an alert would only be more noise on a connection that is about to be closed.
_ALERT_FOR_REASON: dict[ClientHelloErrorReason, AlertDescription | None] = {
    _R.NOT_TLS: None,
    _R.SSLV2: None,
    _R.UNSUPPORTED_VERSION: AlertDescription.PROTOCOL_VERSION,
    _R.NOT_CLIENT_HELLO: AlertDescription.UNEXPECTED_MESSAGE,
    _R.TRUNCATED: AlertDescription.DECODE_ERROR,
    _R.BAD_LENGTH: AlertDescription.DECODE_ERROR,
    _R.TOO_LARGE: AlertDescription.ILLEGAL_PARAMETER,
    _R.DUPLICATE_EXTENSION: AlertDescription.ILLEGAL_PARAMETER,
    _R.BAD_SNI: AlertDescription.DECODE_ERROR,
    _R.BAD_ALPN: AlertDescription.DECODE_ERROR,
}


class ClientHelloError(Exception):
    """The client's first bytes are not an acceptable ClientHello; `reason` says which rule broke."""

    def __init__(self, reason: ClientHelloErrorReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    @property
    def alert(self) -> AlertDescription | None:
        """The alert to answer with, or None when the peer would not understand one."""
        return _ALERT_FOR_REASON[self.reason]

    def __str__(self) -> str:
        return f"{self.reason.name.lower()}: {self.detail}"


class ClientHello(NamedTuple):
    """What routing needs from a ClientHello. Immutable; a NamedTuple rather than a frozen
    dataclass because it is made once per connection (0.4 us against 1.1 us)."""

    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    record_bytes: int


class NeedData:
    """Sentinel type: feed() needs more bytes. Its only instance is NEED_DATA."""

    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        # copy/pickle must hand back the singleton, or `is NEED_DATA` checks would break.
        return "NEED_DATA"


NEED_DATA = NeedData()


# The first 9 bytes of a hello in one record: content type, version major (minor skipped), record
# length; handshake type, its 24-bit length as a high byte and a low 16 bits.
_RECORD_AND_HANDSHAKE_HEAD = struct.Struct(">BBxHBBH").unpack_from


class ClientHelloReader:
    """Feed it the client's bytes as they arrive; it answers once the ClientHello is complete.

    Bytes are consumed as soon as they arrive (partial record payloads included), so every check is
    made at the earliest byte that decides it and the outcome never depends on how reads were split.
    """

    def __init__(self, max_size: int = _DEFAULT_MAX_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self._max_size = max_size
        self._record_header = bytearray()
        self._record_left = 0
        self._records_seen = 0
        self._record_bytes = 0
        self._message = bytearray()
        self._message_size: int | None = None
        self._result: ClientHello | None = None
        self._error: ClientHelloError | None = None

    @property
    def buffered_size(self) -> int:
        return len(self._record_header) + len(self._message)

    def feed(self, data: bytes) -> NeedData | ClientHello:
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise ClientHelloError(self._error.reason, self._error.detail)
        try:
            if not self._records_seen and not self._record_header and type(data) is bytes:
                hello = self._whole(data)
                if hello is not None:
                    self._result = hello
                    return hello
            return self._consume(memoryview(data))
        except ClientHelloError as exc:
            self._error = exc
            self._release()
            raise

    def _whole(self, data: bytes) -> ClientHello | None:
        """The fast path: the first bytes hold one record that is exactly one well-formed ClientHello
        (what every client sends in one segment). None for anything else, including anything
        malformed: the general path then takes the same bytes and says exactly what is wrong."""
        if len(data) < 9:
            return None
        content, major, record, handshake, length_high, length_low = _RECORD_AND_HANDSHAKE_HEAD(data)
        record_end = 5 + record
        length = length_high << 16 | length_low
        if content != _CONTENT_TYPE_HANDSHAKE or major != 3 or handshake != _HANDSHAKE_CLIENT_HELLO \
                or record_end > len(data) or record_end - 9 != length or length > self._max_size \
                or record > _MAX_PLAINTEXT_RECORD:
            return None
        found = _scan_client_hello(data, 9, record_end)
        if found is None:
            return None
        version, sni, alpn = found
        host = _fast_server_name(data, *sni) if sni is not None else None
        if sni is not None and host is None:
            return None
        protocols = _fast_alpn(data, *alpn) if alpn is not None else ()
        if protocols is None:
            return None
        # The host name's rules (labels, IP literals) are checked here as on the general path; a
        # name seen before was valid then (an invalid one raises, and is never remembered).
        if host is not None:
            name = _valid_names.get(host)
            if name is None:
                name = _remember(_valid_names, host, _validate_hostname(host))
        else:
            name = None
        return ClientHello(sni=name, alpn=protocols, legacy_version=version, record_bytes=record_end)

    def _release(self) -> None:
        self._record_header = bytearray()
        self._message = bytearray()

    def _consume(self, data: memoryview) -> NeedData | ClientHello:
        pos = 0
        while pos < len(data):
            if self._record_left == 0:
                take = min(_RECORD_HEADER_SIZE - len(self._record_header), len(data) - pos)
                self._record_header += data[pos : pos + take]
                pos += take
                self._check_record_header()
            else:
                take = min(self._record_left, len(data) - pos, self._message_missing())
                self._message += data[pos : pos + take]
                pos += take
                self._record_left -= take
                if self._message_size is None:
                    self._check_handshake_header()
                if len(self._message) == self._message_size:
                    return self._finish()
        return NEED_DATA

    def _check_record_header(self) -> None:
        header = self._record_header
        first_record = self._records_seen == 0
        if len(header) >= 1 and header[0] != _CONTENT_TYPE_HANDSHAKE:
            if not first_record:
                raise ClientHelloError(
                    _R.NOT_CLIENT_HELLO,
                    f"record of content type {header[0]} before the ClientHello was complete",
                )
            if header[0] & 0x80:
                raise ClientHelloError(_R.SSLV2, f"first byte {header[0]:#04x} starts an SSLv2 hello")
            raise ClientHelloError(_R.NOT_TLS, f"first byte {header[0]:#04x} is not a TLS handshake record")
        if len(header) >= 2 and header[1] != 3:
            raise ClientHelloError(
                _R.UNSUPPORTED_VERSION, f"record version major {header[1]} is not 3 (SSL 3.0/TLS)"
            )
        if len(header) < _RECORD_HEADER_SIZE:
            return
        length = int.from_bytes(header[3:5], "big")
        if not 1 <= length <= _MAX_PLAINTEXT_RECORD:
            raise ClientHelloError(
                _R.BAD_LENGTH, f"record length {length} is outside 1..{_MAX_PLAINTEXT_RECORD}"
            )
        self._record_left = length
        self._records_seen += 1
        self._record_bytes += _RECORD_HEADER_SIZE + length
        self._record_header.clear()

    def _message_missing(self) -> int:
        if self._message_size is None:
            return _HANDSHAKE_HEADER_SIZE - len(self._message)
        return self._message_size - len(self._message)

    def _check_handshake_header(self) -> None:
        message = self._message
        if len(message) >= 1 and message[0] != _HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(
                _R.NOT_CLIENT_HELLO, f"handshake type {message[0]} is not ClientHello (1)"
            )
        if len(message) < _HANDSHAKE_HEADER_SIZE:
            return
        length = int.from_bytes(message[1:4], "big")
        if length > self._max_size:
            raise ClientHelloError(
                _R.TOO_LARGE, f"ClientHello of {length} bytes exceeds the limit of {self._max_size}"
            )
        self._message_size = _HANDSHAKE_HEADER_SIZE + length

    def _finish(self) -> ClientHello:
        if self._record_left:
            raise ClientHelloError(
                _R.BAD_LENGTH,
                f"{self._record_left} bytes follow the ClientHello in its record",
            )
        # A private copy, so no view into the buffer outlives it (a bytearray with views can't grow).
        body = memoryview(bytes(self._message))[_HANDSHAKE_HEADER_SIZE:]
        self._result = _parse_client_hello(body, self._record_bytes)
        self._release()
        return self._result


class _Cursor:
    """Reads big-endian fields from one length-delimited structure; every read is bounds-checked.

    A read past the end raises `short`; bytes left over at `end()` raise `junk`. Extension bodies
    use their own reason for both, so a log line names the extension that was malformed.
    """

    __slots__ = ("_data", "_pos", "_what", "_short", "_junk")

    def __init__(
        self,
        data: memoryview,
        what: str,
        short: ClientHelloErrorReason = _R.TRUNCATED,
        junk: ClientHelloErrorReason = _R.BAD_LENGTH,
    ) -> None:
        self._data = data
        self._pos = 0
        self._what = what
        self._short = short
        self._junk = junk

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, field: str) -> memoryview:
        if n > self.remaining:
            raise ClientHelloError(
                self._short, f"{self._what}: {field} needs {n} bytes, {self.remaining} left"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str, what: str | None = None) -> _Cursor:
        """A cursor over a length-prefixed vector, with this cursor's error reasons."""
        length = self.uint(length_size, f"{field} length")
        if length > self.remaining:
            raise ClientHelloError(
                self._short,
                f"{self._what}: {field} length {length} exceeds the {self.remaining} bytes left",
            )
        return _Cursor(self.take(length, field), what or field, self._short, self._junk)

    def end(self) -> None:
        if self.remaining:
            raise ClientHelloError(self._junk, f"{self._what}: {self.remaining} trailing bytes")


_EXTENSION_HEADER = struct.Struct(">HH").unpack_from


def _scan_client_hello(b: bytes, pos: int, end: int) -> tuple[int, tuple[int, int] | None, tuple[int, int] | None] | None:
    """The fast path's walk over a ClientHello body b[pos:end]: (legacy_version, where the SNI
    extension is, where the ALPN extension is), or None at the first thing that is not plainly well
    formed (the general parser then names it). Indexes the bytes; makes no slice."""
    if end - pos < 38:
        return None
    version = b[pos] << 8 | b[pos + 1]
    p = pos + 34  # legacy_version, random
    session_id = b[p]
    p += 1 + session_id
    if version >> 8 != 3 or session_id > _MAX_SESSION_ID or p + 2 > end:
        return None
    suites = b[p] << 8 | b[p + 1]
    p += 2 + suites
    if suites < 2 or suites & 1 or p + 1 > end:
        return None
    methods = b[p]
    p += 1 + methods
    if methods < 1 or p > end:
        return None
    if p == end:
        return version, None, None
    if p + 2 > end or p + 2 + (b[p] << 8 | b[p + 1]) != end:
        return None
    p += 2
    # The extensions' loop runs ~15-20 times per connection: one struct call per header and a dict
    # store (it was a fifth of all the bytecodes a connection runs); the checks come after it. A
    # repeated type leaves fewer keys than extensions; an overlong one leaves p past the end.
    found: dict[int, int] = {}
    count = 0
    last = end - 4
    while p <= last:
        kind, length = _EXTENSION_HEADER(b, p)
        found[kind] = p
        count += 1
        p += 4 + length
    if p != end or len(found) != count:
        return None
    sni = found.get(_EXT_SERVER_NAME)
    alpn = found.get(_EXT_ALPN)
    return (version, None if sni is None else (sni + 4, sni + 4 + (b[sni + 2] << 8 | b[sni + 3])),
            None if alpn is None else (alpn + 4, alpn + 4 + (b[alpn + 2] << 8 | b[alpn + 3])))


_SERVER_NAME_HEAD = struct.Struct(">HBH").unpack_from  # list length, name type, name length


def _fast_server_name(b: bytes, pos: int, end: int) -> bytes | None:
    """The one host_name of a server_name extension b[pos:end], or None if it is anything else."""
    if end - pos < 5:
        return None
    listed, kind, length = _SERVER_NAME_HEAD(b, pos)
    if listed != end - pos - 2 or kind != _SNI_HOST_NAME or length == 0 or pos + 5 + length != end:
        return None
    return b[pos + 5:end]


_VISIBLE = re.compile(rb"[\x21-\x7e]+")

# The fast path's answers for the host names and ALPN lists it has seen: the same few come with
# almost every connection. Keyed by the exact bytes; emptied when full, so a client that makes
# names up costs at most _MEMO_SIZE entries each (of at most 253 and _MEMO_ALPN_BYTES bytes).
_MEMO_SIZE = 4096
_MEMO_ALPN_BYTES = 64
_valid_names: dict[bytes, str] = {}
_alpn_lists: dict[bytes, tuple[str, ...]] = {}


def _remember(memo: dict, key: bytes, value: Any) -> Any:  # type: ignore[type-arg]
    """value, stored under key; a full memo is emptied first (cheaper than evicting one by one)."""
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = value
    return value


def _fast_alpn(b: bytes, pos: int, end: int) -> tuple[str, ...] | None:
    """The protocol names of an ALPN extension b[pos:end] without GREASE, or None if anything in it
    is not plainly valid."""
    if end - pos > _MEMO_ALPN_BYTES:
        return _scan_alpn(b, pos, end)
    raw = b[pos:end]
    names = _alpn_lists.get(raw)
    if names is None:
        names = _scan_alpn(b, pos, end)
        if names is None:
            return None
        _remember(_alpn_lists, raw, names)
    return names


def _scan_alpn(b: bytes, pos: int, end: int) -> tuple[str, ...] | None:
    if end - pos < 3 or (b[pos] << 8 | b[pos + 1]) != end - pos - 2:
        return None
    p = pos + 2
    names = []
    while p < end:
        length = b[p]
        p += 1
        if length == 0 or p + length > end:
            return None
        name = b[p:p + length]
        p += length
        if length == 2 and name[0] == name[1] and name[0] & 0x0F == 0x0A:
            continue  # GREASE
        if _VISIBLE.fullmatch(name) is None:
            return None
        names.append(name.decode("ascii"))
    return tuple(names)


def _parse_client_hello(body: memoryview, record_bytes: int) -> ClientHello:
    hello = _Cursor(body, "ClientHello")
    legacy_version = hello.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise ClientHelloError(
            _R.UNSUPPORTED_VERSION, f"client_version {legacy_version:#06x} is not SSL 3.0/TLS"
        )
    hello.take(32, "random")
    session_id = hello.vector(1, "legacy_session_id")
    if session_id.remaining > _MAX_SESSION_ID:
        raise ClientHelloError(
            _R.BAD_LENGTH, f"legacy_session_id of {session_id.remaining} bytes exceeds 32"
        )
    cipher_suites = hello.vector(2, "cipher_suites")
    if cipher_suites.remaining < 2 or cipher_suites.remaining % 2:
        raise ClientHelloError(
            _R.BAD_LENGTH, f"cipher_suites length {cipher_suites.remaining} is not even and >= 2"
        )
    if hello.vector(1, "legacy_compression_methods").remaining < 1:
        raise ClientHelloError(_R.BAD_LENGTH, "legacy_compression_methods is empty")
    extensions: dict[int, memoryview] = {}
    # Pre-TLS-1.2 clients may end the hello here; no extensions means no SNI and no ALPN.
    if hello.remaining:
        extensions = _read_extensions(hello.vector(2, "extensions"))
    hello.end()
    sni = None
    if _EXT_SERVER_NAME in extensions:
        sni = _parse_server_name(extensions[_EXT_SERVER_NAME])
    alpn: tuple[str, ...] = ()
    if _EXT_ALPN in extensions:
        alpn = _parse_alpn(extensions[_EXT_ALPN])
    return ClientHello(sni=sni, alpn=alpn, legacy_version=legacy_version, record_bytes=record_bytes)


def _read_extensions(block: _Cursor) -> dict[int, memoryview]:
    # Every connection runs this loop over ~15-20 extensions: it indexes the bytes directly and
    # builds no message unless one is needed (through the cursor's calls it was ~40% of a parse).
    data, pos, end = block._data, block._pos, len(block._data)
    extensions: dict[int, memoryview] = {}
    while pos < end:
        if end - pos >= 4:
            ext_type = data[pos] << 8 | data[pos + 1]
            length = data[pos + 2] << 8 | data[pos + 3]
            if length <= end - pos - 4:
                if ext_type in extensions:
                    raise ClientHelloError(_R.DUPLICATE_EXTENSION, f"extension {ext_type} appears twice")
                extensions[ext_type] = data[pos + 4 : pos + 4 + length]
                pos += 4 + length
                continue
        # Malformed from here: let the cursor raise its usual error.
        block._pos = pos
        ext_type = block.uint(2, "extension type")
        block.take(block.uint(2, f"extension {ext_type} length"), f"extension {ext_type}")
        raise AssertionError("unreachable: the cursor accepted what the fast path refused")
    block._pos = pos
    return extensions


def _parse_server_name(data: memoryview) -> str:
    ext = _Cursor(data, "server_name", short=_R.BAD_SNI, junk=_R.BAD_SNI)
    names = ext.vector(2, "server_name_list")
    ext.end()
    if not names.remaining:
        raise ClientHelloError(_R.BAD_SNI, "server_name_list is empty")
    name_type = names.uint(1, "name_type")
    if name_type != _SNI_HOST_NAME:
        raise ClientHelloError(_R.BAD_SNI, f"name_type {name_type} is not host_name (0)")
    host = bytes(names.take(names.uint(2, "host_name length"), "host_name"))
    # The list was meant to be extensible, but every implementation takes exactly one host_name,
    # and accepting more would let a client route on one name while the backend sees another.
    if names.remaining:
        raise ClientHelloError(_R.BAD_SNI, "server_name_list has more than one entry")
    return _validate_hostname(host)


# One label: letters, digits, '-' and '_', not starting or ending with '-', 1..63 bytes; a name is
# labels joined by dots (one match for the whole name; the per-label one only to say what is wrong).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_HOSTNAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _validate_hostname(raw: bytes) -> str:
    if not raw:
        raise ClientHelloError(_R.BAD_SNI, "host_name is empty")
    if not raw.isascii():
        raise ClientHelloError(_R.BAD_SNI, f"host_name {raw[:80]!r} is not ASCII (IDNs must be A-labels)")
    name = raw.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > _MAX_HOSTNAME:
        raise ClientHelloError(_R.BAD_SNI, f"host_name of {len(name)} bytes exceeds {_MAX_HOSTNAME}")
    if _HOSTNAME.fullmatch(name) is None:
        bad = next((label for label in name.split(".") if not _LABEL.fullmatch(label)), name)
        raise ClientHelloError(_R.BAD_SNI, f"host_name {raw[:80]!r} has an invalid label {bad[:80]!r}")
    if name.rpartition(".")[2].isdigit():
        raise ClientHelloError(_R.BAD_SNI, f"host_name {raw[:80]!r} is an IP literal (RFC 6066 forbids it)")
    return name


def _is_grease(name: bytes) -> bool:
    return len(name) == 2 and name[0] == name[1] and name[0] & 0x0F == 0x0A


def _parse_alpn(data: memoryview) -> tuple[str, ...]:
    ext = _Cursor(data, "application_layer_protocol_negotiation", short=_R.BAD_ALPN, junk=_R.BAD_ALPN)
    names = ext.vector(2, "protocol_name_list")
    ext.end()
    if not names.remaining:
        raise ClientHelloError(_R.BAD_ALPN, "protocol_name_list is empty")
    protocols: list[str] = []
    while names.remaining:
        name = bytes(names.take(names.uint(1, "protocol name length"), "protocol name"))
        if not name:
            raise ClientHelloError(_R.BAD_ALPN, "empty protocol name")
        if _is_grease(name):
            continue
        if not all(0x21 <= byte <= 0x7E for byte in name):
            raise ClientHelloError(_R.BAD_ALPN, f"protocol name {name[:80]!r} is not visible ASCII")
        protocols.append(name.decode("ascii"))
    return tuple(protocols)
