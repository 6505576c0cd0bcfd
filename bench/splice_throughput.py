# Throughput of direct loopback vs the kernel splice vs userspace copy, 1 and 8 streams, a few repetitions,
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
from sniproxy.relay import Relay  # noqa: E402


def cpu_seconds() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time of the whole machine (all CPUs, everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


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


MODES = ("direct", "splice", "copy", "ceiling")
MODE_HELP = """direct: no proxy. splice: the relay as shipped (hand-off at splice_after = 1 MiB, queue
limit, holds, userspace catch-up). copy: userspace copy only. ceiling: splice with a queue limit no
stream reaches, so the verdict never holds and this process never touches payload after the
hand-off: the best the kernel path can do (kernel memory is then unbounded: not shippable)."""
UNBOUNDED = 1 << 60


def main() -> None:
    ap = argparse.ArgumentParser(description=MODE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mb-per-stream", type=int, default=300)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--queue-limit", type=int, default=None, metavar="MIB",
                    help="splice mode's queue limit in MiB (default: the shipped one)")
    ap.add_argument("--sndbuf", type=int, default=None, metavar="KIB",
                    help="send buffer of handed-off sockets in KiB (default: the shipped one)")
    ap.add_argument("--rcvbuf", type=int, default=None, metavar="KIB",
                    help="receive buffer of handed-off sockets in KiB, 0 = autotuning (default: the shipped one)")
    ap.add_argument("--streams", default="1,8", help="comma-separated stream counts (default 1,8)")
    args = ap.parse_args()
    stream_counts = [int(n) for n in args.streams.split(",")]
    modes = [m for m in MODES if m in args.modes.split(",")]
    if "direct" not in modes:
        modes.insert(0, "direct")  # the ratios need it
    planes: dict[str, DataPlane] = {}
    try:
        shipped = {} if args.queue_limit is None else {"queue_limit": args.queue_limit << 20}
        for mode, kwargs in (("splice", shipped), ("ceiling", {"queue_limit": UNBOUNDED})):
            if mode in modes:
                planes[mode] = DataPlane.load(f"/sys/fs/bpf/sniproxy-bench-{os.getpid()}-{mode}", **kwargs)

        def run(mode: str, streams: int, size: int) -> tuple[float, float]:
            if mode == "direct":
                return direct(streams, size)
            sndbuf = None if args.sndbuf is None else args.sndbuf << 10
            rcvbuf = None if args.rcvbuf is None else args.rcvbuf << 10
            relay = Relay() if mode == "copy" else Relay(planes[mode].splice_table, sndbuf=sndbuf, rcvbuf=rcvbuf)
            return uvloop.run(asyncio.wait_for(proxied(relay, streams, size), 120))

        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for streams in stream_counts:
            size = args.mb_per_stream * 1_000_000 // (1 if streams == 1 else 4)
            for _ in range(args.reps):
                for mode in modes:  # interleaved, so a noisy minute does not hit one mode only
                    busy0 = machine_busy_seconds()
                    rate, cpu = run(mode, streams, size)
                    machine = (machine_busy_seconds() - busy0) / (streams * size / 1e9)
                    print(f"  {mode:13} {streams} streams: {rate / 1e6:7.0f} MB/s, proxy CPU {cpu:.2f} s/GB, "
                          f"machine CPU {machine:.2f} s/GB", flush=True)
                    results.setdefault((mode, streams), []).append((rate, cpu, machine))
        print(f"medians of {args.reps}; spread = (max - min) / median of the throughput")
        print(f"{'mode':13} {'streams':>7} {'MB/s':>7} {'spread':>7} {'x direct':>9} {'x copy':>7} "
              f"{'proxy CPU s/GB':>15} {'machine CPU s/GB':>17} {'x copy':>7}")
        for streams in stream_counts:
            def median(mode: str, i: int, n: int = streams) -> float:
                return statistics.median(r[i] for r in results[(mode, n)])
            for mode in modes:
                rates = [r[0] for r in results[(mode, streams)]]
                rate = median(mode, 0)
                vs_copy = vs_copy_cpu = "-"
                if "copy" in modes:
                    vs_copy = f"{rate / median('copy', 0):.2f}"
                    vs_copy_cpu = f"{median(mode, 2) / median('copy', 2):.2f}"
                print(f"{mode:13} {streams:7d} {rate / 1e6:7.0f} {(max(rates) - min(rates)) / rate:7.0%} "
                      f"{rate / median('direct', 0):9.2f} {vs_copy:>7} {median(mode, 1):15.2f} "
                      f"{median(mode, 2):17.2f} {vs_copy_cpu:>7}")
        for mode, plane in planes.items():
            t = plane.traffic()
            total = t.redir_bytes + t.pass_bytes
            print(f"{mode}: {t.redir_bytes / max(total, 1):.0%} of the proxied bytes redirected by the kernel; "
                  f"traffic_stats {t.as_dict()}")
    finally:
        for plane in planes.values():
            plane.close()


if __name__ == "__main__":
    main()
