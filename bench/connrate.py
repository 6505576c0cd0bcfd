#!/usr/bin/env python3
"""Only the connection-rate workload of `make bench`, against ONE process of this proxy (with
`--workers auto`, its workers as `make bench` runs them).

For profiling and trimming the per-connection path: the same C load generator and sink, the same
config as bench/run_all.py (access log off unless --access-log), in copy and/or splice mode. Prints
conns/s, p50/p99 latency and proxy CPU microseconds per connection, best of --reps (by CPU per
connection). --profile DIR also runs one extra round under `py-spy record --native` per mode and
writes DIR/<mode>.txt (collapsed stacks) and DIR/<mode>-summary.txt (top functions, self and total).

    .venv/bin/python bench/connrate.py --modes copy,splice --reps 3
    .venv/bin/python bench/connrate.py --modes copy --profile /tmp/prof

Needs root for splice mode. Everything it starts is stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import native, peers, procs, workloads  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Ours(peers.Ours):
    def __init__(self, splice: bool, access_log: bool, cprofile: Path | None = None,
                 tree: Path | None = None, opcount: Path | None = None, workers: str = "1") -> None:
        # [server] workers as `make bench` writes it; "1": no [server] table, one process.
        super().__init__(splice, None if workers == "1" else f'[server]\nworkers = {_toml_workers(workers)}\n\n')
        self.access_log = access_log
        self.cprofile = cprofile
        self.tree = tree
        self.opcount = opcount

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.tree:
            env["PYTHONPATH"] = str(self.tree)  # another copy of the package, for an A/B run
        if self.opcount:
            env["SNIPROXY_OPCOUNT_OUT"] = str(self.opcount)
        return env

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        argv = super().prepare(backends, max_conns)
        if self.access_log:
            text = self.config_path.read_text().replace("access_log = false", "access_log = true")
            self.config_path.write_text(text)
        if self.opcount:
            argv = [argv[0], str(REPO / "bench" / "opcount.py"), *argv[3:]]
        if self.cprofile:
            # Deterministic: call counts per connection (the times are inflated by the profiler).
            argv = [argv[0], "-m", "cProfile", "-o", str(self.cprofile), *argv[1:]]
        return argv


def _toml_workers(workers: str) -> str:
    return f'"{workers}"' if workers == "auto" else str(int(workers))


def _pyspy() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    found = str(candidate) if candidate.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("connrate: --profile needs py-spy (.venv/bin/pip install py-spy)")
    return found


def summarize(collapsed: Path, top: int) -> str:
    """Shares of the event loop thread's samples (helper threads such as c-ares's shutdown thread only
    sleep): per function, self and total (inclusive); and per line of sniproxy/ (the deepest one in
    each stack), which puts each syscall on the line that made it."""
    self_count: collections.Counter[str] = collections.Counter()
    total_count: collections.Counter[str] = collections.Counter()
    line_count: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or "threading.py" in stack:
            continue
        count = int(count_text)
        raw = stack.split(";")
        frames = [_short(f) for f in raw]
        samples += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            total_count[frame] += count
        ours = [f for f in raw if "sniproxy/" in f and "__main__" not in f and "cli.py" not in f]
        line_count[(ours[-1] if ours else "(outside sniproxy: loop, accept, ...)") + " -> " + frames[-1]] += count
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples of the event loop thread", "", "self %   function"]
    lines += [f"{c / samples * 100:6.1f}   {f}" for f, c in self_count.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{c / samples * 100:6.1f}   {f}" for f, c in total_count.most_common(top)]
    lines += ["", "self %   deepest sniproxy line -> leaf"]
    lines += [f"{c / samples * 100:6.1f}   {f}" for f, c in line_count.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)": per function, not per line.
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({os.path.basename(file)})" if file else name


def _target(mode: str, args: argparse.Namespace, tree: Path | None) -> peers.Target:
    """What a mode runs: ours (copy, splice), the Python floor, or nginx (its own defaults: a worker
    per CPU; beside ours for the system calls and perf rounds)."""
    if mode == "floor":
        return peers.PythonFloor(1)
    if mode == "nginx":
        return peers.Nginx(16)
    return _Ours(mode == "splice", args.access_log, tree=tree, workers=args.workers)


def _user_sys(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes, all threads."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / procs.CLK_TCK, system / procs.CLK_TCK


def _switches(pids: list[int]) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of these processes, all threads."""
    counts = [0, 0]
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            counts[0] += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            counts[1] += int(line.split()[1])
    return counts[0], counts[1]


