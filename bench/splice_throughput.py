# Throughput of direct loopback vs SpliceRelay vs CopyRelay, 1 and 8 streams, a few repetitions,
# printed as ratios to direct, with the proxy's CPU seconds per GB. Needs root (BPF).
# Run: .venv/bin/python bench/splice_throughput.py [--reps 3] [--mb-per-stream 300]
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENDPOINTS = ROOT / "tests" / "kernel" / "endpoints.py"

import uvloop  # noqa: E402

from sniproxy.kernel.loader import DataPlane  # noqa: E402
from sniproxy.relay import CopyRelay  # noqa: E402
from sniproxy.splice_relay import SpliceRelay  # noqa: E402


def cpu_seconds() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_sink(streams: int) -> tuple[subprocess.Popen[str], int]:
    sink = subprocess.Popen([sys.executable, str(ENDPOINTS), "sink", "--conns", str(streams)],
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    return sink, json.loads(sink.stdout.readline())["port"]


def run_source(port: int, streams: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ENDPOINTS), "source", "--port", str(port),
                             "--conns", str(streams), "--bytes", str(size)], stdout=subprocess.PIPE, text=True)


def direct(streams: int, size: int) -> tuple[float, float]:
    sink, port = start_sink(streams)
    src = run_source(port, streams, size)
    out, _ = src.communicate()
    sink.wait()
    return streams * size / json.loads(out)["seconds"], 0.0


async def proxied(relay, streams: int, size: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    sink, port = start_sink(streams)
    lst = socket.create_server(("127.0.0.1", 0), backlog=64)
    lst.setblocking(False)
    src = run_source(lst.getsockname()[1], streams, size)
    cpu0 = cpu_seconds()

    accepting = asyncio.Lock()

    async def one() -> None:
        # One accept at a time: concurrent sock_accept calls on one listener replace each other's
        # reader, so all but one wait forever (this was the "8 streams stall").
        async with accepting:
            client, _ = await loop.sock_accept(lst)
        client.setblocking(False)
        first = await loop.sock_recv(client, 6)
        backend = socket.socket()
        backend.setblocking(False)
        await loop.sock_connect(backend, ("127.0.0.1", port))
        await relay.relay(client, backend, first, 60)

    await asyncio.gather(*(one() for _ in range(streams)))
    cpu = cpu_seconds() - cpu0
    out, _ = await loop.run_in_executor(None, src.communicate)
    sink.wait()
    lst.close()
    return streams * size / json.loads(out)["seconds"], cpu / (streams * size / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mb-per-stream", type=int, default=300)
    args = ap.parse_args()
    pin_dir = f"/sys/fs/bpf/sniproxy-bench-{os.getpid()}"
    plane = DataPlane.load(pin_dir)
    try:
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for streams in (1, 8):
            size = args.mb_per_stream * 1_000_000 // (1 if streams == 1 else 4)
            for _ in range(args.reps):
                runs = (("direct", lambda: direct(streams, size)),
                        ("splice", lambda: uvloop.run(asyncio.wait_for(
                            proxied(SpliceRelay(plane.splice_table, CopyRelay()), streams, size), 120))),
                        ("copy", lambda: uvloop.run(asyncio.wait_for(proxied(CopyRelay(), streams, size), 120))))
                for mode, run in runs:
                    rate, cpu = run()
                    print(f"  {mode:6} {streams} streams: {rate / 1e6:7.0f} MB/s, proxy CPU {cpu:.2f} s/GB", flush=True)
                    results.setdefault((mode, streams), []).append((rate, cpu))
        print(f"{'mode':8} {'streams':>7} {'MB/s':>9} {'x direct':>9} {'CPU s/GB':>9}")
        for streams in (1, 8):
            base = statistics.median(r[0] for r in results[("direct", streams)])
            for mode in ("direct", "splice", "copy"):
                rate = statistics.median(r[0] for r in results[(mode, streams)])
                cpu = statistics.median(r[1] for r in results[(mode, streams)])
                print(f"{mode:8} {streams:7d} {rate / 1e6:9.0f} {rate / base:9.2f} {cpu:9.2f}")
            s = statistics.median(r[0] for r in results[("splice", streams)])
            c = statistics.median(r[0] for r in results[("copy", streams)])
            print(f"  splice/copy at {streams} streams: {s / c:.2f}x")
        print(f"traffic_stats: {plane.traffic().as_dict()}")
    finally:
        plane.close()


if __name__ == "__main__":
    main()
