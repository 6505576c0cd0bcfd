# Traffic endpoints in their own process (so the proxy's CPU time is its own): a sink that accepts
# connections and reads them to EOF, and a source that connects, sends, half-closes and waits for EOF.
# Used by the CPU test and bench/splice_throughput.py. Prints one JSON line per event on stdout.
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time

_CHUNK = bytes(range(256)) * 4096  # 1 MiB


def _say(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def sink(conns: int, rate: float, digest: bool = False) -> None:
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    _say(event="listening", port=srv.getsockname()[1])
    totals: list[int] = []
    digests: list[str] = []

    def serve(sock: socket.socket) -> None:
        n = 0
        t0 = time.monotonic()
        buf = bytearray(1 << 20)
        h = hashlib.sha256() if digest else None
        while True:
            got = sock.recv_into(buf, 65536 if rate else len(buf))
            if not got:
                break
            n += got
            if h is not None:
                h.update(memoryview(buf)[:got])
            if rate:
                ahead = n / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        sock.close()
        totals.append(n)
        if h is not None:
            digests.append(h.hexdigest())

    threads = []
    for _ in range(conns):
        sock, _ = srv.accept()
        th = threading.Thread(target=serve, args=(sock,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    _say(event="done", bytes=sum(totals), per_conn=totals, sha256=digests)


def stream_bytes(size: int) -> bytes:
    """What one source connection sends after its hello (for checksums)."""
    return (_CHUNK * (size // len(_CHUNK) + 1))[:size]


def source(port: int, conns: int, size: int, burst: int = 0, pause: float = 0.0) -> None:
    def run(results: list[float]) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"HELLO\n")
        left = size
        view = memoryview(_CHUNK)
        next_pause = burst
        while left:
            off = (size - left) % len(view)  # a continuous stream, whatever send() took
            left -= sock.send(view[off: off + min(len(view) - off, left)])
            if burst and size - left >= next_pause:
                time.sleep(pause)
                next_pause += burst
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
        sock.close()
        results.append(time.monotonic())

    results: list[float] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(results,)) for _ in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    _say(event="done", seconds=max(results) - t0, bytes=size * conns)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--conns", type=int, default=1)
    s.add_argument("--rate", type=float, default=0.0, help="bytes/s per connection (0: as fast as possible)")
    s.add_argument("--sha256", action="store_true", help="also report each connection's sha256")
    c = sub.add_parser("source")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--conns", type=int, default=1)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--burst", type=int, default=0, help="pause after every this many bytes (0: never)")
    c.add_argument("--pause", type=float, default=0.0, help="seconds of each pause")
    args = ap.parse_args()
    if args.cmd == "sink":
        sink(args.conns, args.rate, args.sha256)
    else:
        source(args.port, args.conns, args.bytes, args.burst, args.pause)


if __name__ == "__main__":
    main()