def _one_rate(bench: workloads.Bench, backends: dict[str, int], workdir: Path, mode: str,
              args: argparse.Namespace, tree: Path | None) -> dict[str, Any]:
    target = _target(mode, args, tree)
    workdir.mkdir()
    try:
        target.start(workdir, backends, 1000)
        if mode in ("copy", "splice") and target.relay_mode != mode:
            raise SystemExit(f"connrate: asked for {mode}, the proxy runs {target.relay_mode}: {target.notes}")
        workloads.warm_up(bench, target)
        pids = target.pids()
        before, switches_before = _user_sys(pids), _switches(pids)
        r = workloads.rate(bench, target, args.seconds, args.clients, args.threads)
        after, switches_after = _user_sys(pids), _switches(pids)
    finally:
        target.stop()
    ok = r["ok"] or 1
    r["proxy_user_us_per_conn"] = (after[0] - before[0]) / ok * 1e6
    r["proxy_sys_us_per_conn"] = (after[1] - before[1]) / ok * 1e6
    # A sleep and a wake-up each time a process finds nothing to do (voluntary), a preemption by a
    # woken client or sink on the same CPU (involuntary): on a VM each costs microseconds.
    r["switches_per_conn"] = ((switches_after[0] - switches_before[0]) / ok,
                              (switches_after[1] - switches_before[1]) / ok)
    return r


def rate_watched(bench: workloads.Bench, backends: dict[str, int], workdir: Path, mode: str,
                 args: argparse.Namespace, tool: Any) -> dict[str, Any]:
    """One rate round of a fresh proxy with a tool attached to it (py-spy, strace, perf):
    tool(target) gives the tool's argv; it is stopped with SIGINT (so it writes its output) before
    the proxy stops. The rate workload's result."""
    target = _target(mode, args, None)
    workdir.mkdir()
    try:
        target.start(workdir, backends, 1000)
        workloads.warm_up(bench, target)
        watcher = subprocess.Popen(tool(target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            time.sleep(1.0)  # the tool attaches
            return workloads.rate(bench, target, args.seconds, args.clients, args.threads)
        finally:
            watcher.send_signal(signal.SIGINT)
            try:
                watcher.wait(60)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()
    finally:
        target.stop()


def _describe(r: dict[str, Any]) -> str:
    """One rate round on one line."""
    voluntary, involuntary = r["switches_per_conn"]
    return (f"{r['conns_per_s']:.0f} conns/s, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
            f"proxy {r['proxy_us_per_conn']:.0f} us/conn (user {r['proxy_user_us_per_conn']:.0f}, "
            f"sys {r['proxy_sys_us_per_conn']:.0f}), switches {voluntary:.2f}+{involuntary:.2f}/conn, "
            f"errors {r['errors']}, others {r['cpu']['others_pct']:.0f}%")


def run_mode(bench: workloads.Bench, backends: dict[str, int], tmp: Path, mode: str,
             args: argparse.Namespace) -> dict[str, Any]:
    results = []
    base: list[dict[str, Any]] = []
    for rep in range(1, args.reps + 1):
        if args.compare:
            # Interleaved with the runs of this tree, so a noisy minute on a shared machine hits both.
            base.append(_one_rate(bench, backends, tmp / f"{mode}-{rep}-base", mode, args, args.compare))
            b = base[-1]
            log(f"  {mode} rep {rep} BASE: {_describe(b)}")
        r = _one_rate(bench, backends, tmp / f"{mode}-{rep}", mode, args, None)
        results.append(r)
        log(f"  {mode} rep {rep}: {_describe(r)}")
    if args.profile:
        out = args.profile / f"{mode}.txt"
        rate_watched(bench, backends, tmp / f"{mode}-profile", mode, args, lambda target: [
            _pyspy(), "record", *([] if args.no_native else ["--native"]), "--format", "raw", "--rate",
            str(args.profile_rate), "--pid", str(target.proc.pid), "-o", str(out)])
        if out.exists():
            summary = summarize(out, args.top)
            (args.profile / f"{mode}-summary.txt").write_text(summary)
            log(f"  {mode} profile: {out} and {mode}-summary.txt")
        else:
            log(f"  {mode} profile: py-spy wrote nothing")
    if args.syscalls:
        syscall_counts(bench, backends, tmp, mode, args)
    if args.perf:
        perf_profile(bench, backends, tmp, mode, args)
    if args.cprofile:
        cprofile(bench, backends, tmp, mode, args)
    if args.opcount:
        if args.compare:
            opcount(bench, backends, tmp, mode, args, args.compare)
        opcount(bench, backends, tmp, mode, args)
    best = min(results, key=lambda r: r["proxy_us_per_conn"] or float("inf"))
    row = {"mode": mode, "reps": results, "best_cpu": best,
           "best_rate": max(results, key=lambda r: r["conns_per_s"])}
    if base:
        row["base"] = {"mode": f"{mode}-base", "reps": base,
                       "best_cpu": min(base, key=lambda r: r["proxy_us_per_conn"] or float("inf")),
                       "best_rate": max(base, key=lambda r: r["conns_per_s"])}
    return row


def syscall_counts(bench: workloads.Bench, backends: dict[str, int], tmp: Path, mode: str,
                   args: argparse.Namespace) -> None:
    """One extra round under `strace -c -f`: system calls per connection, all threads (strace slows
    the proxy down a lot: only the counts mean something, not the times)."""
    out = tmp / f"{mode}-strace.txt"
    r = rate_watched(bench, backends, tmp / f"{mode}-strace", mode, args,
                     lambda target: ["strace", "-c", "-f", "-o", str(out),
                                     *(f"-p{pid}" for pid in target.pids())])  # -f follows no earlier fork
    ok = r["ok"] or 1
    log(f"  {mode} system calls per connection ({r['ok']} connections under strace):")
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            calls, name = int(fields[3]), fields[-1]
            if calls / ok >= 0.05:
                log(f"    {calls / ok:7.2f}  {name}")
        elif fields and fields[-1] == "total" and len(fields) >= 4:
            log(f"    {int(fields[2]) / ok:7.2f}  total")


def perf_profile(bench: workloads.Bench, backends: dict[str, int], tmp: Path, mode: str,
                 args: argparse.Namespace) -> None:
    """One extra round under `perf record -g` of the proxy process: where its CPU goes, kernel and
    user, by symbol (the kernel side is what py-spy cannot see: loopback TCP run inside our calls)."""
    args.perf.mkdir(parents=True, exist_ok=True)
    data = args.perf / f"{mode}.perf.data"
    r = rate_watched(bench, backends, tmp / f"{mode}-perf", mode, args, lambda target: [
        "perf", "record", "-q", "-g", "-F", "2000", "-o", str(data), "-p", ",".join(str(p) for p in target.pids())])
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "sym",
                             "--stdio", "-g", "none", "--percent-limit", "0.7"],
                            capture_output=True, text=True).stdout
    (args.perf / f"{mode}-report.txt").write_text(report)
    log(f"  {mode} perf: {r['ok']} connections, {data}, report in {mode}-report.txt")


