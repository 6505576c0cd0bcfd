#!/usr/bin/env python3
# docs/dashboard.png: the main graphs of docs/grafana/sniproxy-dashboard.json from a real run. A
# 2-worker splice-mode proxy with XDP (tests/support/metrics_rig.py) serves clients for --seconds while
# a real Prometheus scrapes it; the load steps up half way, the config is reloaded and a worker is
# killed (and replaced); then each panel's own PromQL is fetched with query_range and drawn with
# matplotlib. Needs root (netns, XDP, BPF) and the docs extra (`make dashboard-png`).
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.test_dashboard import DASHBOARD, GRAFANA_VARIABLES  # noqa: E402
from tests.support.metrics_rig import MetricsRig  # noqa: E402

# The panels drawn, by title, in order (2 columns).
MAIN = ["New connections by outcome", "Open connections by listener",
        "Relayed throughput by direction and relay mode", "Kernel splice verdicts: bytes",
        "Phase latency p99", "Connection duration (accept to close)",
        "XDP allow-list verdicts", "DNS cache hit ratio"]
UNITS = {"Bps": ("MB/s", 1e-6), "s": ("ms", 1e3), "reqps": ("per second", 1), "pps": ("packets/s", 1),
         "short": ("", 1), "percentunit": ("%", 100)}


def promql(expr: str, rate_interval: str) -> str:
    for variable, value in {**GRAFANA_VARIABLES, "$__rate_interval": rate_interval}.items():
        expr = expr.replace(variable, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "value"


def main() -> int:
    parser = argparse.ArgumentParser(description="draw docs/dashboard.png from a real run")
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--out", default=str(REPO / "docs" / "dashboard.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")}
    with tempfile.TemporaryDirectory(prefix="sniproxy-dashboard-") as directory:
        rig = MetricsRig(Path(directory))
        try:
            assert rig.prometheus is not None
            start = time.time()
            rig.start_traffic(clients=2, pace=0.5)
            time.sleep(args.seconds * 0.4)
            rig.start_traffic(clients=2, pace=0.1, denied=False)
            time.sleep(args.seconds * 0.15)
            rig.reload()
            time.sleep(args.seconds * 0.15)
            rig.kill_a_worker()
            time.sleep(args.seconds * 0.3)
            end = time.time()
            rig.stop_traffic()
            print(f"{rig.completed} connections, {rig.denied_attempts} denied connects, "
                  f"{len(rig.errors)} client errors (the killed worker's)", file=sys.stderr)
            assert rig.proxy is not None
            relays = Counter((e.get("relay"), e.get("splice_fallback")) for e in rig.proxy.access_events())
            print(f"relay modes in the access log: {dict(relays)}", file=sys.stderr)

            fig, axes = plt.subplots(len(MAIN) // 2, 2, figsize=(15, 3.1 * len(MAIN) // 2), sharex=True)
            for ax, title in zip(axes.flat, MAIN):
                panel = panels[title]
                unit, scale = UNITS[panel["fieldConfig"]["defaults"]["unit"]]
                for target in panel["targets"]:
                    data = rig.prometheus.api("query_range", query=promql(target["expr"], "10s"),
                                              start=start, end=end, step=2)
                    for series in data["result"]:
                        xs = [float(t) - start for t, _ in series["values"]]
                        ys = [float(v) * scale for _, v in series["values"]]
                        ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]), lw=1.4)
                ax.set_title(title, fontsize=10, loc="left")
                ax.set_ylabel(unit, fontsize=8)
                ax.tick_params(labelsize=8)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, loc="upper left", ncol=3)
                for at, what in ((0.4, "load x2"), (0.55, "SIGHUP"), (0.7, "worker killed")):
                    ax.axvline(args.seconds * at, color="grey", ls=":", lw=0.8)
                    ax.text(args.seconds * at, ax.get_ylim()[1], f" {what}", fontsize=6, va="top", color="grey")
            for ax in axes[-1]:
                ax.set_xlabel("seconds into the run", fontsize=8)
            fig.suptitle("sniproxy: docs/grafana/sniproxy-dashboard.json, main panels, from a real run "
                         "(2 workers, kernel splice, XDP allow-list; Prometheus 1 s scrapes)", fontsize=11)
            fig.tight_layout()
            fig.savefig(args.out, dpi=90)
            print(f"wrote {args.out}", file=sys.stderr)
        finally:
            rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
