# PROXY protocol v1/v2: what we encode, the reader parses back; fed whole or a byte at a time; bad
# headers raise ProxyHeaderError and nothing else.
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniproxy.proxy_protocol import (NEED_DATA, ProxyHeader, ProxyHeaderError, ProxyHeaderReader,
                                     V2_SIGNATURE, encode, encode_v1, encode_v2)

ENDPOINTS = [
    (("192.0.2.1", 51000), ("198.51.100.2", 443)),
    (("2001:db8::1", 1), ("2001:db8::2", 65535)),
]


def feed_whole(data: bytes):
    return ProxyHeaderReader().feed(data)


def feed_bytewise(data: bytes):
    reader = ProxyHeaderReader()
    result = NEED_DATA
    for i in range(len(data)):
        result = reader.feed(data[i:i + 1])
        if result is not NEED_DATA:
            # Bytes fed after the header belong to the rest; feed them through the rest field.
            return ProxyHeader(result.source, result.destination, result.rest + data[i + 1:])
    return result


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("src, dst", ENDPOINTS)
@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_round_trip(version, src, dst, feed):
    header = encode(version, src, dst)
    result = feed(header + b"\x16\x03\x01hello")
    assert result == ProxyHeader(src, dst, b"\x16\x03\x01hello")


def test_v1_text_is_the_spec_format():
    assert encode_v1(("192.0.2.1", 5), ("192.0.2.2", 443)) == b"PROXY TCP4 192.0.2.1 192.0.2.2 5 443\r\n"


def test_v1_mixed_families_is_unknown():
    assert encode_v1(("192.0.2.1", 5), ("::1", 443)) == b"PROXY UNKNOWN\r\n"
    assert feed_whole(b"PROXY UNKNOWN\r\nrest") == ProxyHeader(None, None, b"rest")


def test_v2_mixed_families_maps_ipv4():
    result = feed_whole(encode_v2(("192.0.2.1", 5), ("::1", 443)))
    assert result.source == ("::ffff:c000:201", 5)


def test_v2_local_command_carries_no_address():
    header = V2_SIGNATURE + bytes((0x20, 0x00)) + b"\x00\x00"
    assert feed_whole(header + b"x") == ProxyHeader(None, None, b"x")


def test_v2_tlvs_are_skipped():
    body = bytes(4) + bytes(4) + b"\x00\x01\x00\x02" + b"\x04\x00\x01\x00"  # a NOOP TLV
    header = V2_SIGNATURE + bytes((0x21, 0x11)) + len(body).to_bytes(2, "big") + body
    assert feed_whole(header).source == ("0.0.0.0", 1)


def test_incomplete_header_needs_data():
    header = encode_v2(*ENDPOINTS[0])
    assert feed_whole(header[:-1]) is NEED_DATA
    assert feed_whole(b"PROXY TCP4 1.2.3.4") is NEED_DATA


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00",                                   # a ClientHello, no header
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",                       # missing a field
    b"PROXY TCP4 ::1 ::2 1 2\r\n",                             # family mismatch
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",                  # port out of range
    b"PROXY TCP4 " + b"1" * 120,                               # line too long
    V2_SIGNATURE + bytes((0x31, 0x11)) + b"\x00\x0c" + bytes(12),  # version 3
    V2_SIGNATURE + bytes((0x21, 0x11)) + b"\xff\xff",              # absurd length
    V2_SIGNATURE + bytes((0x21, 0x11)) + b"\x00\x04" + bytes(4),   # too short for TCP4
])
def test_bad_headers_raise(data):
    with pytest.raises(ProxyHeaderError):
        feed_whole(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_else(data):
    try:
        feed_whole(data)
    except ProxyHeaderError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["v1", "v2"]), st.sampled_from(ENDPOINTS), st.integers(0, 60))
def test_any_truncation_needs_data_or_is_complete(version, endpoints, cut):
    header = encode(version, *endpoints)
    result = feed_whole(header[:cut])
    if cut < len(header):
        assert result is NEED_DATA
    else:
        assert result.source == endpoints[0]
