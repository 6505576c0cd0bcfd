# The things the benchmark measures: direct (no proxy), this proxy (splice and copy), and the peers
# from Debian (sniproxy, nginx stream + ssl_preread, HAProxy on req.ssl_sni), each started in the
# foreground from its own config in the run's temp dir, never a system config or service.
# Invariant: a started target is stopped by stop(), which kills its whole process group.
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.native import SERVICES, sni

REPO = Path(__file__).resolve().parents[1]
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """A LISTEN socket on 127.0.0.1:port or *:port (read from /proc, so nothing connects to it)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(want) and fields[3] == "0A":
                    return True
    return False


def package_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() or "not installed"


class Target:
    key = "?"
    label = "?"
    peer = False          # counts towards "best peer"
    workloads: tuple[str, ...] | None = None  # the only workloads run against it; None: every one
    proxy = True          # False only for direct
    relay_mode = "-"
    version = ""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def start(self, tmp: Path, backends: dict[str, int], max_conns: int) -> None:
        raise NotImplementedError

    def port(self, service: str) -> int:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def kernel_totals(self) -> dict[str, int] | None:
        return None

    def stop(self) -> None:
        pass

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "peer": self.peer, "relay_mode": self.relay_mode,
                "version": self.version, "notes": self.notes}


class Direct(Target):
    key, label, proxy = "direct", "direct", False

    def start(self, tmp: Path, backends: dict[str, int], max_conns: int) -> None:
        self.backends = backends

    def port(self, service: str) -> int:
        return self.backends[service]


class ProcessTarget(Target):
    """A proxy run as one foreground process (plus whatever it forks) listening on one port."""

    argv: list[str]
    log_path: Path

    def start(self, tmp: Path, backends: dict[str, int], max_conns: int) -> None:
        self.listen_port = free_port()
        self.dir = tmp / self.key
        self.dir.mkdir()
        self.log_path = self.dir / "output.log"
        self.argv = self.prepare(backends, max_conns)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.dir, env=self.env(), start_new_session=True,
                                     preexec_fn=procs.die_with_parent)
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} not listening after 60 s:\n{self.log_tail()}")
            time.sleep(0.05)

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return listening(self.listen_port)

    def port(self, service: str) -> int:
        return self.listen_port

    def pids(self) -> list[int]:
        return procs.tree(self.proc.pid) if self.proc.poll() is None else []

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if getattr(self, "proc", None) is not None:
            procs.stop_group(self.proc, grace=10.0)
            self._log.close()


class Ours(ProcessTarget):
    """`python -m sniproxy run` from this repo, splice or copy, no access log. With `queue_limit`
    (splice only): the ceiling of the kernel path, a queue limit no stream reaches, so the verdict never
    holds and userspace never copies a byte after the hand-off; kernel memory is then unbounded, so it
    is measured on bulk transfers only and never shipped."""

    peer = False

    def __init__(self, splice: bool, workers_toml: str | None = None, queue_limit: int | None = None) -> None:
        super().__init__()
        self.splice = splice
        self.queue_limit = queue_limit
        self.key = "ours-splice" if splice else "ours-copy"
        self.label = "sniproxy (ours) splice" if splice else "sniproxy (ours) copy"
        if queue_limit is not None:
            self.key, self.label, self.workloads = "ours-unbounded", "ours splice, unbounded queue (ceiling)", ("bulk",)
        self.workers_toml = workers_toml
        self.pin_dir = f"/sys/fs/bpf/sniproxy-bench-{os.getpid()}-{self.key}"
        self.version = _git_version()

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(ours_config(self.listen_port, backends, max_conns, self.splice,
                                                self.pin_dir, self.workers_toml, self.queue_limit))
        return [sys.executable, "-m", "sniproxy", "run", "-c", str(self.config_path)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(REPO)
        return env

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def ready(self) -> bool:
        events = self.events()
        if not any(e.get("event") == "listening" for e in events):
            return False
        modes = [e for e in events if e.get("event") == "relay_mode"]
        if modes:
            self.relay_mode = modes[-1].get("mode", "?")
            if modes[-1].get("reason"):
                self.note(f"relay_mode {self.relay_mode}: {modes[-1]['reason']}")
        else:
            self.relay_mode = "unlogged"
        if self.workers_toml:
            self.note(f"workers: {self.workers_toml.strip()}")
        return listening(self.listen_port)

    def kernel_totals(self) -> dict[str, int] | None:
        """The splice program's byte counters (`sniproxy stats`), to show how much of a workload the
        kernel really moved; None in copy mode or when they cannot be read."""
        if self.relay_mode != "splice":
            return None
        result = subprocess.run([sys.executable, "-m", "sniproxy", "stats", "--pin-dir", self.pin_dir, "--json",
                                 "--top", "0"], cwd=REPO, env=self.env(), capture_output=True, text=True)
        try:
            return json.loads(result.stdout)["totals"] if result.returncode == 0 else None
        except (json.JSONDecodeError, KeyError):
            return None

    def stop(self) -> None:
        super().stop()
        if os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir, ignore_errors=True)


def _git_version() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True)
    return result.stdout.strip() or "unknown"


def ours_config(port: int, backends: dict[str, int], max_conns: int, splice: bool, pin_dir: str,
                workers_toml: str | None, queue_limit: int | None = None) -> str:
    routes = "".join(f'  {{ match = "{sni(s)}", backend = "127.0.0.1:{backends[s]}" }},\n' for s in SERVICES)
    return (
        (workers_toml or "")
        + f'[[listener]]\nbind = "127.0.0.1:{port}"\nprotocol = "tls"\ntable = "bench"\n\n'
        + f"[table.bench]\nroutes = [\n{routes}]\n\n"
        + "[limits]\nclient_hello_timeout = 10.0\nconnect_timeout = 5.0\nidle_timeout = 600.0\n"
        + f"max_connections = {max_conns + 100}\nshutdown_grace = 1.0\n\n"
        + '[log]\nformat = "json"\nlevel = "info"\naccess_log = false\n\n'
        + f'[ebpf]\nsplice = {"true" if splice else "false"}\npin_dir = "{pin_dir}"\n'
        + (f"queue_limit = {queue_limit}\n" if queue_limit is not None else "")
    )


# Where a worker count lives in our config ([server] workers, from session 3 on); older checkouts
# without it are benchmarked as one process (the first candidate `sniproxy check` accepts is used).
WORKER_CANDIDATES = ('[server]\nworkers = "auto"\n\n',)


def ours_workers_toml(tmp: Path) -> str | None:
    """The TOML that asks our proxy for one worker per core, if this version of it has that setting."""
    for candidate in WORKER_CANDIDATES:
        path = tmp / "workers-probe.toml"
        path.write_text(ours_config(free_port(), {s: 9 for s in SERVICES}, 100, False, "/sys/fs/bpf/x", candidate))
        result = subprocess.run([sys.executable, "-m", "sniproxy", "check", "-c", str(path)], cwd=REPO,
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if result.returncode == 0:
            return candidate
    return None


def _sniproxy_regex(name: str) -> str:
    return "^" + name.replace(".", "\\\\.") + "$"


class DebianSniproxy(ProcessTarget):
    """Debian's C sniproxy, in the foreground (its packaged unit forks)."""

    key, label, peer = "sniproxy-c", "Debian sniproxy", True

    def __init__(self) -> None:
        super().__init__()
        self.version = package_version("sniproxy")

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        # Table keys are PCREs, and the config parser itself unescapes one level of backslashes.
        table = "".join(f"    {_sniproxy_regex(sni(s))} 127.0.0.1:{backends[s]}\n" for s in SERVICES)
        conf = self.dir / "sniproxy.conf"
        conf.write_text(
            "error_log {\n"
            f"    filename {self.dir}/error.log\n"
            "    priority notice\n"
            "}\n\n"
            f"listener 127.0.0.1:{self.listen_port} {{\n"
            "    protocol tls\n"
            "    table bench\n"
            "}\n\n"
            f"table bench {{\n{table}}}\n")
        return ["/usr/sbin/sniproxy", "-f", "-c", str(conf)]


