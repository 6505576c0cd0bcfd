# Turns the raw per-repetition results into figures: best of the repetitions and their spread, each
# as a ratio to direct and to the best peer, printed as a text table and as Markdown.
# Invariant: "best" means max for higher-is-better figures and min for the others, everywhere.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    fmt: str = "{:.1f}"


METRICS = [
    Metric("bulk1_gbps", "bulk 1 stream, Gbit/s", True),
    Metric("bulk8_gbps", "bulk 8 streams, Gbit/s", True),
    Metric("rate_kcps", "conn rate, k conns/s", True, "{:.2f}"),
    Metric("rate_p50_ms", "conn latency p50, ms", False, "{:.2f}"),
    Metric("rate_p99_ms", "conn latency p99, ms", False, "{:.2f}"),
    Metric("latency1_p50_us", "latency, 1 in flight, p50 us", False, "{:.0f}"),
    Metric("proxy_us_per_conn", "proxy CPU us/conn", False, "{:.0f}"),
    Metric("proxy_cpu_s_per_gb", "proxy CPU s/GB", False, "{:.3f}"),
    Metric("machine_cpu_s_per_gb", "machine CPU s/GB", False, "{:.3f}"),
    Metric("bench_cpu_s_per_gb", "cli+sink+proxy CPU s/GB", False, "{:.3f}"),
    Metric("idle_rss_kib_per_conn", "proxy RSS KiB/idle conn", False, "{:.2f}"),
    Metric("idle_kernel_kib_per_conn", "kernel KiB/idle conn", False, "{:.2f}"),
]
CHECKS = [("byte_exact", "bulk byte-exact"), ("early_data", "data after hello"),
          ("half_close", "half-close reply")]


def rep_figures(rep: dict[str, Any]) -> dict[str, float | None]:
    """The table's figures from one repetition's raw results."""
    b1, b8, rate, idle = rep.get("bulk1"), rep.get("bulk8"), rep.get("rate"), rep.get("idle")
    out: dict[str, float | None] = {m.key: None for m in METRICS}
    bulks = [b for b in (b1, b8) if b and b["bytes_received"]]
    if b1 and b1["byte_exact"]:
        out["bulk1_gbps"] = b1["gbps"]
    if b8 and b8["byte_exact"]:
        out["bulk8_gbps"] = b8["gbps"]
    if bulks:
        gb = sum(b["bytes_received"] for b in bulks) / 1e9
        out["proxy_cpu_s_per_gb"] = sum(b["cpu"]["proxy"] for b in bulks) / gb if rep["proxy"] else None
        out["machine_cpu_s_per_gb"] = sum(b["cpu"]["machine_busy"] for b in bulks) / gb
        out["bench_cpu_s_per_gb"] = sum(b["cpu"]["proxy"] + b["cpu"]["sink"] + b["cpu"]["loadgen"]
                                        for b in bulks) / gb
    if rate and rate["ok"]:
        out["rate_kcps"] = rate["conns_per_s"] / 1000
        out["rate_p50_ms"] = rate["p50_us"] / 1000
        out["rate_p99_ms"] = rate["p99_us"] / 1000
        out["proxy_us_per_conn"] = rate["proxy_us_per_conn"] if rep["proxy"] else None
    latency = rep.get("latency")
    if latency and latency["ok"]:
        out["latency1_p50_us"] = latency["p50_us"]
    if idle and idle["open"]:
        out["idle_rss_kib_per_conn"] = idle["rss_kib_per_conn"]
        out["idle_kernel_kib_per_conn"] = idle["kernel_kib_per_conn"]
    return out


def rep_checks(rep: dict[str, Any]) -> dict[str, bool | None]:
    bulks = [rep[k] for k in ("bulk1", "bulk8") if rep.get(k)]
    return {
        "byte_exact": all(b["byte_exact"] for b in bulks) if bulks else None,
        "early_data": rep["early_data"]["pass"] if rep.get("early_data") else None,
        "half_close": rep["half_close"]["pass"] if rep.get("half_close") else None,
    }