def opcount(bench: workloads.Bench, backends: dict[str, int], tmp: Path, mode: str,
            args: argparse.Namespace, tree: Path | None = None) -> dict[str, Any]:
    """One extra round under bench/opcount.py: Python bytecodes executed per connection, in total and
    per function (deterministic where time is not: the A/B measure for trimming the path)."""
    # Outside `tmp` (0700): the proxy writes the file after dropping root.
    outdir = Path(tempfile.mkdtemp(prefix="sniproxy-opcount-"))
    outdir.chmod(0o1777)
    out = outdir / "opcount.json"
    target = _Ours(mode == "splice", args.access_log, tree=tree, opcount=out)
    workdir = tmp / f"{mode}-opcount-run{'-base' if tree else ''}"
    workdir.mkdir()
    try:
        target.start(workdir, backends, 1000)
        workloads.warm_up(bench, target)
        time.sleep(0.5)
        target.proc.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
        r = workloads.rate(bench, target, args.seconds, args.clients, args.threads)
        time.sleep(0.5)
        target.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        counted = json.loads(out.read_text())
    finally:
        target.stop()
        shutil.rmtree(outdir, ignore_errors=True)
    ok = r["ok"] or 1
    rows = counted["functions"]
    total = sum(row["opcodes"] for row in rows)
    label = f"{mode}{' BASE' if tree else ''}"
    log(f"  {label}: {total / ok:.0f} Python bytecodes per connection ({r['ok']} connections)")
    roots = [f"{root}/" for root in (REPO, tree) if root is not None]

    def short(path: str) -> str:  # sniproxy/... whichever tree ran
        return next((path[len(root):] for root in roots if path.startswith(root)), path)

    for row in rows[:args.top]:
        log(f"    {row['opcodes'] / ok:8.1f}  {short(row['file'])}:{row['function']}")
    if args.opcount_lines:
        log(f"  {label}: the busiest lines")
        for row in counted["lines"][:args.opcount_lines]:
            log(f"    {row['opcodes'] / ok:8.1f}  {short(row['file'])}:{row['line']}")
    return {"per_conn": total / ok, "rows": rows, "ok": ok}