class Nginx(ProcessTarget):
    """nginx stream module with ssl_preread choosing the upstream by SNI."""

    peer = True

    def __init__(self, buffer_kib: int = 16) -> None:
        super().__init__()
        self.buffer_kib = buffer_kib
        self.key = "nginx" if buffer_kib == 16 else f"nginx-{buffer_kib}k"
        self.label = "nginx" if buffer_kib == 16 else f"nginx {buffer_kib}K buf"
        self.version = package_version("nginx")

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        nofile = min(procs.nofile_hard(), 65536)  # nginx preallocates worker_connections
        entries = "".join(f"        {sni(s)} 127.0.0.1:{backends[s]};\n" for s in SERVICES)
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"load_module {NGINX_STREAM_MODULE};\n"
            "worker_processes auto;\n"
            f"worker_rlimit_nofile {nofile};\n"
            f"pid {self.dir}/nginx.pid;\n"
            f"error_log {self.dir}/error.log notice;\n"
            f"events {{\n    worker_connections {nofile - 100};\n}}\n"
            "stream {\n"
            "    map $ssl_preread_server_name $backend {\n"
            f"{entries}"
            "    }\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.listen_port};\n"
            "        ssl_preread on;\n"
            "        proxy_pass $backend;\n"
            f"        proxy_buffer_size {self.buffer_kib}k;\n"
            "        proxy_timeout 600s;\n"
            "    }\n"
            "}\n")
        return ["/usr/sbin/nginx", "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(conf),
                "-g", "daemon off;"]


