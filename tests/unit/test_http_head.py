"""RequestHeadReader: tables of good and bad request heads, each fed whole, byte by byte and with
trailing bytes (a body, a pipelined request), the way tests/unit/test_tls.py feeds ClientHellos."""
from __future__ import annotations

import pytest

from sniproxy.http_head import (
    NEED_DATA,
    NeedData,
    RequestHead,
    RequestHeadError,
    RequestHeadErrorReason,
    RequestHeadReader,
    error_response,
)

R = RequestHeadErrorReason
Outcome = NeedData | RequestHead | RequestHeadError


def feed_chunks(chunks: list[bytes], max_size: int = 16384) -> Outcome:
    """Feed chunks in order; the final answer, or the error as a value. Checks the reader's
    promises: bounded buffer, the same error again after an error, the same head after one."""
    reader = RequestHeadReader(max_size)
    result: NeedData | RequestHead = NEED_DATA
    for chunk in chunks:
        try:
            result = reader.feed(chunk)
        except RequestHeadError as exc:
            with pytest.raises(RequestHeadError) as again:
                reader.feed(b"more")
            assert again.value is exc
            assert reader.buffered_size == 0
            return exc
        assert reader.buffered_size <= max_size
        if isinstance(result, RequestHead):
            assert reader.feed(b"GET /next HTTP/1.1\r\n") is result
            assert reader.buffered_size == 0
    return result


