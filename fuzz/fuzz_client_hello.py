"""Coverage-guided fuzzing (atheris/libFuzzer) of the readers that see untrusted bytes first: the
ClientHello reader, the PROXY header reader and the HTTP request head reader.

    .venv/bin/python fuzz/fuzz_client_hello.py -max_total_time=600 fuzz/corpus   # `make fuzz`

Properties checked on every input: feed() returns NEED_DATA or a result, or raises the reader's own
typed error, nothing else; chunking (chosen by the input's first byte) never changes the outcome; the
ClientHello reader never holds more than its bound. A hang is caught by libFuzzer's -timeout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sniproxy import http_head, proxy_protocol, tls

MAX_SIZE = 4096


def _outcome(reader_factory, error_type, chunks):
    reader = reader_factory()
    result = None
    try:
        for chunk in chunks:
            result = reader.feed(chunk)
            if hasattr(reader, "buffered_size"):
                assert reader.buffered_size <= MAX_SIZE + 64, reader.buffered_size
    except error_type as exc:
        return ("error", getattr(exc, "reason", None))
    if isinstance(result, proxy_protocol.ProxyHeader):
        # `rest` legitimately depends on how much arrived together; compare the addresses.
        return ("header", result.source, result.destination)
    return ("result", result)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 17 + 1
    body = data[1:]
    chunks = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    whole = _outcome(lambda: tls.ClientHelloReader(max_size=MAX_SIZE), tls.ClientHelloError, [body])
    split = _outcome(lambda: tls.ClientHelloReader(max_size=MAX_SIZE), tls.ClientHelloError, chunks)
    assert whole == split, (whole, split)
    whole = _outcome(proxy_protocol.ProxyHeaderReader, proxy_protocol.ProxyHeaderError, [body])
    split = _outcome(proxy_protocol.ProxyHeaderReader, proxy_protocol.ProxyHeaderError, chunks)
    if whole[0] != "result" and split[0] != "result":
        assert whole == split, (whole, split)
    whole = _outcome(lambda: http_head.RequestHeadReader(MAX_SIZE), http_head.RequestHeadError, [body])
    split = _outcome(lambda: http_head.RequestHeadReader(MAX_SIZE), http_head.RequestHeadError, chunks)
    if isinstance(whole[-1], http_head.RequestHead):
        assert whole[-1].size <= MAX_SIZE, whole
    # Past MAX_SIZE a malformed head may be refused as TOO_LARGE before its end arrives in pieces.
    if len(body) <= MAX_SIZE:
        assert whole == split, (whole, split)


def write_seed_corpus(directory: Path) -> None:
    """Real-shaped hellos (built by the test builder) so the fuzzer starts deep inside the parser."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
    import hello_builder

    directory.mkdir(parents=True, exist_ok=True)
    seeds = {
        "plain": hello_builder.build_client_hello(sni="a.test", alpn=("h2", "http/1.1")),
        "nosni": hello_builder.build_client_hello(sni=None),
        "pq2k": hello_builder.build_client_hello(sni="pq.test", padding_to=2048, post_quantum=True),
        "split": hello_builder.build_client_hello(sni="s.test", record_split=3),
        "proxy1": proxy_protocol.encode_v1(("192.0.2.1", 1), ("192.0.2.2", 443)),
        "proxy2": proxy_protocol.encode_v2(("2001:db8::1", 1), ("2001:db8::2", 443)),
        "http": b"GET /x HTTP/1.1\r\nHost: a.test:80\r\nUser-Agent: t\r\n\r\nbody",
        "http10": b"POST http://b.test/ HTTP/1.0\r\nContent-Length: 1\r\n\r\nz",
    }
    for name, payload in seeds.items():
        (directory / name).write_bytes(b"\x05" + payload)


if __name__ == "__main__":
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        write_seed_corpus(Path(corpus[0]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
