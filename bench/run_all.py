#!/usr/bin/env python3
"""`make bench`: this proxy against direct connections and its peers, same machine, same run.

Targets: direct (client to sink), this proxy in splice and in copy mode, Debian's sniproxy, nginx
(stream + ssl_preread; 16 KiB and 256 KiB buffers), HAProxy (TCP mode on req.ssl_sni; default and
256 KiB tune.bufsize). Workloads, all on loopback behind a real ClientHello (Python ssl): bulk upload
with 1 and 8 streams, checked byte for byte by the sink; connection rate with 32 clients; memory with
thousands of idle connections; data sent right after the hello; half-close then reply.

Prints a table (best of --reps, spread, ratio to direct and to the best peer), writes the raw results
to bench/results/<time>.json (+ .md) and the chart to docs/bench-<date>.png. Needs root (BPF for the
splice mode) and the peers from Debian (scripts/setup.sh --bench, which `make bench` runs first).
Every process and temp dir it makes is removed at the end, also on Ctrl-C or a failure.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import chart, native, peers, procs, report, workloads  # noqa: E402

RESULTS = REPO / "bench" / "results"


# What one repetition runs, in this order (--workloads picks a subset).
WORKLOADS = ("idle", "checks", "rate", "latency", "bulk")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_facts() -> dict[str, Any]:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    busy0, total0 = procs.machine_cpu()
    time.sleep(1.0)
    busy1, total1 = procs.machine_cpu()
    return {
        "cpu_model": model, "cpus": os.cpu_count(), "mem_gib": mem_kib / 2**20, "kernel": platform.release(),
        "debian": Path("/etc/debian_version").read_text().strip(), "python": platform.python_version(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "background_busy_pct": (busy1 - busy0) / (total1 - total0) * 100 if total1 > total0 else 0.0,
        "nofile_hard": procs.nofile_hard(),
    }


def attempt(rep: dict[str, Any], name: str, fn: Any, *args: Any) -> None:
    """One workload; a failure is recorded for that workload and the others still run."""
    try:
        rep[name] = fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        rep.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        log(f"    {name} failed: {exc}")
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()


def run_target(bench: workloads.Bench, target: peers.Target, workdir: Path, backends: dict[str, int],
               settings: dict[str, Any]) -> dict[str, Any]:
    rep: dict[str, Any] = {"proxy": target.proxy}
    started = time.monotonic()
    try:
        target.start(workdir, backends, settings["idle_conns"])
    except Exception as exc:
        target.stop()
        rep["errors"] = {"start": f"{type(exc).__name__}: {exc}"}
        log(f"    start failed: {exc}")
        return rep
    rep["relay_mode"] = target.relay_mode
    try:
        only = [w for w in settings.get("workloads") or WORKLOADS if target.workloads is None or w in target.workloads]
        if "idle" in only:
            attempt(rep, "idle", workloads.idle, bench, target, settings["idle_conns"])
        if "checks" in only:
            attempt(rep, "early_data", workloads.early_data, bench, target)
            attempt(rep, "half_close", workloads.half_close, bench, target)
        if "rate" in only:
            attempt(rep, "rate", workloads.rate, bench, target, settings["rate_seconds"], settings["clients"],
                    settings["rate_threads"])
        if "latency" in only:
            attempt(rep, "latency", workloads.latency, bench, target, settings["latency_seconds"])
        if "bulk" in only:
            attempt(rep, "bulk1", workloads.bulk, bench, target, 1, settings["bulk_seconds"])
            attempt(rep, "bulk8", workloads.bulk, bench, target, 8, settings["bulk_seconds"])
        if target.proxy and isinstance(target, peers.ProcessTarget) and not target.alive():
            rep.setdefault("errors", {})["process"] = f"exited during the run:\n{target.log_tail(1500)}"
    finally:
        target.stop()
    rep["seconds"] = time.monotonic() - started
    return rep


def progress_line(rep: dict[str, Any]) -> str:
    parts = []
    if "idle" in rep:
        i = rep["idle"]
        rss = f", {i['rss_kib_per_conn']:.1f} KiB RSS/conn" if i["rss_kib_per_conn"] is not None else ""
        parts.append(f"idle {i['open']}/{i['requested']} open{rss}")
    for k in ("early_data", "half_close"):
        if k in rep:
            parts.append(f"{k} {'pass' if rep[k]['pass'] else 'FAIL'}")
    if "rate" in rep:
        r = rep["rate"]
        parts.append(f"rate {r['conns_per_s'] / 1000:.1f}k/s p99 {r['p99_us'] / 1000:.2f} ms")
        if r.get("proxy_us_per_conn"):
            parts.append(f"{r['proxy_us_per_conn']:.0f} us/conn")
    if "latency" in rep:
        parts.append(f"1 in flight p50 {rep['latency']['p50_us']:.0f} us")
    for k in ("bulk1", "bulk8"):
        if k in rep:
            b = rep[k]
            parts.append(f"{k} {b['gbps']:.1f} Gbit/s{'' if b['byte_exact'] else ' NOT EXACT'}")
    return ", ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [t.key for t in peers.all_targets(None)]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2, help="repetitions; the best is reported (default 2)")
    p.add_argument("--bulk-seconds", type=float, default=3.0, help="length of each bulk run (default 3)")
    p.add_argument("--rate-seconds", type=float, default=3.0, help="length of each rate run (default 3)")
    p.add_argument("--latency-seconds", type=float, default=2.0,
                   help="length of the run with one connection in flight (default 2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--clients", type=int, default=32, help="connections in flight in the rate run")
    p.add_argument("--rate-threads", type=int, default=2, help="load generator threads in the rate run")
    p.add_argument("--idle-conns", type=int, default=10000,
                   help="idle connections to hold (capped so a proxy's 2 fds each fit the fd limit)")
    p.add_argument("--targets", default=",".join(keys), help=f"comma-separated subset of {','.join(keys)}")
    p.add_argument("--chart", type=Path, help="PNG path (default docs/bench-<date>.png, or bench-<date>-<HHMM>.png "
                   "when a run of the same day made that one)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument("--only", choices=["shortcut"],
                   help="run one workload alone: shortcut = bench/shortcut_download.py (download from a "
                        "local backend in a cgroup: direct, copy, egress splice, short-circuit)")
    p.add_argument("--shortcut-gb", type=float, default=3.0, help="GB per shortcut run (default 3)")
    p.add_argument("--no-shortcut", action="store_true", help="skip the shortcut download workload")
    return p.parse_args(argv)


def run_shortcut(reps: int, gb: float) -> dict[str, Any] | None:
    """The local-backend download workload (issue 13), side by side in one run; printed and saved."""
    from bench import shortcut_download

    log(f"run_all: shortcut download, {gb:g} GB per run, {reps} repetitions")
    try:
        summary = shortcut_download.measure(reps, gb, log=log)
    except Exception as exc:  # recorded, the rest of the results still stand
        log(f"run_all: shortcut download failed: {type(exc).__name__}: {exc}")
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    print()
    print(shortcut_download.table(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run_all: needs root (BPF for the splice mode; peers bind and raise fd limits)")
        return 2
    if args.only == "shortcut":
        summary = run_shortcut(max(args.reps, 3), args.shortcut_gb)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / (datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-shortcut")
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"raw results: {stem.with_suffix('.json').relative_to(REPO)}")
        return 0 if summary and "error" not in summary else 1
    missing = [b for b in ("/usr/sbin/nginx", "/usr/sbin/haproxy", "/usr/sbin/sniproxy",
                           str(peers.NGINX_STREAM_MODULE)) if not os.path.exists(b)]
    if missing:
        log(f"run_all: missing {', '.join(missing)}; run `bash scripts/setup.sh --bench` (make bench does)")
        return 2
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally below runs. SIGINT is set explicitly: a shell
    # starts background jobs with it ignored, and Python keeps an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    hard = procs.raise_nofile()
    idle_conns = min(args.idle_conns, (hard - 400) // 2)
    wanted = args.targets.split(",")
    unknown = sorted(set(wanted) - {t.key for t in peers.all_targets(None)})
    if unknown:
        log(f"run_all: unknown target(s) {', '.join(unknown)}")
        return 2
    now = datetime.datetime.now(datetime.timezone.utc)
    settings = {"reps": args.reps, "bulk_seconds": args.bulk_seconds, "rate_seconds": args.rate_seconds,
                "clients": args.clients, "rate_threads": args.rate_threads, "idle_conns": idle_conns,
                "latency_seconds": args.latency_seconds, "workloads": args.workloads.split(","),
                "idle_conns_requested": args.idle_conns}
    if idle_conns < args.idle_conns:
        log(f"run_all: holding {idle_conns} idle connections, not {args.idle_conns}: the fd hard limit is "
            f"{hard} and cannot be raised here (no CAP_SYS_RESOURCE); a proxy needs 2 fds per connection")
    started = time.monotonic()

    tmp = Path(tempfile.mkdtemp(prefix="sniproxy-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.callback(_remove_pins)
        log(f"run_all: building the load generator and sink in {tmp}")
        bins = native.build(tmp)
        hello_paths = native.write_hellos(tmp)
        hellos = {k: p.read_bytes() for k, p in hello_paths.items()}
        sink = native.Sink(bins["sink"], hello_paths)
        stack.callback(sink.close)
        py = workloads.PyBackends(hellos)
        stack.callback(py.close)
        backends = {**sink.ports, **py.ports}
        bench = workloads.Bench(sink, native.Loadgen(bins["loadgen"], hello_paths), py, hellos)
        machine = machine_facts()
        log(f"run_all: {machine['cpus']} CPUs ({machine['cpu_model']}), Linux {machine['kernel']}, "
            f"background load {machine['background_busy_pct']:.0f}%")
        workers_toml = peers.ours_workers_toml(tmp)
        targets = [t for t in peers.all_targets(workers_toml) if t.key in wanted]
        records = [{**t.describe(), "proxy": t.proxy, "reps": []} for t in targets]
        for rep_no in range(1, args.reps + 1):
            workdir = tmp / f"rep{rep_no}"
            workdir.mkdir()
            for target, record in zip(targets, records):
                log(f"[{rep_no}/{args.reps}] {target.label}")
                rep = run_target(bench, target, workdir, backends, settings)
                record["reps"].append(rep)
                log(f"    {progress_line(rep)}")
        for target, record in zip(targets, records):
            modes = sorted({r.get("relay_mode", "-") for r in record["reps"]})
            record.update(target.describe(), relay_mode="/".join(modes))
        summary = report.summarize(records)
        shortcut = None if args.no_shortcut else run_shortcut(max(args.reps, 3), args.shortcut_gb)
        results = {"shortcut_download": shortcut, "date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"),
                   "machine": machine, "settings": settings, "peer_versions": {
                       p: peers.package_version(p) for p in ("sniproxy", "nginx", "haproxy")},
                   "targets": records, "summary": summary}
        table = report.rows(records, summary)
        print()
        print(report.text_table(table))
        print(_legend(results))
        targets_text = "\n\n".join("\n".join(lines) for lines in (
            report.kernel_path_targets(summary), report.per_connection_targets(summary)) if lines)
        if targets_text:
            print("\n" + targets_text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / now.strftime("%Y%m%d-%H%M%S")
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        stem.with_suffix(".md").write_text(report.markdown_table(table) + "\n\n" + _legend(results) + "\n"
                                           + (f"\n```\n{targets_text}\n```\n" if targets_text else ""))
        print(f"raw results: {stem.with_suffix('.json').relative_to(REPO)} (+ .md)")
        if not args.no_chart:
            out = args.chart or REPO / "docs" / f"bench-{results['date']}.png"
            if not args.chart and out.exists():  # an earlier run today: keep its chart (docs link it)
                out = out.with_name(f"bench-{results['date']}-{now.strftime('%H%M')}.png")
            chart.render(results, out)
            print(f"chart: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
        failures = [(r["label"], name, msg) for r in records for rep in r["reps"]
                    for name, msg in rep.get("errors", {}).items()]
        for label, name, msg in failures:
            print(f"error: {label}: {name}: {msg.splitlines()[0] if msg else ''}")
        print(f"run_all: {time.monotonic() - started:.0f} s")
    return 0


def _legend(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    return (f"\nbest of {s['reps']}; ±: half the range between repetitions, relative to the best; ^ higher is "
            f"better, v lower is better.\nbulk: {s['bulk_seconds']:g} s uploads after a real ClientHello, "
            f"throughput at the sink; rate: {s['clients']} clients, {s['rate_seconds']:g} s, latency = connect "
            f"to 1-byte answer; 1 in flight: the same with one client, {s.get('latency_seconds', 2):g} s; idle: {s['idle_conns']} connections held open (kernel = socket buffers + slab, "
            f"all sockets of the path).\n{m['cpus']} x {m['cpu_model']}, {m['mem_gib']:.0f} GiB, Linux "
            f"{m['kernel']}, Debian {m['debian']}, {results['date']}; background load before the run "
            f"{m['background_busy_pct']:.0f}% (loadavg {' '.join(m['loadavg'])}).")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _remove_pins() -> None:
    for path in glob.glob(f"/sys/fs/bpf/sniproxy-bench-{os.getpid()}-*"):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("run_all: interrupted; everything it started has been stopped")
        sys.exit(130)