def three_ways(data: bytes, max_size: int = 16384) -> list[Outcome]:
    return [feed_chunks([data], max_size),
            feed_chunks([data[i:i + 1] for i in range(len(data))], max_size),
            feed_chunks([data + b"POSTBODY\x00\xff" + b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"],
                        max_size)]


GOOD = [
    ("host", b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n", "GET", "/", "1.1", "app.example.test"),
    ("host_port_case_dot", b"GET /a?b HTTP/1.1\r\nhOsT: App.Example.TEST.:8080\r\n\r\n", "GET", "/a?b", "1.1",
     "app.example.test"),
    ("empty_port", b"GET / HTTP/1.1\r\nHost: a.test:\r\n\r\n", "GET", "/", "1.1", "a.test"),
    ("idna_as_sent", b"GET / HTTP/1.1\r\nHost: xn--bcher-kva.test\r\n\r\n", "GET", "/", "1.1",
     "xn--bcher-kva.test"),
    ("underscore", b"GET / HTTP/1.1\r\nHost: _acme.a.test\r\n\r\n", "GET", "/", "1.1", "_acme.a.test"),
    ("http10_no_host", b"GET / HTTP/1.0\r\n\r\n", "GET", "/", "1.0", None),
    ("http10_host", b"HEAD /x HTTP/1.0\r\nHost: a.test\r\n\r\n", "HEAD", "/x", "1.0", "a.test"),
    ("empty_host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", "GET", "/", "1.1", None),
    ("ipv4_host", b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n", "GET", "/", "1.1", None),
    ("ipv6_host", b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", "GET", "/", "1.1", None),
    ("ipv6_host_no_port", b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", "GET", "/", "1.1", None),
    ("absolute_form_wins", b"GET http://Target.test:81/p HTTP/1.1\r\nHost: a.test\r\n\r\n", "GET",
     "http://Target.test:81/p", "1.1", "target.test"),
    ("absolute_form_userinfo", b"GET https://u:p@t.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", "GET",
     "https://u:p@t.test/", "1.1", "t.test"),
    ("connect_authority", b"CONNECT c.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n", "CONNECT", "c.test:443",
     "1.1", "c.test"),
    ("post_with_body_follows", b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 8\r\n\r\n", "POST",
     "/u", "1.1", "a.test"),
    ("bare_lf", b"GET / HTTP/1.1\nHost: a.test\n\n", "GET", "/", "1.1", "a.test"),
    ("other_headers", b"GET / HTTP/1.1\r\nUser-Agent: curl/8\r\nAccept: */*\r\nHost: a.test\r\nX-Y: z\r\n\r\n",
     "GET", "/", "1.1", "a.test"),
]


@pytest.mark.parametrize("data, method, target, version, host",
                         [pytest.param(*case[1:], id=case[0]) for case in GOOD])
def test_good_head(data: bytes, method: str, target: str, version: str, host: str | None) -> None:
    for result in three_ways(data):
        assert result == RequestHead(method, target, version, host, len(data))


def test_need_data_until_the_last_byte() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    reader = RequestHeadReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i:i + 1]) is NEED_DATA
    assert isinstance(reader.feed(data[-1:]), RequestHead)


BAD = [
    ("not_http_tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", R.MALFORMED),
    ("garbage_line", b"HELLO\r\n\r\n", R.MALFORMED),
    ("http11_no_host", b"GET / HTTP/1.1\r\n\r\n", R.MALFORMED),
    ("two_hosts", b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", R.MALFORMED),
    ("bad_version", b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n", R.MALFORMED),
    ("h2c_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", R.MALFORMED),
    ("space_in_header_name", b"GET / HTTP/1.1\r\nHo st: a.test\r\n\r\n", R.MALFORMED),
    ("host_space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", R.BAD_HOST),
    ("host_non_ascii", b"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.test\r\n\r\n", R.BAD_HOST),
    ("host_port_big", b"GET / HTTP/1.1\r\nHost: a.test:65536\r\n\r\n", R.BAD_HOST),
    ("host_port_name", b"GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n", R.BAD_HOST),
    ("host_two_colons", b"GET / HTTP/1.1\r\nHost: a.test:1:2\r\n\r\n", R.BAD_HOST),
    ("host_v6_unbracketed", b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", R.BAD_HOST),
    ("host_v6_bad", b"GET / HTTP/1.1\r\nHost: [zz::1]:80\r\n\r\n", R.BAD_HOST),
    ("host_v6_unclosed", b"GET / HTTP/1.1\r\nHost: [::1:80\r\n\r\n", R.BAD_HOST),
    ("host_v6_junk_after", b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", R.BAD_HOST),
    ("host_leading_hyphen", b"GET / HTTP/1.1\r\nHost: -a.test\r\n\r\n", R.BAD_HOST),
    ("host_all_digit_tld", b"GET / HTTP/1.1\r\nHost: a.123\r\n\r\n", R.BAD_HOST),
    ("absolute_form_bad_authority", b"GET http://a b/ HTTP/1.1\r\nHost: a.test\r\n\r\n", R.MALFORMED),
    ("too_large_complete", b"GET / HTTP/1.1\r\nHost: a.test\r\nX: " + b"y" * 600 + b"\r\n\r\n", R.TOO_LARGE),
]


@pytest.mark.parametrize("data, reason", [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_head(data: bytes, reason: RequestHeadErrorReason) -> None:
    for result in three_ways(data, max_size=512):
        assert isinstance(result, RequestHeadError), result
        assert result.reason is reason
        assert result.status == 400


def test_every_reason_is_tested() -> None:
    assert {case[2] for case in BAD} == set(RequestHeadErrorReason)


def test_an_endless_head_is_refused_at_the_cap() -> None:
    reader = RequestHeadReader(1024)
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\nX: ") is NEED_DATA
    with pytest.raises(RequestHeadError) as exc:
        for _ in range(100):
            reader.feed(b"z" * 100)
    assert exc.value.reason is R.TOO_LARGE
    assert "1024" in exc.value.detail
    assert reader.buffered_size == 0


def test_max_size_is_inclusive() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    padded = head[:-2] + b"X: " + b"y" * (600 - len(head) - 5) + b"\r\n\r\n"
    assert len(padded) == 600
    assert feed_chunks([padded], 600) == RequestHead("GET", "/", "1.1", "a.test", 600)
    assert isinstance(feed_chunks([padded], 599), RequestHeadError)


def test_error_response_is_a_complete_http_answer() -> None:
    answer = error_response(400, "bad request: a\r\nb")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"HTTP/1.1 400 Bad Request", b"Content-Type: text/plain; charset=utf-8",
                                   b"Content-Length: %d" % len(body), b"Connection: close"]
    assert body == b"bad request: a  b\n"  # no header injection through the message
    assert error_response(503, "x").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert error_response(408, "x").startswith(b"HTTP/1.1 408 Request Timeout\r\n")
