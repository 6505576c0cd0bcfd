"""Builds TLS ClientHello bytes for tests, well-formed by default and malformed on request.

`build_client_hello()` gives a realistic TLS 1.3 hello in TLS records; the smaller pieces
(`extension`, `client_hello_body`, `handshake_message`, `records`, ...) build broken ones.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTENT_HANDSHAKE = 22
CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_APPLICATION_DATA = 23

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_SIGNATURE_ALGORITHMS = 13
EXT_ALPN = 16
EXT_PADDING = 21
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51

GROUP_X25519 = 0x001D
GROUP_X25519MLKEM768 = 0x11EC
X25519MLKEM768_SHARE_SIZE = 1216  # ML-KEM-768 encapsulation key (1184) + X25519 share (32)

DEFAULT_CIPHER_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xCCA9)

# What a client might send right after its hello: a TLS 1.3 early-data record and some junk.
EARLY_DATA = bytes([CONTENT_APPLICATION_DATA, 3, 3, 0, 5]) + b"early" + b"\x00\xff trailing"


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def vec8(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def _ascii(value: str | bytes) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


def extension(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def server_name_data(*names: str | bytes, name_type: int = 0) -> bytes:
    """server_name extension data with one entry per name (a valid one has exactly one)."""
    entries = b"".join(u8(name_type) + vec16(_ascii(name)) for name in names)
    return vec16(entries)


def alpn_data(protocols: Sequence[str | bytes]) -> bytes:
    return vec16(b"".join(vec8(_ascii(p)) for p in protocols))


def key_share_data(post_quantum: bool = False) -> bytes:
    shares = b""
    if post_quantum:
        shares += u16(GROUP_X25519MLKEM768) + vec16(bytes(range(256)) * 4 + bytes(192))
    shares += u16(GROUP_X25519) + vec16(bytes(32))
    return vec16(shares)


def client_hello_body(
    *,
    extensions: bytes | None = b"",
    legacy_version: int = 0x0303,
    random: bytes = bytes(range(32)),
    session_id: bytes = bytes(32),
    cipher_suites: Sequence[int] | bytes = DEFAULT_CIPHER_SUITES,
    compression_methods: bytes = b"\x00",
) -> bytes:
    """The ClientHello body; `extensions` is the concatenated extension list, None for no block.
    `cipher_suites` as bytes is used raw, to build odd or empty lists."""
    if not isinstance(cipher_suites, bytes):
        cipher_suites = b"".join(u16(c) for c in cipher_suites)
    body = u16(legacy_version) + random + vec8(session_id)
    body += vec16(cipher_suites) + vec8(compression_methods)
    if extensions is not None:
        body += vec16(extensions)
    return body


def handshake_message(body: bytes, msg_type: int = 1, length: int | None = None) -> bytes:
    return u8(msg_type) + u24(len(body) if length is None else length) + body


def split_evenly(size: int, parts: int) -> list[int]:
    """Fragment sizes cutting `size` bytes into `parts` non-empty pieces (as record_split)."""
    if not 1 <= parts <= size:
        raise ValueError(f"cannot cut {size} bytes into {parts} non-empty pieces")
    return [size // parts + (1 if i < size % parts else 0) for i in range(parts)]


def records(
    payload: bytes,
    split: Sequence[int] | int | None = None,
    content_type: int = CONTENT_HANDSHAKE,
    version: int = 0x0301,
) -> bytes:
    """Wrap `payload` in records: `split` lists fragment sizes (the rest goes in a last record),
    or gives a number of records to cut it into evenly; None means one record."""
    if isinstance(split, int):
        split = split_evenly(len(payload), split)
    sizes = list(split or [])
    if sum(sizes) < len(payload):
        sizes.append(len(payload) - sum(sizes))
    out, pos = b"", 0
    for size in sizes:
        out += u8(content_type) + u16(version) + vec16(payload[pos : pos + size])
        pos += size
    return out


def build_extensions(
    sni: str | bytes | None = "a.test",
    alpn: Sequence[str | bytes] | None = ("h2", "http/1.1"),
    extra_extensions: Sequence[tuple[int, bytes]] = (),
    post_quantum: bool = False,
) -> bytes:
    exts = b""
    if sni is not None:
        exts += extension(EXT_SERVER_NAME, server_name_data(sni))
    if alpn:
        exts += extension(EXT_ALPN, alpn_data(alpn))
    exts += extension(EXT_SUPPORTED_GROUPS, vec16(u16(GROUP_X25519MLKEM768) + u16(GROUP_X25519)))
    exts += extension(EXT_SIGNATURE_ALGORITHMS, vec16(u16(0x0403) + u16(0x0804) + u16(0x0401)))
    exts += extension(EXT_SUPPORTED_VERSIONS, vec8(u16(0x0304) + u16(0x0303)))
    exts += extension(EXT_KEY_SHARE, key_share_data(post_quantum))
    for ext_type, data in extra_extensions:
        exts += extension(ext_type, data)
    return exts


def build_handshake(
    sni: str | bytes | None = "a.test",
    alpn: Sequence[str | bytes] | None = ("h2", "http/1.1"),
    extra_extensions: Sequence[tuple[int, bytes]] = (),
    padding_to: int | None = None,
    *,
    post_quantum: bool = False,
    legacy_version: int = 0x0303,
    session_id: bytes = bytes(32),
) -> bytes:
    """The ClientHello handshake message; `padding_to` pads it to exactly that many bytes."""
    exts = build_extensions(sni, alpn, extra_extensions, post_quantum)

    def message(exts: bytes) -> bytes:
        body = client_hello_body(extensions=exts, legacy_version=legacy_version, session_id=session_id)
        return handshake_message(body)

    msg = message(exts)
    if padding_to is not None:
        pad = padding_to - len(msg) - 4  # the padding extension's own type and length
        if pad < 0:
            raise ValueError(f"hello is already {len(msg)} bytes, cannot pad to {padding_to}")
        msg = message(exts + extension(EXT_PADDING, bytes(pad)))
    return msg


def build_client_hello(
    sni: str | bytes | None = "a.test",
    alpn: Sequence[str | bytes] | None = ("h2", "http/1.1"),
    extra_extensions: Sequence[tuple[int, bytes]] = (),
    padding_to: int | None = None,
    record_split: Sequence[int] | int | None = None,
    *,
    post_quantum: bool = False,
    legacy_version: int = 0x0303,
    record_version: int = 0x0301,
    session_id: bytes = bytes(32),
) -> bytes:
    """A ClientHello in TLS records, as a client's first bytes on the wire.

    padding_to: size of the handshake message (e.g. 2048, 8192) reached with a padding extension.
    record_split: fragment sizes, or a number of records, to spread the handshake over.
    post_quantum: add an X25519MLKEM768 key share (1.2 KB, as Chrome and Firefox send).
    """
    msg = build_handshake(
        sni,
        alpn,
        extra_extensions,
        padding_to,
        post_quantum=post_quantum,
        legacy_version=legacy_version,
        session_id=session_id,
    )
    return records(msg, record_split, version=record_version)
