# [metrics] absent: the hooks the proxy calls on every connection do nothing, and prometheus_client is
# never imported (a fresh interpreter, so no other test's import can hide one).
from __future__ import annotations

import subprocess
import sys

from tests.support.proxyproc import REPO

PROGRAM = """
import sys, types
from sniproxy import cli, server, connection, resolver, workers, metrics
from sniproxy.relay import Outcome, RelayResult
conn = types.SimpleNamespace(listener="l", started=0.0, entered={}, resolver=None)
metrics.connection_opened("l")
metrics.connection_closed(conn, "closed", RelayResult("copy", 1, 2, Outcome.CLOSED), 1.0)
metrics.connection_rejected("l", "over_limit")
metrics.dns_lookup(True)
metrics.reload_done(False)
metrics.worker_restarted()
metrics.process_gone(12345)
assert not metrics.enabled()
assert "prometheus_client" not in sys.modules, "imported without [metrics]"
print("ok")
"""


def test_without_metrics_the_hooks_do_nothing_and_import_nothing():
    run = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
