#!/usr/bin/env python3
"""Download from a local backend: direct vs copy mode vs the egress splice vs the short-circuit.

A backend in its own cgroup v2 directory (as a systemd service is) on loopback sends SIZE bytes to
each connection after a 6-byte hello; clients receive through the proxy (or directly), check every
byte against the expected stream, and report the time. 1 and 8 streams, modes interleaved in each
repetition, medians. Machine CPU = all busy CPU from /proc/stat per GB moved. Needs root (BPF,
cgroups). Run alone: `.venv/bin/python bench/shortcut_download.py [--reps 3] [--gb 3]`, or
`bench/run_all.py --only shortcut`; `make bench` runs it after the peer comparison.

Targets from issue 13: shortcut >= 0.85x direct on 1 and 8 streams, >= 1.8x copy on 8 streams, at
<= 0.6x copy's machine CPU per GB.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("direct", "copy", "splice", "shortcut")
_PATTERN = bytes(range(256)) * 4096  # 1 MiB; every connection sends it over and over
_DOUBLE = _PATTERN * 2
_DOUBLE_VIEW = memoryview(_DOUBLE)


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# -- endpoints (run as subprocesses: `shortcut_download.py backend|client ...`) ------------------------
def backend_main(conns: int, size: int) -> None:
    """Accept `conns` connections, each: read the 6-byte hello, send `size` bytes, FIN, wait for EOF."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)

    def serve(sock: socket.socket) -> None:
        sock.setblocking(True)
        hello = b""
        while len(hello) < 6:
            hello += sock.recv(6 - len(hello))
        view, left = memoryview(_DOUBLE), size
        while left:
            off = (size - left) % len(_PATTERN)
            left -= sock.send(view[off:off + min(len(_PATTERN), left)])
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            # A blocked recv() on a captured socket reports the peer's RST as EAGAIN (tcp_bpf_recvmsg
            # on 6.18); the bytes were all sent and checked by the client by then.
            pass
        sock.close()

    while True:  # serves until killed (one process per run of all modes)
        threads = []
        for _ in range(conns):
            sock, _ = srv.accept()
            th = threading.Thread(target=serve, args=(sock,))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()


def client_main(port: int, conns: int, size: int) -> None:
    """`conns` connections receiving `size` bytes each, checked byte for byte."""
    errors: list[str] = []
    ends: list[float] = []

    def run() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"HELLO\n")
        buf = bytearray(1 << 20)
        got = 0
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            off = got % len(_PATTERN)
            # One memcmp of buf's first n bytes, no copy (a memoryview comparison goes item by item;
            # slicing buf would copy): the client's own cost is in every mode's machine CPU.
            if not buf.startswith(_DOUBLE_VIEW[off:off + n]):
                errors.append(f"byte mismatch in [{got}, {got + n})")
                break
            got += n
        if got != size:
            errors.append(f"received {got} of {size} bytes")
        sock.close()
        ends.append(time.monotonic())

    t0 = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps({"seconds": max(ends) - t0, "errors": errors}), flush=True)


# -- the proxy (in this process) ----------------------------------------------------------------------
async def proxy(relay: Any, listener: socket.socket, backend_port: int, streams: int,
                shortcut: bool) -> list[Any]:
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()

    async def one() -> Any:
        async with lock:
            client, _ = await loop.sock_accept(listener)
        client.setblocking(False)
        first = b""
        while len(first) < 6:
            first += await loop.sock_recv(client, 6 - len(first))
        backend = socket.socket()
        backend.setblocking(False)
        ticket = None
        if shortcut:
            ticket = relay.shortcut.prepare(client, backend, ("127.0.0.1", backend_port))
            assert not isinstance(ticket, str), ticket
        await loop.sock_connect(backend, ("127.0.0.1", backend_port))
        return await relay.relay(client, backend, first, 120, ticket=ticket)

    return await asyncio.gather(*(one() for _ in range(streams)))


def run_client(port: int, streams: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "client", str(port), str(streams), str(size)],
                            stdout=subprocess.PIPE, text=True)


def one_run(mode: str, relays: dict[str, Any], backend_port: int, streams: int, size: int) -> dict[str, Any]:
    import uvloop

    busy0 = machine_busy_seconds()
    results: list[Any] = []
    if mode == "direct":
        out, _ = run_client(backend_port, streams, size).communicate()
    else:
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.setblocking(False)
        client = run_client(listener.getsockname()[1], streams, size)
        results = uvloop.run(asyncio.wait_for(
            proxy(relays[mode], listener, backend_port, streams, mode == "shortcut"), 600))
        out, _ = client.communicate()
        listener.close()
    report = json.loads(out)
    if report["errors"]:
        raise RuntimeError(f"{mode}, {streams} streams: {report['errors'][:3]}")
    if mode == "shortcut":
        short = sum(r.shortcut_bytes for r in results)
        if short != streams * size or not all(r.shortcut for r in results):
            raise RuntimeError(f"shortcut moved {short} of {streams * size} bytes")
    gb = streams * size / 1e9
    return {"rate": streams * size / report["seconds"], "machine_cpu_per_gb": (machine_busy_seconds() - busy0) / gb}


