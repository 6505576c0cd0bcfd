# The benchmark chart: one bar panel per headline figure, every target side by side, with the date
# and the machine in the title. Reads the summary run_all.py builds (or a results JSON file):
#   .venv/bin/python bench/chart.py bench/results/<run>.json [-o docs/bench-<date>.png]
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PANELS = [
    ("bulk1_gbps", "bulk, 1 stream (Gbit/s, higher is better)"),
    ("bulk8_gbps", "bulk, 8 streams (Gbit/s, higher is better)"),
    ("rate_kcps", "connection rate, 32 clients (k/s, higher is better)"),
    ("rate_p99_ms", "connection latency p99 (ms, lower is better)"),
    ("latency1_p50_us", "latency, 1 connection in flight, p50 (us, lower is better)"),
    ("proxy_us_per_conn", "proxy CPU per connection (us, lower is better)"),
    ("machine_cpu_s_per_gb", "whole-machine CPU per GB moved (s, lower is better)"),
    ("idle_rss_kib_per_conn", "proxy RSS per idle connection (KiB, lower is better)"),
]
OURS_COLOR, PEER_COLOR, DIRECT_COLOR = "#1f6fb4", "#9a9a9a", "#2f2f2f"
SHORT = {"ours-splice": "ours\nsplice", "ours-copy": "ours\ncopy", "ours-unbounded": "ours\nunbounded",
         "python-floor": "Python\nfloor",
         "sniproxy-c": "Debian\nsniproxy",
         "nginx": "nginx", "nginx-256k": "nginx\n256K buf", "haproxy": "HAProxy", "haproxy-256k": "HAProxy\n256K buf"}


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu_model']}, {machine['cpus']} vCPU, {machine['mem_gib']:.0f} GiB, "
            f"Linux {machine['kernel']}, Debian {machine['debian']}")


def kernel_share(target: dict[str, Any], workload: str) -> str:
    shares = [rep[workload]["kernel_share"] for rep in target["reps"]
              if rep.get(workload) and rep[workload].get("kernel_share") is not None]
    return f"{min(shares) * 100:.0f}%" if shares else "?"


def correctness_line(results: dict[str, Any]) -> str:
    summary = results["summary"]["targets"]
    parts = []
    for key, what in (("byte_exact", "bulk not byte-exact"), ("early_data", "data sent right after the hello lost"),
                      ("half_close", "reply after a client half-close dropped")):
        failed = [t["label"] for t in results["targets"] if summary[t["key"]].get(key) is False]
        parts.append(f"{what}: {', '.join(failed) if failed else 'none'}")
    return "Correctness: " + "; ".join(parts) + ".  Bar labels under a value: relay mode our proxy logged at start."


def render(results: dict[str, Any], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    summary = results["summary"]["targets"]
    labels = [SHORT.get(t["key"], t["label"]) for t in targets]
    colors = [DIRECT_COLOR if t["key"] == "direct" else OURS_COLOR if t["key"].startswith("ours") else PEER_COLOR
              for t in targets]
    fig, axes = plt.subplots(2, 4, figsize=(22, 9.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        values = [summary[t["key"]][key]["best"] for t in targets]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(range(len(targets)), heights, color=colors)
        top = max(heights) if any(heights) else 1
        for bar, v, t in zip(bars, values, targets):
            text = "n/a" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")
            if t["relay_mode"] not in ("-", "") and v is not None:
                text += f"\n{t['relay_mode']}"
                if key.startswith("bulk") and t["relay_mode"] == "splice":
                    text += f"\n{kernel_share(t, key[:5])} by kernel"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.01, text,
                    ha="center", va="bottom", fontsize=7.5)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(targets)))
        ax.set_xticklabels(labels, fontsize=8, rotation=0)
        ax.set_ylim(0, top * 1.22)
        ax.grid(axis="y", alpha=0.3)
    s = results["settings"]
    fig.suptitle(
        f"sniproxy vs peers on loopback, {results['date']} (best of {s['reps']}, same run)\n"
        f"{machine_line(results['machine'])}; background load before the run "
        f"{results['machine']['background_busy_pct']:.0f}% of all CPUs; "
        f"idle test: {s['idle_conns']} connections", fontsize=11)
    fig.text(0.5, 0.01, correctness_line(results), ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.94))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, help="a JSON file written by bench/run_all.py")
    parser.add_argument("-o", "--out", type=Path,
                        help="PNG path (default: docs/bench-<date>.png, or bench-<date>-<HHMM>.png when that exists)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    out = args.out or Path(__file__).resolve().parents[1] / "docs" / f"bench-{results['date']}.png"
    if not args.out and out.exists():  # a chart docs/ links already: never redraw over it
        out = out.with_name(f"bench-{results['date']}-{results['time'][11:16].replace(':', '')}.png")
    print(render(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
