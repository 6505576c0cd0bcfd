# The per-connection hook, in a fresh interpreter with metrics on (single process): phases come from
# the connection's real state machine (a unix-socket backend has no resolve; a route that falls back
# to a second backend reports the connect that served), and bytes are split by the path that moved
# them (the relay result's kernel share, the rest copied).
from __future__ import annotations

import json
import subprocess
import sys

from tests.support.proxyproc import REPO

PROGRAM = """
import json, time, types
from prometheus_client import generate_latest
from sniproxy import metrics
from sniproxy.connection import Connection, State
from sniproxy.relay import Outcome, RelayResult

metrics.enable(1)
memory = types.SimpleNamespace(kind="kernel")
resolver = types.SimpleNamespace(cache=memory)

def run(states, result):
    conn = Connection(None, ("127.0.0.1", 1), "l", None, resolver, None)
    metrics.connection_opened("l")
    for state, pause in states:
        time.sleep(pause)
        conn.state = state
    conn.state = State.CLOSED
    metrics.connection_closed(conn, "closed", result, conn.entered["closed"])

hello = [(State.READING_HELLO, 0), (State.ROUTING, 0.01)]
# A unix-socket backend: no resolve.
run(hello + [(State.CONNECTING, 0), (State.RELAYING, 0.02)], RelayResult("copy", 100, 200, Outcome.CLOSED))
# A TCP backend resolved (30 ms) then refused, then a second one connected in 40 ms, handed off.
run(hello + [(State.RESOLVING, 0), (State.CONNECTING, 0.03), (State.CONNECTING, 0.01), (State.RELAYING, 0.04)],
    RelayResult("splice", 1000, 5000, Outcome.CLOSED, kernel_bytes=4500, kernel_up=600, kernel_down=3900))
out = {}
for family in metrics._registry.collect():
    for s in family.samples:
        out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print(json.dumps(out))
"""


def test_phases_and_bytes_by_path():
    run = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)

    def value(name: str, **labels: str) -> float:
        return got[name + json.dumps(labels, sort_keys=True)]

    assert value("sniproxy_connection_phase_seconds_count", phase="hello") == 2
    assert value("sniproxy_connection_phase_seconds_count", phase="resolve") == 1  # not the unix one
    assert 0.03 <= value("sniproxy_connection_phase_seconds_sum", phase="resolve") < 0.1
    assert value("sniproxy_connection_phase_seconds_count", phase="connect") == 2
    # 20 ms (unix) + 40 ms (the second backend), not the refused one's 10 ms.
    assert 0.06 <= value("sniproxy_connection_phase_seconds_sum", phase="connect") < 0.15
    assert value("sniproxy_relay_bytes_total", direction="up", mode="copy") == 100 + 400
    assert value("sniproxy_relay_bytes_total", direction="down", mode="copy") == 200 + 1100
    assert value("sniproxy_relay_bytes_total", direction="up", mode="kernel") == 600
    assert value("sniproxy_relay_bytes_total", direction="down", mode="kernel") == 3900
    assert value("sniproxy_relayed_connections_total", mode="copy") == 1
    assert value("sniproxy_relayed_connections_total", mode="kernel") == 1
    assert value("sniproxy_connections_total", listener="l", outcome="closed") == 2
    assert value("sniproxy_connections_active", listener="l") == 0
