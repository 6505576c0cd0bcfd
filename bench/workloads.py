# The six workloads, each run against one started target: bulk streams, connection rate, latency with
# one connection in flight, idle memory, and two correctness checks (data right after the ClientHello;
# half-close then reply).
# Each returns a plain dict of raw figures for the JSON file; nothing here decides pass/fail targets.
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench import procs
from bench.native import Loadgen, Sink
from bench.peers import Target

GB = 1e9


@dataclass
class Bench:
    sink: Sink
    loadgen: Loadgen
    py: PyBackends
    hellos: dict[str, bytes]


def _cpu_snapshot(bench: Bench, target: Target) -> dict[str, float]:
    busy, total = procs.machine_cpu()
    return {"proxy": procs.cpu_seconds(target.pids()), "sink": procs.cpu_seconds(bench.sink.pids()),
            "machine_busy": busy, "machine_total": total, "wall": time.monotonic()}


def _cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


def _with_others(cpu: dict[str, float], loadgen: float) -> dict[str, float]:
    """Adds the load generator's CPU and the share of all CPUs that processes outside the benchmark
    used meanwhile (the machine is shared: a high figure means a noisy measurement)."""
    others = max(0.0, cpu["machine_busy"] - cpu["proxy"] - cpu["sink"] - loadgen)
    capacity = cpu["wall"] * (os.cpu_count() or 1)
    return {**cpu, "loadgen": loadgen, "others_pct": others / capacity * 100 if capacity > 0 else 0.0}


def bulk(bench: Bench, target: Target, streams: int, seconds: float) -> dict[str, Any]:
    """`streams` parallel uploads for `seconds`, every byte checked by the sink."""
    bench.sink.drain_bulk()
    pids = target.pids()
    kernel_before = target.kernel_totals()
    before = _cpu_snapshot(bench, target)
    out, loadgen_cpu = bench.loadgen.bulk(target.port("bulk"), streams, seconds)
    connected = [s for s in out["streams"] if s["t_start"]]
    verdicts = bench.sink.bulk_results(len(connected), timeout=5.0)
    sink_error = "" if len(verdicts) == len(connected) else \
        f"{len(connected) - len(verdicts)} of {streams} streams never ended at the sink"
    cpu = _cpu_delta(before, _cpu_snapshot(bench, target))
    kernel_after = target.kernel_totals()
    kernel = None
    if kernel_before is not None and kernel_after is not None:
        kernel = {k: kernel_after[k] - kernel_before[k] for k in ("redir_bytes", "pass_bytes") if k in kernel_after}
    if target.proxy and not pids:
        sink_error = sink_error or "proxy exited"
    by_start = {v["start"]: v for v in verdicts}
    sent = sum(s["sent"] for s in out["streams"])
    received = sum(v["bytes"] for v in verdicts)
    errors = [s["err"] for s in out["streams"] if s["err"]] + [v["err"] for v in verdicts if v["err"]]
    if sink_error:
        errors.append(sink_error)
    # Byte-exact: every stream connected, ended cleanly, and arrived whole and in order at the sink.
    exact = (len(connected) == streams and len(verdicts) == streams and not errors
             and all(s["ok"] for s in out["streams"]) and all(v["ok"] and v["hello_ok"] for v in verdicts))
    if exact:
        exact = all(by_start.get(s["start"], {}).get("bytes") == s["sent"] for s in out["streams"])
        if not exact:
            errors.append("bytes sent and bytes received differ")
    span_ns = (max(v["t_last"] for v in verdicts) - min(v["t_first"] for v in verdicts)) if verdicts else 0
    gbps = received * 8 / span_ns if span_ns > 0 else 0.0
    return {
        "streams": streams, "seconds": seconds, "bytes_sent": sent, "bytes_received": received,
        "span_s": span_ns / 1e9, "gbps": gbps, "byte_exact": exact, "errors": errors[:5],
        "cpu": _with_others(cpu, loadgen_cpu),
        # Bytes the splice program redirected in the kernel during this run (None: not in splice mode).
        "kernel": kernel,
        "kernel_share": kernel["redir_bytes"] / received if kernel and received else None,
    }


def rate(bench: Bench, target: Target, seconds: float, clients: int, threads: int) -> dict[str, Any]:
    """`clients` connections in flight: connect, ClientHello, 1-byte answer, close, for `seconds`."""
    before = _cpu_snapshot(bench, target)
    out, loadgen_cpu = bench.loadgen.rate(target.port("rate"), clients, seconds, threads)
    cpu = _cpu_delta(before, _cpu_snapshot(bench, target))
    ok = out["ok"]
    return {
        **out, "conns_per_s": ok / out["seconds"] if out["seconds"] else 0.0,
        "proxy_us_per_conn": cpu["proxy"] / ok * 1e6 if ok else None,
        "cpu": _with_others(cpu, loadgen_cpu),
    }


def latency(bench: Bench, target: Target, seconds: float) -> dict[str, Any]:
    """One connection in flight at a time (no queueing): connect, ClientHello, the backend's 1-byte
    answer. Its p50 is the per-connection latency the proxy adds, not a queue's length."""
    return rate(bench, target, seconds, 1, 1)