def summarize(targets: list[dict[str, Any]]) -> dict[str, Any]:
    """targets: [{key, label, peer, reps: [raw rep]}] -> per target {metric: {best, values, spread_pct,
    x_direct, x_best_peer}}, plus which target is the best peer for each metric."""
    summary: dict[str, dict[str, Any]] = {}
    for t in targets:
        figs = [rep_figures(r) for r in t["reps"]]
        checks = [rep_checks(r) for r in t["reps"]]
        entry: dict[str, Any] = {}
        for m in METRICS:
            values = [f[m.key] for f in figs if f[m.key] is not None]
            best = (max(values) if m.higher_is_better else min(values)) if values else None
            spread = (max(values) - min(values)) / best * 100 if values and best else None
            entry[m.key] = {"best": best, "values": values, "spread_pct": spread}
        for key, _ in CHECKS:
            results = [c[key] for c in checks if c[key] is not None]
            entry[key] = all(results) if results else None
        summary[t["key"]] = entry
    direct = summary.get("direct", {})
    peers = [t["key"] for t in targets if t["peer"]]
    best_peer: dict[str, str | None] = {}
    for m in METRICS:
        candidates = [(summary[p][m.key]["best"], p) for p in peers if summary[p][m.key]["best"] is not None]
        value, key = (max if m.higher_is_better else min)(candidates) if candidates else (None, None)
        best_peer[m.key] = key
        for t in targets:
            cell = summary[t["key"]][m.key]
            d = direct.get(m.key, {}).get("best")
            cell["x_direct"] = cell["best"] / d if cell["best"] is not None and d else None
            cell["x_best_peer"] = cell["best"] / value if cell["best"] is not None and value else None
    return {"targets": summary, "best_peer": best_peer}


def _cell(m: Metric, cell: dict[str, Any]) -> str:
    if cell["best"] is None:
        return "-"
    text = m.fmt.format(cell["best"])
    if cell["spread_pct"] is not None and len(cell["values"]) > 1:
        text += f" ±{cell['spread_pct'] / 2:.0f}%"
    return text


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def rows(targets: list[dict[str, Any]], summary: dict[str, Any]) -> list[list[str]]:
    """Metrics down, targets across; each metric has a value row and two ratio rows."""
    s = summary["targets"]
    out = [["", *[t["label"] for t in targets]],
           ["relay mode (logged at start)", *[t["relay_mode"] for t in targets]],
           ["bulk bytes moved by the kernel", *[_kernel_share(t) for t in targets]]]
    for m in METRICS:
        best_key = summary["best_peer"].get(m.key)
        out.append([m.label + (" ^" if m.higher_is_better else " v"),
                    *[_cell(m, s[t["key"]][m.key]) for t in targets]])
        out.append(["  x direct", *[_ratio(s[t["key"]][m.key].get("x_direct")) for t in targets]])
        out.append([f"  x best peer ({_short(targets, best_key)})",
                    *[_ratio(s[t["key"]][m.key].get("x_best_peer")) for t in targets]])
    for key, label in CHECKS:
        out.append([label, *[{True: "pass", False: "FAIL", None: "-"}[s[t["key"]][key]] for t in targets]])
    out.append(["other processes' CPU, max %", *[_others(t) for t in targets]])
    return out


def _others(target: dict[str, Any]) -> str:
    """Highest share of the machine that processes outside the benchmark took during a timed workload."""
    values = [rep[k]["cpu"]["others_pct"] for rep in target["reps"] for k in ("rate", "bulk1", "bulk8")
              if rep.get(k) and "others_pct" in rep[k].get("cpu", {})]
    return f"{max(values):.0f}%" if values else "-"


def _kernel_share(target: dict[str, Any]) -> str:
    """Lowest share of bulk bytes the splice program redirected, over every bulk run of the target."""
    shares = [rep[k]["kernel_share"] for rep in target["reps"] for k in ("bulk1", "bulk8")
              if rep.get(k) and rep[k].get("kernel_share") is not None]
    return f"{min(shares) * 100:.1f}%" if shares else "-"


def _short(targets: list[dict[str, Any]], key: str | None) -> str:
    for t in targets:
        if t["key"] == key:
            return t["key"]
    return "none"


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for n, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(table[0]) - 1)) + "|"]
    for r in table[1:]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


# Issue 12's targets for splice mode against copy mode (and the best peer), from one run.
KERNEL_PATH_TARGETS = (("bulk1_gbps", "bulk 1 stream", ">=", 1.1), ("bulk8_gbps", "bulk 8 streams", ">=", 1.4),
                       ("machine_cpu_s_per_gb", "machine CPU per GB (both bulk runs)", "<=", 0.7),
                       ("rate_kcps", "connections/s", ">=", 0.95))