def cprofile(bench: workloads.Bench, backends: dict[str, int], tmp: Path, mode: str,
             args: argparse.Namespace) -> None:
    """One extra round under cProfile: Python calls per connection, by cumulative and own time."""
    import pstats

    out = args.cprofile / f"{mode}.pstats"
    # The proxy drops root for its own user before it writes this file at exit.
    args.cprofile.mkdir(parents=True, exist_ok=True)
    args.cprofile.chmod(0o1777)
    out.unlink(missing_ok=True)
    target = _Ours(mode == "splice", args.access_log, out)
    workdir = tmp / f"{mode}-cprofile"
    workdir.mkdir()
    try:
        target.start(workdir, backends, 1000)
        workloads.warm_up(bench, target)
        r = workloads.rate(bench, target, args.seconds, args.clients, args.threads)
    finally:
        target.stop()  # SIGTERM: the proxy drains and exits normally, and cProfile writes its file
    log(f"  {mode} cProfile: {r['ok']} connections, {out}")
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(args.top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="copy,splice", help="comma-separated: copy, splice, floor (bench/floor_proxy.py, one process), "
                   "nginx (worker_processes auto)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per mode; the best is reported")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--access-log", action="store_true", help="log one access event per connection")
    p.add_argument("--workers", default="1",
                   help='[server] workers of our proxy: 1 (one process, the default) or "auto" as `make bench`')
    p.add_argument("--profile", type=Path, help="directory for py-spy profiles (one extra round per mode)")
    p.add_argument("--no-native", action="store_true",
                   help="py-spy without --native: does not pause the proxy to unwind C stacks (less skew)")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--syscalls", action="store_true", help="count system calls per connection (strace)")
    p.add_argument("--perf", type=Path, help="directory for a `perf record -g` round per mode (kernel and user)")
    p.add_argument("--opcount", action="store_true",
                   help="count Python bytecodes per connection (bench/opcount.py; with --compare, both trees)")
    p.add_argument("--opcount-lines", type=int, default=0, help="with --opcount: also print this many busiest lines")
    p.add_argument("--cprofile", type=Path, help="directory for a cProfile round per mode (call counts)")
    p.add_argument("--compare", type=Path,
                   help="another source tree (holding sniproxy/) to run interleaved with this one, as BASE")
    p.add_argument("--top", type=int, default=40, help="functions in the profile summary")
    p.add_argument("--summarize", type=Path, help="only print the summary of this collapsed-stack file")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.top), end="")
        return 0
    for directory in (args.profile, args.cprofile):
        if directory:
            directory.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    tmp = Path(tempfile.mkdtemp(prefix="sniproxy-connrate-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        bins = native.build(tmp)
        hello_paths = native.write_hellos(tmp)
        hellos = {k: path.read_bytes() for k, path in hello_paths.items()}
        sink = native.Sink(bins["sink"], hello_paths)
        stack.callback(sink.close)
        # echo/half are never connected to here; any port satisfies the config's routes.
        backends = {**sink.ports, "echo": sink.ports["rate"], "half": sink.ports["rate"]}
        bench = workloads.Bench(sink, native.Loadgen(bins["loadgen"], hello_paths), None, hellos)  # type: ignore[arg-type]
        rows = []
        for mode in args.modes.split(","):
            log(f"{mode}:")
            rows.append(run_mode(bench, backends, tmp, mode, args))
    print(f"\n{'mode':8} {'conns/s':>9} {'p50 us':>8} {'p99 us':>8} {'proxy us/conn':>14} {'user':>6} {'sys':>6}"
          f"   (best of {args.reps}: rate from the fastest rep, CPU from the cheapest)")
    for row in [x for r in rows for x in ([r["base"]] if "base" in r else []) + [r]]:
        r, c = row["best_rate"], row["best_cpu"]
        print(f"{row['mode']:8} {r['conns_per_s']:9.0f} {r['p50_us']:8.0f} {r['p99_us']:8.0f} "
              f"{c['proxy_us_per_conn']:14.0f} {c['proxy_user_us_per_conn']:6.0f} {c['proxy_sys_us_per_conn']:6.0f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("connrate: interrupted")
        sys.exit(130)
