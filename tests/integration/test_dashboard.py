# docs/grafana/sniproxy-dashboard.json against the real thing (Grafana is not in Debian, Prometheus is):
# the JSON loads, every query names metrics the endpoint really exports, and every query returns data
# from a real Prometheus scraping a real 2-worker splice-mode proxy with XDP while traffic runs. Then
# the kernel counters in /metrics are checked against the CLI's own reading of the same pinned maps.
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.metrics_rig import MetricsRig
from tests.support.proxyproc import REPO

DASHBOARD = REPO / "docs" / "grafana" / "sniproxy-dashboard.json"
METRIC_RE = re.compile(r"\b(sniproxy_[a-z0-9_]+)")
# What Grafana puts in for its variables when the dashboard shows the last hour of every instance.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$job": "sniproxy", "$instance": ".*"}


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in _panels(dashboard["panels"])
            for target in panel.get("targets", [])]


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsRig]:
    rig = MetricsRig(tmp_path_factory.mktemp("dashboard"))
    try:
        rig.start_traffic()
        yield rig
    finally:
        rig.close()


def test_the_dashboard_loads_and_names_only_exported_metrics(rig: MetricsRig):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(list(_panels(dashboard["panels"])))
    for panel in panels:
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    queries = dashboard_queries()
    assert len(queries) >= 20
    # Every name the endpoint exports, as Prometheus stores them (counters with _total, histograms
    # with _bucket/_sum/_count).
    # Labelled families appear with their first sample: wait for a few finished connections.
    deadline = time.monotonic() + 60
    while rig.completed < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rig.completed >= 3, rig.errors[:5]
    exported = {s.name for f in text_string_to_metric_families(scrape(rig.metrics_port)) for s in f.samples}
    used = set()
    for title, expr in queries:
        names = METRIC_RE.findall(expr)
        assert names, f"{title}: no sniproxy metric in {expr}"
        for name in names:
            assert name in exported, f"{title}: {name} is not exported (exported: {sorted(exported)})"
        used.update(names)
    # And the other way round: the families an operator needs most are on the dashboard.
    for family in ("sniproxy_connections_total", "sniproxy_connections_active", "sniproxy_relay_bytes_total",
                   "sniproxy_connection_phase_seconds_bucket", "sniproxy_dns_cache_lookups_total",
                   "sniproxy_kernel_bytes_total", "sniproxy_xdp_packets_total", "sniproxy_reloads_total",
                   "sniproxy_worker_restarts_total", "sniproxy_build_info"):
        assert family in used, family


def test_every_dashboard_query_returns_data_from_a_real_prometheus(rig: MetricsRig):
    prom = rig.prometheus
    assert prom is not None
    rig.reload()
    # Enough traffic inside the rate window: relayed connections, denied SYNs, cached lookups.
    prom.wait_value('sum(sniproxy_relayed_connections_total{mode="kernel"})', lambda v: (v or 0) >= 6,
                    timeout=60)
    prom.wait_value('sum(sniproxy_xdp_packets_total{action="drop"})', lambda v: (v or 0) >= 2, timeout=30)
    prom.wait_value('sum(sniproxy_reloads_total{result="success"})', lambda v: v == 2, timeout=30)
    time.sleep(3)  # a few more scrapes inside the 15 s windows
    empty = []
    for title, expr in dashboard_queries():
        result = prom.query(as_promql(expr))
        values = [float(r["value"][1]) for r in result]
        if not values or not any(math.isfinite(v) for v in values):
            empty.append((title, as_promql(expr), result))
    assert not empty, "queries without data:\n" + "\n".join(map(str, empty))
    # The dashboard's variables come from label values Prometheus knows.
    assert prom.api("label/job/values", **{"match[]": "sniproxy_build_info"}) == ["sniproxy"]
    assert rig.errors == [], rig.errors[:5]
    assert rig.completed >= 6


def _sample(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_kernel_counters_match_the_pinned_maps(rig: MetricsRig):
    rig.stop_traffic()
    time.sleep(1)
    text = scrape(rig.metrics_port)
    stats = subprocess.run([sys.executable, "-m", "sniproxy", "stats", "--pin-dir", rig.pin_dir, "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert stats.returncode == 0, stats.stderr
    totals = json.loads(stats.stdout)["totals"]
    for action, field in (("redirected", "redir_bytes"), ("passed", "pass_bytes"), ("held", "held_bytes")):
        assert _sample(text, "sniproxy_kernel_bytes_total", action=action) == totals[field], action
    assert _sample(text, "sniproxy_kernel_bytes_total", action="redirected") > 0
    allow = subprocess.run([sys.executable, "-m", "sniproxy", "allow", "--pin-dir", rig.pin_dir, "list"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert allow.returncode == 0, allow.stderr
    verdicts = dict(item.split("=") for item in allow.stderr.split())
    assert _sample(text, "sniproxy_xdp_packets_total", action="drop") == int(verdicts["dropped"]) > 0
    assert _sample(text, "sniproxy_xdp_packets_total", reason="allowed") == int(verdicts["passed"]) > 0
    # Each denied connect sent at least one SYN, and each was dropped.
    assert int(verdicts["dropped"]) >= rig.denied_attempts
    assert _sample(text, "sniproxy_dns_cache_entries") == 1