def warm_up(bench: Bench, target: Target) -> None:
    """One full connection, so lazily made state (worker pools, imports) is not counted per connection."""
    with socket.create_connection(("127.0.0.1", target.port("rate")), timeout=10) as s:
        s.sendall(bench.hellos["rate"])
        s.recv(1)


def idle(bench: Bench, target: Target, conns: int) -> dict[str, Any]:
    """`conns` open, idle, fully set-up connections: proxy RSS and kernel memory above the baseline."""
    warm_up(bench, target)
    time.sleep(0.5)
    pids = target.pids()
    base = {"rss": procs.rss_bytes(pids), "sock": procs.sockstat(), "slab": procs.slab_bytes()}
    clients = bench.loadgen.idle(target.port("idle"), conns)
    try:
        opened = clients.wait_open()
        time.sleep(1.0)  # let the proxy finish its side of the last connections
        pids = target.pids()
        held = {"rss": procs.rss_bytes(pids), "sock": procs.sockstat(), "slab": procs.slab_bytes()}
        sink_open = bench.sink.stats()["idle_open"]
    finally:
        closed = clients.close()
    _wait_sockets_gone(base["sock"].get("inuse", 0))
    n = opened["open"]
    per = (lambda x: x / n / 1024 if n else None)
    return {
        "requested": conns, "open": n, "failed": opened["failed"], "open_at_sink": sink_open,
        "still_open_at_end": (closed or {}).get("still_open"), "first_error": opened["first_error"],
        "open_seconds": opened["seconds"],
        "rss_base": base["rss"], "rss_held": held["rss"],
        "rss_kib_per_conn": per(held["rss"] - base["rss"]) if target.proxy else None,
        "sockstat_base": base["sock"], "sockstat_held": held["sock"],
        "sock_mem_kib_per_conn": per(held["sock"]["mem_bytes"] - base["sock"]["mem_bytes"]),
        "slab_kib_per_conn": per(held["slab"] - base["slab"]),
        "kernel_kib_per_conn": per(held["sock"]["mem_bytes"] - base["sock"]["mem_bytes"]
                                   + held["slab"] - base["slab"]),
        "sockets_per_conn": round((held["sock"].get("inuse", 0) - base["sock"].get("inuse", 0)) / n, 2) if n else None,
    }


def _wait_sockets_gone(baseline_inuse: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and procs.sockstat().get("inuse", 0) > baseline_inuse + 200:
        time.sleep(0.1)


# ------------------------------------------------------------------------------- correctness

REPLY = hashlib.sha256(b"bench reply").digest() * 2048  # 64 KiB the half-close backend sends back


class PyBackends:
    """Two small threaded backends for the correctness checks (speed does not matter here):
    echo  echoes everything after the ClientHello until EOF;
    half  reads to EOF, then answers sha256(what it read) + REPLY, then closes."""

    def __init__(self, hellos: dict[str, bytes]) -> None:
        self.hellos = hellos
        self.socks: dict[str, socket.socket] = {}
        self.ports: dict[str, int] = {}
        self._stop = threading.Event()
        for name in ("echo", "half"):
            s = socket.create_server(("127.0.0.1", 0), backlog=64)
            s.settimeout(0.2)
            self.socks[name] = s
            self.ports[name] = s.getsockname()[1]
            threading.Thread(target=self._accept, args=(name, s), daemon=True).start()

    def _accept(self, name: str, lsock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = lsock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(name, conn), daemon=True).start()

    def _serve(self, name: str, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with conn:
                hello = _read_exact(conn, len(self.hellos[name]))
                if hello != self.hellos[name]:
                    return
                if name == "echo":
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                else:
                    digest = hashlib.sha256()
                    while data := conn.recv(65536):
                        digest.update(data)
                    conn.sendall(digest.digest() + REPLY)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for s in self.socks.values():
            s.close()


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _read_to_eof(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def early_data(bench: Bench, target: Target) -> dict[str, Any]:
    """The ClientHello and 64 KiB of data in one write, before any answer: all of it must come back."""
    payload = os.urandom(65536)
    try:
        with socket.create_connection(("127.0.0.1", target.port("echo")), timeout=5) as s:
            s.sendall(bench.hellos["echo"] + payload)
            got = _read_exact(s, len(payload))
    except OSError as exc:
        return {"pass": False, "detail": f"{type(exc).__name__}: {exc}"}
    if got == payload:
        return {"pass": True, "detail": ""}
    return {"pass": False, "detail": f"echoed {len(got)} of {len(payload)} bytes"
            + (", contents differ" if got != payload[:len(got)] else "")}


def half_close(bench: Bench, target: Target) -> dict[str, Any]:
    """Send, shut down the write side, then wait for the whole reply (what a request/response
    protocol that ends its request with FIN does)."""
    payload = os.urandom(16384)
    want = hashlib.sha256(payload).digest() + REPLY
    try:
        with socket.create_connection(("127.0.0.1", target.port("half")), timeout=5) as s:
            s.sendall(bench.hellos["half"] + payload)
            s.shutdown(socket.SHUT_WR)
            got = _read_to_eof(s)
    except OSError as exc:
        return {"pass": False, "detail": f"{type(exc).__name__}: {exc}"}
    if got == want:
        return {"pass": True, "detail": ""}
    return {"pass": False, "detail": f"reply: {len(got)} of {len(want)} bytes"
            + (", contents differ" if got != want[:len(got)] else "")}
