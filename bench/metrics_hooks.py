#!/usr/bin/env python3
# What [metrics] adds to each connection: the hooks a connection calls (connection_opened, one DNS
# lookup, connection_closed with three phases and a relay result), timed in-process, with one worker
# (in-memory values) and with workers (prometheus_client's multiprocess mode: mmap'd files), against
# the same calls with metrics off. Run in a fresh process per mode: the mode is chosen at enable().
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 50_000


def one_mode(mode: str) -> float:
    from sniproxy import metrics
    from sniproxy.relay import Outcome, RelayResult

    if mode != "off":
        metrics.enable(1 if mode == "single" else 2)
    cache = SimpleNamespace(kind="kernel")
    t0 = time.monotonic()
    conn = SimpleNamespace(listener="127.0.0.1:443", started=t0, resolver=SimpleNamespace(cache=cache),
                           entered={"routing": t0 + 0.001, "resolving": t0 + 0.001,
                                    "connecting": t0 + 0.002, "relaying": t0 + 0.003})
    result = RelayResult("splice", 5000, 100000, Outcome.CLOSED)
    start = time.perf_counter()
    for _ in range(N):
        metrics.connection_opened(conn.listener)
        metrics.dns_lookup(True)
        metrics.connection_closed(conn, "closed", result, t0 + 0.5)
    elapsed = time.perf_counter() - start
    metrics.shutdown()
    return elapsed / N * 1e6


def main() -> int:
    if len(sys.argv) == 2:
        print(one_mode(sys.argv[1]))
        return 0
    for mode in ("off", "single", "multiprocess"):
        runs = [float(subprocess.check_output([sys.executable, __file__, mode], env=os.environ).decode())
                for _ in range(3)]
        print(f"{mode:>12}: {min(runs):6.2f} us per connection (best of 3, {N} connections each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