def kernel_path_targets(summary: dict[str, Any]) -> list[str]:
    """Splice mode (and the unbounded-queue ceiling, when measured) against copy mode, beside issue
    12's targets: a target above the ceiling cannot be reached by bounding the queue better."""
    s = summary["targets"]
    if "ours-splice" not in s or "ours-copy" not in s:
        return []

    def ratio(key: str, metric: str) -> float | None:
        a, b = s.get(key, {}).get(metric, {}).get("best"), s["ours-copy"][metric]["best"]
        return a / b if a is not None and b else None

    lines = ["kernel path (issue 12), x copy mode in this run:"]
    for metric, label, op, target in KERNEL_PATH_TARGETS:
        mine, ceiling = ratio("ours-splice", metric), ratio("ours-unbounded", metric)
        if mine is None:
            continue
        met = mine >= target if op == ">=" else mine <= target
        text = f"  {label}: splice {mine:.2f}x (target {op} {target}x: {'met' if met else 'NOT met'})"
        if ceiling is not None:
            text += f"; unbounded-queue ceiling {ceiling:.2f}x"
        lines.append(text)
    peer = summary["best_peer"].get("bulk8_gbps")
    mine, ceiling = s["ours-splice"]["bulk8_gbps"].get("x_best_peer"), s.get("ours-unbounded", {}).get(
        "bulk8_gbps", {}).get("x_best_peer")
    if peer and mine is not None:
        verdict = "met" if mine >= 1.3 else "NOT met"
        text = f"  bulk 8 streams x best peer ({peer}): splice {mine:.2f}x (target >= 1.3x: {verdict})"
        if ceiling is not None:
            text += f"; unbounded-queue ceiling {ceiling:.2f}x"
        lines.append(text)
    return lines


# Issue 14's targets against nginx in the same run (ratio), and the proxy's own CPU (absolute).
PER_CONNECTION_TARGETS = (("rate_kcps", "connections/s", ">=", 0.6), ("rate_p99_ms", "p99 latency", "<=", 1.5),
                          ("latency1_p50_us", "latency, 1 in flight, p50", "<=", 1.5))
CPU_PER_CONNECTION_TARGET_US = 220.0


def per_connection_targets(summary: dict[str, Any]) -> list[str]:
    """Copy and splice mode beside issue 14's targets, with the Python floor (bench/floor_proxy.py)
    measured in the same run: a target the floor misses is one no trimming of our code can reach."""
    s = summary["targets"]
    if "nginx" not in s or not any(k in s for k in ("ours-copy", "ours-splice")):
        return []
    ours = [k for k in ("ours-copy", "ours-splice") if k in s]
    names = {"ours-copy": "copy", "ours-splice": "splice"}

    def floor_text(value: float | None, op: str, target: float) -> str:
        if value is None:
            return ""
        reach = value >= target if op == ">=" else value <= target
        return f"; Python floor {value:.2f}x ({'within reach' if reach else 'misses it too'})"

    lines = ["per connection (issue 14), x nginx in this run:"]
    for metric, label, op, target in PER_CONNECTION_TARGETS:
        nginx = s["nginx"][metric]["best"]
        if not nginx:
            continue
        parts = []
        for key in ours:
            value = s[key][metric]["best"]
            if value is not None:
                ratio = value / nginx
                met = ratio >= target if op == ">=" else ratio <= target
                parts.append(f"{names[key]} {ratio:.2f}x ({'met' if met else 'NOT met'})")
        floor = s.get("python-floor", {}).get(metric, {}).get("best")
        lines.append(f"  {label} (target {op} {target}x): " + ", ".join(parts)
                     + floor_text(floor / nginx if floor is not None else None, op, target))
    cpu = [f"{names[k]} {s[k]['proxy_us_per_conn']['best']:.0f} us "
           f"({'met' if s[k]['proxy_us_per_conn']['best'] <= CPU_PER_CONNECTION_TARGET_US else 'NOT met'})"
           for k in ours if s[k]["proxy_us_per_conn"]["best"] is not None]
    floor = s.get("python-floor", {}).get("proxy_us_per_conn", {}).get("best")
    nginx = s["nginx"]["proxy_us_per_conn"]["best"]
    text = f"  proxy CPU per connection (target <= {CPU_PER_CONNECTION_TARGET_US:.0f} us): " + ", ".join(cpu)
    if floor is not None:
        text += f"; Python floor {floor:.0f} us"
    if nginx is not None:
        text += f"; nginx {nginx:.0f} us"
    lines.append(text)
    return lines
