# The C half of the benchmark: compiles bench/loadgen.c and bench/sink.c with gcc into a build dir of
# the run (never committed), makes the ClientHellos with Python's ssl, and drives both programs.
# Invariant: every process started here is stopped by the object that started it (close()/wait()).
from __future__ import annotations

import json
import queue
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import procs

HERE = Path(__file__).resolve().parent
SERVICES = ("bulk", "rate", "idle", "echo", "half")
DOMAIN = "bench.test"


def sni(service: str) -> str:
    return f"{service}.{DOMAIN}"


def build(build_dir: Path) -> dict[str, Path]:
    """gcc -O2 each tool; returns {name: binary}."""
    out = {}
    for name in ("loadgen", "sink"):
        binary = build_dir / name
        cmd = ["gcc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(binary),
               str(HERE / f"{name}.c")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
        out[name] = binary
    return out


def client_hello(server_name: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl, ALPN h2 + http/1.1), made without a socket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if len(hello) < 6 or hello[0] != 0x16 or hello[5] != 0x01:
        raise RuntimeError(f"ssl made no ClientHello for {server_name}")
    return hello


def write_hellos(directory: Path) -> dict[str, Path]:
    paths = {}
    for service in SERVICES:
        path = directory / f"{service}.hello"
        path.write_bytes(client_hello(sni(service)))
        paths[service] = path
    return paths


class Sink:
    """The C backend (bulk, rate, idle services). Its stdin is a pipe: if this process dies the sink
    reads EOF and exits by itself."""

    def __init__(self, binary: Path, hellos: dict[str, Path], threads: int = 2) -> None:
        self.proc = subprocess.Popen(
            [str(binary), "--bulk-hello", str(hellos["bulk"]), "--rate-hello", str(hellos["rate"]),
             "--idle-hello", str(hellos["idle"]), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True, preexec_fn=procs.die_with_parent)
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ports = self._next("ports", 10.0)
        self.ports = {"bulk": ports["bulk"], "rate": ports["rate"], "idle": ports["idle"]}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def _next(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"sink: no {event!r} line within {timeout} s")
            try:
                item = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if item.get("ev") == event:
                return item

    def bulk_results(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """The sink's verdicts on the next `count` bulk streams (one line per stream, at its EOF); fewer
        if some stream has not ended within `timeout`."""
        deadline = time.monotonic() + timeout
        out: list[dict[str, Any]] = []
        while len(out) < count:
            try:
                out.append(self._next("bulk", max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                break
        return out

    def drain_bulk(self) -> None:
        while True:
            try:
                self._lines.get_nowait()
            except queue.Empty:
                return

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._next("stats", 10.0)

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def close(self) -> None:
        procs.stop_group(self.proc, grace=2.0)


class Loadgen:
    def __init__(self, binary: Path, hellos: dict[str, Path]) -> None:
        self.binary = binary
        self.hellos = hellos

    def _run(self, argv: list[str], timeout: float) -> tuple[dict[str, Any], float]:
        """Runs one loadgen to completion; returns its JSON and its own CPU seconds (wait4 rusage)."""
        proc = subprocess.Popen([str(self.binary), *argv], stdout=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=procs.die_with_parent)
        try:
            out, cpu = procs.communicate_with_rusage(proc, timeout)
        finally:
            procs.stop_group(proc, grace=0.5)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen {' '.join(argv)} exited with {proc.returncode}")
        return json.loads(out.strip().splitlines()[-1]), cpu

    def bulk(self, port: int, streams: int, seconds: float) -> tuple[dict[str, Any], float]:
        return self._run(["bulk", str(port), str(self.hellos["bulk"]), "--streams", str(streams),
                          "--seconds", str(seconds)], timeout=seconds + 60)

    def rate(self, port: int, clients: int, seconds: float, threads: int) -> tuple[dict[str, Any], float]:
        return self._run(["rate", str(port), str(self.hellos["rate"]), "--clients", str(clients),
                          "--seconds", str(seconds), "--threads", str(threads)], timeout=seconds + 30)

    def idle(self, port: int, conns: int) -> IdleClients:
        return IdleClients(self.binary, port, self.hellos["idle"], conns)


class IdleClients:
    """`loadgen idle`: holds `conns` open connections until close()."""

    def __init__(self, binary: Path, port: int, hello: Path, conns: int) -> None:
        self.proc = subprocess.Popen([str(binary), "idle", str(port), str(hello), "--conns", str(conns)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True, preexec_fn=procs.die_with_parent)

    def wait_open(self, timeout: float = 90.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = procs.readline(self.proc.stdout, timeout)
        if not line:
            raise RuntimeError(f"loadgen idle ended early (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """Resets every connection; returns how many were still open just before."""
        result = None
        if self.proc.poll() is None and self.proc.stdin is not None and self.proc.stdout is not None:
            try:
                self.proc.stdin.write("close\n")
                self.proc.stdin.flush()
                line = procs.readline(self.proc.stdout, timeout)
                result = json.loads(line) if line else None
            except (BrokenPipeError, TimeoutError, json.JSONDecodeError):
                result = None
        procs.stop_group(self.proc, grace=2.0)
        return result
