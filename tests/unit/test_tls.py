"""ClientHelloReader: tables of good and bad hellos, each fed whole, byte by byte and with trailing
bytes; property tests for arbitrary, chunked, truncated and mutated input."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hello_builder as hb
from hello_builder import EARLY_DATA, build_client_hello, build_handshake, extension, records
from sniproxy.tls import (
    NEED_DATA,
    AlertDescription,
    ClientHello,
    ClientHelloError,
    ClientHelloErrorReason,
    ClientHelloReader,
    NeedData,
    alert_record,
)

R = ClientHelloErrorReason
PROPERTY = settings(max_examples=300, deadline=None)
RECORD_HEADER = 5
HANDSHAKE_HEADER = 4


def buffer_bound(max_size: int = 16384) -> int:
    """The most a reader may hold: a full handshake message and a partial record header."""
    return max_size + HANDSHAKE_HEADER + RECORD_HEADER - 1


Outcome = NeedData | ClientHello | ClientHelloError


def feed_chunks(chunks: list[bytes], max_size: int = 16384) -> Outcome:
    """Feed chunks in order; the final answer, or the error as a value. Checks the reader's
    promises on the way: bounded buffer, same error again after an error, same hello after one."""
    reader = ClientHelloReader(max_size)
    result: NeedData | ClientHello = NEED_DATA
    for chunk in chunks:
        try:
            result = reader.feed(chunk)
        except ClientHelloError as exc:
            with pytest.raises(ClientHelloError) as again:
                reader.feed(b"more")
            assert (again.value.reason, again.value.detail) == (exc.reason, exc.detail)
            assert reader.buffered_size == 0
            return exc
        assert reader.buffered_size <= buffer_bound(max_size)
        if isinstance(result, ClientHello):
            assert reader.feed(b"\x17\x03\x03") is result
            assert reader.buffered_size == 0
    return result


def key(outcome: Outcome) -> object:
    if isinstance(outcome, ClientHelloError):
        return ("error", outcome.reason, outcome.detail)
    return outcome


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def in_pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def read_three_ways(data: bytes, max_size: int = 16384) -> ClientHello:
    """The h11 habit: whole, one byte at a time, and followed by early data; all must agree."""
    whole = feed_chunks([data], max_size)
    assert isinstance(whole, ClientHello), whole
    assert whole.record_bytes == len(data)
    assert key(feed_chunks(bytewise(data), max_size)) == whole
    assert key(feed_chunks([data + EARLY_DATA], max_size)) == whole
    assert key(feed_chunks([b"", data, EARLY_DATA, b""], max_size)) == whole
    return whole


def error_three_ways(data: bytes, max_size: int = 16384) -> ClientHelloError:
    whole = feed_chunks([data], max_size)
    assert isinstance(whole, ClientHelloError), whole
    assert key(feed_chunks(bytewise(data), max_size)) == key(whole)
    assert key(feed_chunks([data + EARLY_DATA], max_size)) == key(whole)
    return whole


# --- good hellos ------------------------------------------------------------------------------

LONGEST_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 bytes
MSG = build_handshake()


def sni_only_hello(name: str | bytes) -> bytes:
    return build_client_hello(sni=None, alpn=None, extra_extensions=[(0, hb.server_name_data(name))])


GOOD = [
    # (id, bytes, sni, alpn, legacy_version)
    ("sni_and_alpn", build_client_hello(), "a.test", ("h2", "http/1.1"), 0x0303),
    ("no_sni", build_client_hello(sni=None), None, ("h2", "http/1.1"), 0x0303),
    ("no_alpn", build_client_hello(alpn=None), "a.test", (), 0x0303),
    (
        "only_sni_extension",
        records(hb.handshake_message(hb.client_hello_body(extensions=extension(0, hb.server_name_data("x.example"))))),
        "x.example",
        (),
        0x0303,
    ),
    ("no_extensions_block", records(hb.handshake_message(hb.client_hello_body(extensions=None))), None, (), 0x0303),
    ("empty_extensions_block", records(hb.handshake_message(hb.client_hello_body(extensions=b""))), None, (), 0x0303),
    ("upper_case_sni", build_client_hello(sni="WWW.Example.COM"), "www.example.com", ("h2", "http/1.1"), 0x0303),
    ("trailing_dot", build_client_hello(sni="example.com."), "example.com", ("h2", "http/1.1"), 0x0303),
    ("underscores", sni_only_hello("_acme-challenge.a_b.example_"), "_acme-challenge.a_b.example_", (), 0x0303),
    ("longest_name", sni_only_hello(LONGEST_NAME), LONGEST_NAME, (), 0x0303),
    ("longest_name_with_dot", sni_only_hello(LONGEST_NAME + "."), LONGEST_NAME, (), 0x0303),
    ("single_label", sni_only_hello("localhost"), "localhost", (), 0x0303),
    ("one_char", sni_only_hello("x"), "x", (), 0x0303),
    ("digits_not_last", sni_only_hello("123.4.example"), "123.4.example", (), 0x0303),
    ("digits_in_tld", sni_only_hello("a.b2"), "a.b2", (), 0x0303),
    ("punycode", sni_only_hello("xn--bcher-kva.example"), "xn--bcher-kva.example", (), 0x0303),
    ("tls10_client_version", build_client_hello(legacy_version=0x0301), "a.test", ("h2", "http/1.1"), 0x0301),
    ("record_version_0303", build_client_hello(record_version=0x0303), "a.test", ("h2", "http/1.1"), 0x0303),
    ("record_version_0300", build_client_hello(record_version=0x0300), "a.test", ("h2", "http/1.1"), 0x0303),
    ("record_version_future_minor", build_client_hello(record_version=0x0309), "a.test", ("h2", "http/1.1"), 0x0303),
    ("empty_session_id", build_client_hello(session_id=b""), "a.test", ("h2", "http/1.1"), 0x0303),
    (
        "grease",
        build_client_hello(alpn=(b"\x0a\x0a", "h2", b"\xfa\xfa"), extra_extensions=[(0x0A0A, b""), (0x1A1A, b"\x00")]),
        "a.test",
        ("h2",),
        0x0303,
    ),
    ("only_grease_alpn", build_client_hello(alpn=(b"\x3a\x3a",)), "a.test", (), 0x0303),
    (
        "many_protocols",
        build_client_hello(alpn=("h3", "h2", "http/1.1", "acme-tls/1", "x" * 255)),
        "a.test",
        ("h3", "h2", "http/1.1", "acme-tls/1", "x" * 255),
        0x0303,
    ),
    ("repeated_protocol", build_client_hello(alpn=("h2", "h2")), "a.test", ("h2", "h2"), 0x0303),
    ("unknown_extensions", build_client_hello(extra_extensions=[(0xFFFF, b"x" * 300), (1234, b"")]), "a.test", ("h2", "http/1.1"), 0x0303),
    ("post_quantum_key_share", build_client_hello(post_quantum=True), "a.test", ("h2", "http/1.1"), 0x0303),
    ("padded_2k", build_client_hello(padding_to=2048, post_quantum=True), "a.test", ("h2", "http/1.1"), 0x0303),
    ("padded_8k", build_client_hello(padding_to=8192, post_quantum=True), "a.test", ("h2", "http/1.1"), 0x0303),
    ("two_records", build_client_hello(record_split=[100]), "a.test", ("h2", "http/1.1"), 0x0303),
    ("seven_records", build_client_hello(record_split=7), "a.test", ("h2", "http/1.1"), 0x0303),
    ("split_in_handshake_header", build_client_hello(record_split=[1, 1, 2]), "a.test", ("h2", "http/1.1"), 0x0303),
    ("one_byte_records", build_client_hello(record_split=len(MSG)), "a.test", ("h2", "http/1.1"), 0x0303),
    ("8k_in_two_records", build_client_hello(padding_to=8192, record_split=[5000]), "a.test", ("h2", "http/1.1"), 0x0303),
    ("2k_in_two_records", build_client_hello(padding_to=2048, record_split=2), "a.test", ("h2", "http/1.1"), 0x0303),
    (
        "max_record_then_rest",
        build_client_hello(padding_to=16384, record_split=[2**14]),
        "a.test",
        ("h2", "http/1.1"),
        0x0303,
    ),
]


@pytest.mark.parametrize(("data", "sni", "alpn", "version"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_hello(data: bytes, sni: str | None, alpn: tuple[str, ...], version: int) -> None:
    hello = read_three_ways(data)
    assert hello == ClientHello(sni=sni, alpn=alpn, legacy_version=version, record_bytes=len(data))


@pytest.mark.parametrize("size", [2048, 8192])
@pytest.mark.parametrize("segment", [1, 7, 100, 1400])
@pytest.mark.parametrize("record_split", [None, 2, [3]])
def test_large_hello_in_segments_and_records(size: int, segment: int, record_split: object) -> None:
    data = build_client_hello(sni="big.example", padding_to=size, post_quantum=True, record_split=record_split)
    hello = feed_chunks(in_pieces(data, segment))
    assert hello == ClientHello("big.example", ("h2", "http/1.1"), 0x0303, len(data))


def test_max_size_is_inclusive() -> None:
    data = build_client_hello(padding_to=2048)
    body_size = 2048 - HANDSHAKE_HEADER
    assert isinstance(read_three_ways(data, max_size=body_size), ClientHello)
    assert error_three_ways(data, max_size=body_size - 1).reason is R.TOO_LARGE


def test_hello_larger_than_one_record_with_raised_limit() -> None:
    data = build_client_hello(padding_to=20000, record_split=[2**14])
    assert read_three_ways(data, max_size=32768).sni == "a.test"
    assert error_three_ways(data).reason is R.TOO_LARGE


def test_need_data_until_the_last_byte() -> None:
    data = build_client_hello(record_split=3)
    reader = ClientHelloReader()
    assert reader.feed(b"") is NEED_DATA
    assert reader.buffered_size == 0
    for i, byte in enumerate(bytewise(data[:-1])):
        assert reader.feed(byte) is NEED_DATA, i
    hello = reader.feed(data[-1:])
    assert isinstance(hello, ClientHello)
    assert reader.feed(b"") is hello
    assert reader.feed(b"anything at all") is hello


def test_buffer_holds_only_the_handshake_message() -> None:
    data = build_client_hello(padding_to=8192, record_split=4)
    reader = ClientHelloReader()
    reader.feed(data[:-1])
    # Record headers are not kept: only the message (all but its last byte) is buffered.
    assert reader.buffered_size == 8192 - 1


def test_too_large_is_rejected_from_the_header_alone() -> None:
    header = records(b"\x01" + hb.u24(16385) + bytes(20))[: RECORD_HEADER + HANDSHAKE_HEADER]
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloError) as exc:
        reader.feed(header)
    assert exc.value.reason is R.TOO_LARGE
    assert reader.buffered_size == 0


def test_huge_input_in_one_call_is_not_retained() -> None:
    data = build_client_hello() + bytes(10_000_000)
    reader = ClientHelloReader()
    hello = reader.feed(data)
    assert isinstance(hello, ClientHello)
    assert reader.buffered_size == 0


# --- bad hellos -------------------------------------------------------------------------------


def body(**overrides: object) -> bytes:
    return hb.client_hello_body(**overrides)  # type: ignore[arg-type]


def hello_with_body(raw_body: bytes) -> bytes:
    return records(hb.handshake_message(raw_body))


def hello_with_sni_data(data: bytes) -> bytes:
    return build_client_hello(sni=None, extra_extensions=[(0, data)])


def hello_with_alpn_data(data: bytes) -> bytes:
    return build_client_hello(alpn=None, extra_extensions=[(16, data)])


def sni_entry(name: bytes, name_type: int = 0) -> bytes:
    return hb.u8(name_type) + hb.vec16(name)


FIXED = hb.u16(0x0303) + bytes(32)  # legacy_version and random
CIPHERS = hb.vec16(hb.u16(0x1301))
COMPRESSION = hb.vec8(b"\x00")

BAD = [
    # (id, bytes, reason)
    ("http", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", R.NOT_TLS),
    ("nul_byte", b"\x00", R.NOT_TLS),
    ("ssh", b"SSH-2.0-OpenSSH_9.2\r\n", R.NOT_TLS),
    ("application_data_first", records(b"hello", content_type=23), R.NOT_TLS),
    ("alert_first", alert_record(AlertDescription.HANDSHAKE_FAILURE), R.NOT_TLS),
    ("change_cipher_spec_first", records(b"\x01", content_type=20), R.NOT_TLS),
    ("sslv2_hello", bytes.fromhex("802e0103010015000000100100800700c0") + bytes(16), R.SSLV2),
    ("high_bit", b"\xff", R.SSLV2),
    ("record_major_2", b"\x16\x02\x00\x00\x10", R.UNSUPPORTED_VERSION),
    ("record_major_4", b"\x16\x04", R.UNSUPPORTED_VERSION),
    ("second_record_major_2", records(MSG[:10]) + records(MSG[10:], version=0x0201), R.UNSUPPORTED_VERSION),
    ("client_version_major_2", hello_with_body(body(legacy_version=0x0200)), R.UNSUPPORTED_VERSION),
    ("client_version_draft", hello_with_body(body(legacy_version=0x7F1C)), R.UNSUPPORTED_VERSION),
    ("server_hello", records(hb.handshake_message(body(), msg_type=2)), R.NOT_CLIENT_HELLO),
    ("hello_request", records(hb.handshake_message(b"", msg_type=0)), R.NOT_CLIENT_HELLO),
    ("ccs_interleaved", records(MSG[:50]) + records(b"\x01", content_type=20) + records(MSG[50:]), R.NOT_CLIENT_HELLO),
    ("alert_interleaved", records(MSG[:3]) + alert_record(AlertDescription.INTERNAL_ERROR), R.NOT_CLIENT_HELLO),
    ("app_data_interleaved", records(MSG[:50]) + records(b"x", content_type=23), R.NOT_CLIENT_HELLO),
    ("sslv2_byte_interleaved", records(MSG[:50]) + b"\x80", R.NOT_CLIENT_HELLO),
    ("empty_body", hello_with_body(b""), R.TRUNCATED),
    ("body_cut_in_random", hello_with_body(FIXED[:20]), R.TRUNCATED),
    ("session_id_past_end", hello_with_body(FIXED + b"\x20" + bytes(5)), R.TRUNCATED),
    ("cipher_suites_past_end", hello_with_body(FIXED + b"\x00" + hb.u16(100) + bytes(10)), R.TRUNCATED),
    ("cipher_suites_length_cut", hello_with_body(FIXED + b"\x00\x00"), R.TRUNCATED),
    ("compression_past_end", hello_with_body(FIXED + b"\x00" + CIPHERS + b"\x05\x00"), R.TRUNCATED),
    ("no_compression_field", hello_with_body(FIXED + b"\x00" + CIPHERS), R.TRUNCATED),
    ("extensions_length_cut", hello_with_body(FIXED + b"\x00" + CIPHERS + COMPRESSION + b"\x00"), R.TRUNCATED),
    (
        "extensions_past_end",
        hello_with_body(FIXED + b"\x00" + CIPHERS + COMPRESSION + hb.u16(50) + extension(0xFF, b"")),
        R.TRUNCATED,
    ),
    ("extension_data_past_end", hello_with_body(body(extensions=hb.u16(0xFF) + hb.u16(10) + b"abc")), R.TRUNCATED),
    ("extension_header_cut", hello_with_body(body(extensions=b"\x00\x00\x00")), R.TRUNCATED),
    ("zero_length_record", b"\x16\x03\x01\x00\x00", R.BAD_LENGTH),
    ("record_over_2_14", b"\x16\x03\x01" + hb.u16(2**14 + 1), R.BAD_LENGTH),
    ("record_ffff", b"\x16\x03\x01\xff\xff", R.BAD_LENGTH),
    ("zero_length_second_record", records(MSG[:10]) + b"\x16\x03\x01\x00\x00", R.BAD_LENGTH),
    ("session_id_33", hello_with_body(body(session_id=bytes(33))), R.BAD_LENGTH),
    ("odd_cipher_suites", hello_with_body(body(cipher_suites=b"\x13\x01\x13")), R.BAD_LENGTH),
    ("no_cipher_suites", hello_with_body(body(cipher_suites=b"")), R.BAD_LENGTH),
    ("no_compression_methods", hello_with_body(body(compression_methods=b"")), R.BAD_LENGTH),
    ("junk_after_extensions", hello_with_body(body(extensions=b"") + b"\x00"), R.BAD_LENGTH),
    ("junk_after_extension_block", hello_with_body(body(extensions=extension(0xFF, b"")) + b"junk"), R.BAD_LENGTH),
    ("bytes_after_hello_in_its_record", records(MSG + b"\x16"), R.BAD_LENGTH),
    ("hello_shorter_than_its_record", records(MSG + bytes(100)), R.BAD_LENGTH),
    ("length_ffffff", records(b"\x01\xff\xff\xff"), R.TOO_LARGE),
    ("length_16385", records(b"\x01" + hb.u24(16385)), R.TOO_LARGE),
    ("length_over_max_split_header", records(b"\x01\x01\x00\x00", split=[1, 1, 1, 1]), R.TOO_LARGE),
    ("two_server_names", build_client_hello(extra_extensions=[(0, hb.server_name_data("b.test"))]), R.DUPLICATE_EXTENSION),
    ("two_alpns", build_client_hello(extra_extensions=[(16, hb.alpn_data(["h2"]))]), R.DUPLICATE_EXTENSION),
    ("two_unknown", build_client_hello(extra_extensions=[(0x1234, b""), (0x1234, b"x")]), R.DUPLICATE_EXTENSION),
    ("two_grease_same_type", build_client_hello(extra_extensions=[(0x0A0A, b""), (0x0A0A, b"")]), R.DUPLICATE_EXTENSION),
    ("sni_empty_extension", hello_with_sni_data(b""), R.BAD_SNI),
    ("sni_empty_list", hello_with_sni_data(hb.vec16(b"")), R.BAD_SNI),
    ("sni_list_past_extension", hello_with_sni_data(hb.u16(30) + sni_entry(b"a.test")), R.BAD_SNI),
    ("sni_junk_after_list", hello_with_sni_data(hb.vec16(sni_entry(b"a.test")) + b"\x00"), R.BAD_SNI),
    ("sni_name_past_list", hello_with_sni_data(hb.vec16(b"\x00" + hb.u16(40) + b"a.test")), R.BAD_SNI),
    ("sni_name_length_cut", hello_with_sni_data(hb.vec16(b"\x00\x00")), R.BAD_SNI),
    ("sni_name_type_1", hello_with_sni_data(hb.vec16(sni_entry(b"a.test", name_type=1))), R.BAD_SNI),
    ("sni_two_host_names", hello_with_sni_data(hb.server_name_data("a.test", "b.test")), R.BAD_SNI),
    ("sni_host_name_then_other", hello_with_sni_data(hb.vec16(sni_entry(b"a.test") + sni_entry(b"x", 1))), R.BAD_SNI),
    ("sni_empty_name", sni_only_hello(b""), R.BAD_SNI),
    ("sni_nul", sni_only_hello(b"a.test\x00.evil"), R.BAD_SNI),
    ("sni_space", sni_only_hello(b"a test"), R.BAD_SNI),
    ("sni_utf8", sni_only_hello("bücher.example".encode()), R.BAD_SNI),
    ("sni_latin1", sni_only_hello(b"b\xfccher.example"), R.BAD_SNI),
    ("sni_ipv4", sni_only_hello(b"127.0.0.1"), R.BAD_SNI),
    ("sni_ipv4_trailing_dot", sni_only_hello(b"10.0.0.1."), R.BAD_SNI),
    ("sni_ipv4_short_form", sni_only_hello(b"10.1"), R.BAD_SNI),
    ("sni_number", sni_only_hello(b"2130706433"), R.BAD_SNI),
    ("sni_ipv6", sni_only_hello(b"::1"), R.BAD_SNI),
    ("sni_ipv6_bracketed", sni_only_hello(b"[2001:db8::1]"), R.BAD_SNI),
    ("sni_254_bytes", sni_only_hello(LONGEST_NAME + "e"), R.BAD_SNI),
    ("sni_label_64", sni_only_hello("a" * 64 + ".test"), R.BAD_SNI),
    ("sni_leading_hyphen", sni_only_hello("-a.test"), R.BAD_SNI),
    ("sni_trailing_hyphen", sni_only_hello("a-.test"), R.BAD_SNI),
    ("sni_empty_label", sni_only_hello("a..test"), R.BAD_SNI),
    ("sni_leading_dot", sni_only_hello(".a.test"), R.BAD_SNI),
    ("sni_only_dot", sni_only_hello("."), R.BAD_SNI),
    ("sni_two_trailing_dots", sni_only_hello("a.test.."), R.BAD_SNI),
    ("sni_with_port", sni_only_hello("a.test:443"), R.BAD_SNI),
    ("sni_with_slash", sni_only_hello("a.test/x"), R.BAD_SNI),
    ("sni_wildcard", sni_only_hello("*.a.test"), R.BAD_SNI),
    ("alpn_empty_extension", hello_with_alpn_data(b""), R.BAD_ALPN),
    ("alpn_empty_list", hello_with_alpn_data(hb.vec16(b"")), R.BAD_ALPN),
    ("alpn_empty_name", hello_with_alpn_data(hb.vec16(b"\x02h2\x00")), R.BAD_ALPN),
    ("alpn_name_past_list", hello_with_alpn_data(hb.vec16(b"\x09h2")), R.BAD_ALPN),
    ("alpn_list_past_extension", hello_with_alpn_data(hb.u16(20) + b"\x02h2"), R.BAD_ALPN),
    ("alpn_junk_after_list", hello_with_alpn_data(hb.alpn_data(["h2"]) + b"\x00"), R.BAD_ALPN),
    ("alpn_nul", hello_with_alpn_data(hb.alpn_data([b"h2\x00"])), R.BAD_ALPN),
    ("alpn_space", hello_with_alpn_data(hb.alpn_data([b"http 1.1"])), R.BAD_ALPN),
    ("alpn_non_ascii", hello_with_alpn_data(hb.alpn_data(["h2", "é".encode()])), R.BAD_ALPN),
    ("alpn_not_quite_grease", hello_with_alpn_data(hb.alpn_data([b"\x0a\x1a"])), R.BAD_ALPN),
]


@pytest.mark.parametrize(("data", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_hello(data: bytes, reason: ClientHelloErrorReason) -> None:
    error = error_three_ways(data)
    assert error.reason is reason, str(error)
    assert str(error).startswith(reason.name.lower() + ": ")


def test_every_reason_is_tested() -> None:
    assert {reason for _, _, reason in BAD} == set(ClientHelloErrorReason)


def test_too_large_with_a_small_limit() -> None:
    data = build_client_hello(padding_to=2048)
    assert error_three_ways(data, max_size=512).reason is R.TOO_LARGE


def test_error_detail_names_the_problem() -> None:
    error = feed_chunks([sni_only_hello(b"127.0.0.1")])
    assert isinstance(error, ClientHelloError)
    assert "IP literal" in error.detail and "127.0.0.1" in error.detail


# --- the small API surface --------------------------------------------------------------------


def test_error_str_and_alert_hint() -> None:
    error = ClientHelloError(R.BAD_SNI, "host_name is empty")
    assert str(error) == "bad_sni: host_name is empty"
    assert (error.reason, error.detail) == (R.BAD_SNI, "host_name is empty")
    assert error.alert is AlertDescription.DECODE_ERROR
    assert ClientHelloError(R.NOT_TLS, "x").alert is None
    assert ClientHelloError(R.UNSUPPORTED_VERSION, "x").alert is AlertDescription.PROTOCOL_VERSION
    copied = pickle.loads(pickle.dumps(error))
    assert (copied.reason, copied.detail) == (error.reason, error.detail)


def test_need_data_is_a_singleton() -> None:
    assert NeedData() is NEED_DATA
    assert copy.copy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


def test_alert_record() -> None:
    assert alert_record(AlertDescription.UNRECOGNIZED_NAME) == bytes.fromhex("15030300020270")
    assert alert_record(AlertDescription.HANDSHAKE_FAILURE) == bytes.fromhex("15030300020228")
    values = {a.name: int(a) for a in AlertDescription}
    assert values["INTERNAL_ERROR"] == 80 and values["DECODE_ERROR"] == 50
    assert values["PROTOCOL_VERSION"] == 70


def test_client_hello_is_frozen() -> None:
    hello = feed_chunks([build_client_hello()])
    assert isinstance(hello, ClientHello)
    with pytest.raises(AttributeError):
        hello.sni = "b.test"  # type: ignore[misc]


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ClientHelloReader(max_size=0)


# --- properties -------------------------------------------------------------------------------

label = st.from_regex(r"\A[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?\Z").filter(lambda s: len(s) <= 63)
hostnames = st.lists(label, min_size=1, max_size=5).map(".".join).filter(
    lambda name: not name.rsplit(".", 1)[-1].isdigit()
)
protocols = st.lists(st.sampled_from(["h2", "http/1.1", "h3", "acme-tls/1", "spdy/3.1"]), max_size=4)


@st.composite
def valid_hellos(draw: st.DrawFn) -> tuple[bytes, ClientHello]:
    sni = draw(st.none() | hostnames)
    shown_sni = None if sni is None else draw(st.sampled_from([sni, sni.upper(), sni + "."]))
    alpn = draw(protocols)
    post_quantum = draw(st.booleans())
    padding_to = draw(st.none() | st.integers(2048, 9000))
    msg = build_handshake(shown_sni, alpn, padding_to=padding_to, post_quantum=post_quantum)
    cuts = sorted(draw(st.sets(st.integers(1, len(msg) - 1), max_size=6)))
    split = [b - a for a, b in zip([0, *cuts], [*cuts, len(msg)])]
    data = records(msg, split)
    return data, ClientHello(sni, tuple(alpn), 0x0303, len(data))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def assert_outcome_is_allowed(outcome: Outcome) -> None:
    # feed_chunks lets any exception other than ClientHelloError escape, failing the test.
    assert outcome is NEED_DATA or isinstance(outcome, ClientHello | ClientHelloError)


@PROPERTY
@given(
    data=st.one_of(
        st.binary(max_size=3000),
        st.binary(max_size=3000).map(lambda b: b"\x16\x03" + b),
        st.binary(max_size=3000).map(lambda b: records(hb.handshake_message(b))),
        st.binary(min_size=1, max_size=3000).map(lambda b: records(b"\x01" + hb.u24(len(b)) + b, split=2)),
    ),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_arbitrary_bytes_only_raise_client_hello_error(data: bytes, cuts: list[int]) -> None:
    assert_outcome_is_allowed(feed_chunks(chunked(data, cuts)))


@PROPERTY
@given(hello=valid_hellos(), cuts=st.lists(st.integers(0, 20000), max_size=20))
def test_any_chunking_gives_the_same_hello(hello: tuple[bytes, ClientHello], cuts: list[int]) -> None:
    data, expected = hello
    assert feed_chunks([data]) == expected
    assert feed_chunks(chunked(data, cuts)) == expected
    assert feed_chunks(chunked(data + EARLY_DATA, cuts)) == expected


@PROPERTY
@given(hello=valid_hellos(), cut=st.integers(0, 20000), cuts=st.lists(st.integers(0, 20000), max_size=10))
def test_truncated_hello_needs_data(hello: tuple[bytes, ClientHello], cut: int, cuts: list[int]) -> None:
    data, _ = hello
    prefix = data[: cut % len(data)]
    assert feed_chunks([prefix]) is NEED_DATA
    assert feed_chunks(chunked(prefix, cuts)) is NEED_DATA


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_hellos())[0])
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x16, 0x20, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
        if not data:
            data = bytearray(b"\x16")
    return bytes(data)


@PROPERTY
@given(data=mutated_hellos(), cuts=st.lists(st.integers(0, 20000), max_size=10))
def test_mutated_hello_gives_a_result_or_client_hello_error(data: bytes, cuts: list[int]) -> None:
    whole = feed_chunks([data])
    assert_outcome_is_allowed(whole)
    assert key(feed_chunks(chunked(data, cuts))) == key(whole)


def test_fast_path_memos_stay_bounded_and_never_remember_a_bad_name() -> None:
    """The fast path remembers valid host names and ALPN lists (the same few come with most
    connections); made-up ones must not grow memory past the bound, and an invalid name must be
    refused every time, not only the first."""
    from sniproxy import tls

    for i in range(tls._MEMO_SIZE + 50):
        hello = build_client_hello(sni=f"n{i}.test", alpn=(f"p{i}",))
        assert read_three_ways(hello) == ClientHello(f"n{i}.test", (f"p{i}",), 0x0303, len(hello))
        assert len(tls._valid_names) <= tls._MEMO_SIZE and len(tls._alpn_lists) <= tls._MEMO_SIZE
    bad = build_client_hello(sni=b"bad_-.test")
    for _ in range(2):
        assert error_three_ways(bad).reason is R.BAD_SNI
    assert b"bad_-.test" not in tls._valid_names
    # A list longer than the memo's key limit is read, not remembered.
    long = tuple(f"proto-{i:02d}" for i in range(8))
    hello = build_client_hello(alpn=long)
    assert read_three_ways(hello).alpn == long
    assert not any(len(raw) > tls._MEMO_ALPN_BYTES for raw in tls._alpn_lists)