def measure(reps: int, gb: float, modes: tuple[str, ...] = MODES, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Run every mode, 1 and 8 streams, `reps` times; return medians and ratios."""
    from sniproxy.kernel.loader import DataPlane
    from sniproxy.kernel.shortcut import ShortcutMaps, cgroup2_mounts
    from sniproxy.relay import Relay
    from sniproxy.relay.shortcut import Shortcut

    tag = f"{os.getpid()}"
    cgroup = os.path.join(cgroup2_mounts()[0], f"sniproxy-bench-shortcut-{tag}")
    results: dict[str, dict[int, list[dict[str, float]]]] = {m: {1: [], 8: []} for m in modes}
    with contextlib.ExitStack() as stack:
        os.mkdir(cgroup)
        stack.callback(os.rmdir, cgroup)
        plane = DataPlane.load(f"/sys/fs/bpf/sniproxy-bench-{tag}-splice")
        stack.callback(plane.close)
        maps = ShortcutMaps.load(cgroup, f"/sys/fs/bpf/sniproxy-bench-{tag}-shortcut")
        stack.callback(maps.close)
        shortcut_relay = Relay()
        shortcut_relay.shortcut = Shortcut(maps, cgroup)
        relays = {"copy": Relay(), "splice": Relay(plane.splice_table), "shortcut": shortcut_relay}
        for streams in (1, 8):
            size = int(gb * 1e9 / streams)
            size -= size % 4096
            backend = subprocess.Popen(
                ["/bin/sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", sys.executable,
                 __file__, "backend", str(streams), str(size)], stdout=subprocess.PIPE, text=True)
            stack.callback(_stop, backend)
            assert backend.stdout is not None
            port = json.loads(backend.stdout.readline())["port"]
            for rep in range(reps):
                for mode in modes:  # interleaved: a noisy moment does not hit one mode only
                    r = one_run(mode, relays, port, streams, size)
                    results[mode][streams].append(r)
                    log(f"  [{rep + 1}/{reps}] {mode:9} {streams} streams: {r['rate'] / 1e6:7.0f} MB/s, "
                        f"machine CPU {r['machine_cpu_per_gb']:.2f} s/GB")
            _stop(backend)
    summary: dict[str, Any] = {"gb_per_run": gb, "reps": reps, "modes": {}}
    for mode in modes:
        for streams in (1, 8):
            runs = results[mode][streams]
            rate = statistics.median(r["rate"] for r in runs)
            cpu = statistics.median(r["machine_cpu_per_gb"] for r in runs)
            summary["modes"].setdefault(mode, {})[streams] = {
                "rate": rate, "machine_cpu_per_gb": cpu,
                "spread": (max(r["rate"] for r in runs) - min(r["rate"] for r in runs)) / rate}
    for mode in modes:
        for streams in (1, 8):
            row = summary["modes"][mode][streams]
            if "direct" in modes:
                row["x_direct"] = row["rate"] / summary["modes"]["direct"][streams]["rate"]
            if "copy" in modes:
                row["x_copy"] = row["rate"] / summary["modes"]["copy"][streams]["rate"]
                row["cpu_x_copy"] = row["machine_cpu_per_gb"] / summary["modes"]["copy"][streams]["machine_cpu_per_gb"]
    return summary


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def table(summary: dict[str, Any]) -> str:
    lines = [f"download from a local backend in a cgroup, {summary['gb_per_run']:g} GB per run, medians of "
             f"{summary['reps']}",
             f"{'mode':9} {'streams':>7} {'MB/s':>7} {'spread':>7} {'x direct':>9} {'x copy':>7} "
             f"{'machine CPU s/GB':>17} {'x copy':>7}"]
    for streams in (1, 8):
        for mode, rows in summary["modes"].items():
            r = rows[streams]
            lines.append(f"{mode:9} {streams:7d} {r['rate'] / 1e6:7.0f} {r['spread']:7.0%} "
                         f"{r.get('x_direct', 0):9.2f} {r.get('x_copy', 0):7.2f} "
                         f"{r['machine_cpu_per_gb']:17.2f} {r.get('cpu_x_copy', 0):7.2f}")
    s = summary["modes"].get("shortcut")
    if s and "direct" in summary["modes"] and "copy" in summary["modes"]:
        checks = [("1 stream >= 0.85x direct", s[1]["x_direct"] >= 0.85),
                  ("8 streams >= 0.85x direct", s[8]["x_direct"] >= 0.85),
                  ("8 streams >= 1.8x copy", s[8]["x_copy"] >= 1.8),
                  ("machine CPU <= 0.6x copy (1 stream)", s[1]["cpu_x_copy"] <= 0.6),
                  ("machine CPU <= 0.6x copy (8 streams)", s[8]["cpu_x_copy"] <= 0.6)]
        lines.append("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
        # The floor of machine CPU per GB is a direct connection's: the short-circuit's bytes take the
        # same single loopback hop (plus the sk_msg redirect), so no proxy can go below it.
        d = summary["modes"]["direct"]
        for streams in (1, 8):
            floor, used = d[streams]["cpu_x_copy"], s[streams]["cpu_x_copy"]
            note = " (the 0.6x target is below it)" if floor > 0.6 else ""
            lines.append(f"CPU ceiling, {streams} stream(s): direct {floor:.2f}x copy{note}; shortcut "
                         f"{used:.2f}x copy = {used / floor:.2f}x direct")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "backend":
        backend_main(int(argv[1]), int(argv[2]))
        return 0
    if argv and argv[0] == "client":
        client_main(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gb", type=float, default=3.0, help="GB moved per run (split between the streams)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    summary = measure(args.reps, args.gb, modes)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