class Haproxy(ProcessTarget):
    """HAProxy in TCP mode, use_backend on req.ssl_sni after inspecting the ClientHello."""

    peer = True

    def __init__(self, bufsize_kib: int | None = None) -> None:
        super().__init__()
        self.bufsize_kib = bufsize_kib
        self.key = "haproxy" if bufsize_kib is None else f"haproxy-{bufsize_kib}k"
        self.label = "HAProxy" if bufsize_kib is None else f"HAProxy {bufsize_kib}K buf"
        self.version = package_version("haproxy")

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        # Two fds per connection must fit under the hard fd limit (haproxy checks it at start).
        maxconn = (min(procs.nofile_hard(), 65536) - 200) // 2
        tune = f"    tune.bufsize {self.bufsize_kib * 1024}\n" if self.bufsize_kib else ""
        uses = "".join(f"    use_backend be_{s} if {{ req.ssl_sni -i {sni(s)} }}\n" for s in SERVICES)
        bes = "".join(f"backend be_{s}\n    server s1 127.0.0.1:{backends[s]}\n\n" for s in SERVICES)
        conf = self.dir / "haproxy.cfg"
        conf.write_text(
            "global\n"
            f"    maxconn {maxconn}\n"
            f"{tune}"
            "\ndefaults\n"
            "    mode tcp\n"
            f"    maxconn {maxconn}\n"
            "    timeout connect 5s\n"
            "    timeout client 600s\n"
            "    timeout server 600s\n"
            "\nfrontend fe\n"
            f"    bind 127.0.0.1:{self.listen_port}\n"
            "    tcp-request inspect-delay 5s\n"
            "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
            f"{uses}\n"
            f"{bes}")
        return ["/usr/sbin/haproxy", "-f", str(conf), "-db"]


class PythonFloor(ProcessTarget):
    """bench/floor_proxy.py: the least a Python SNI proxy on uvloop does per connection (no checks,
    limits, deadlines or log), one process per core. Not a peer: the floor beside ours, so a
    per-connection target below it is a target no trimming of our Python code can reach."""

    key, label = "python-floor", "Python floor (no checks)"
    workloads = ("rate", "latency")

    def __init__(self, processes: int | None = None) -> None:
        super().__init__()
        self.processes = processes or os.cpu_count() or 1

    def prepare(self, backends: dict[str, int], max_conns: int) -> list[str]:
        routes = [f"{sni(s)}={backends[s]}" for s in SERVICES]
        return [sys.executable, str(REPO / "bench" / "floor_proxy.py"), str(self.processes),
                str(self.listen_port), *routes]


def all_targets(workers_toml: str | None) -> list[Target]:
    return [Direct(), Ours(True, workers_toml), Ours(False, workers_toml), Ours(True, workers_toml, UNBOUNDED),
            PythonFloor(), DebianSniproxy(), Nginx(16), Nginx(256), Haproxy(None), Haproxy(256)]


UNBOUNDED = 1 << 40  # [ebpf] queue_limit's maximum: 1 TiB, which no benchmark stream reaches
