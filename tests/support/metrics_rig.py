# Everything the dashboard's queries need data from, for real: a 2-worker proxy in splice mode with
# the kernel DNS cache and the XDP allow-list on the root end of a veth whose other end is in a network
# namespace this rig creates; clients there (an allowed address sending data, a denied one whose SYNs
# XDP drops); a data backend on loopback behind a hostname the test DNS server answers; and a real
# Prometheus scraping the proxy. Used by tests/integration/test_dashboard.py and by
# scripts/dashboard_png.py (docs/dashboard.png). close() removes all of it, whatever failed.
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import threading
from pathlib import Path

from tests.support import configs
from tests.support.backends import DataBackend, pattern_chunks, real_client_hello
from tests.support.dnsserver import DnsServer
from tests.support.netns import netns, sh
from tests.support.prometheus import PrometheusServer
from tests.support.proxyproc import ProxyProcess

SNI = "data.test"
BACKEND_NAME = "data.backend.test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetricsRig:
    def __init__(self, directory: Path) -> None:
        pid = os.getpid()
        self.directory = directory
        self.ns = f"spxm{pid}"
        self.host_if, self.ns_if = f"xm{pid}", f"ym{pid}"
        net = 10 + pid % 240
        self.proxy_ip, self.client_ip, self.denied_ip = (f"10.253.{net}.1", f"10.253.{net}.2",
                                                          f"10.253.{net}.3")
        self.pin_dir = f"/sys/fs/bpf/sniproxy-metrics-{pid}"
        self.port = _free_port()
        self.metrics_port = _free_port()
        self.proxy: ProxyProcess | None = None
        self.prometheus: PrometheusServer | None = None
        self.dns: DnsServer | None = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._backend: DataBackend | None = None
        self._stop = threading.Event()
        self._traffic: list[threading.Thread] = []
        self.completed = 0
        self.denied_attempts = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- setting up ---------------------------------------------------------------------------------

    def _start(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.proxy_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        for ip in (self.client_ip, self.denied_ip):
            sh("ip", "-n", self.ns, "addr", "add", f"{ip}/24", "dev", self.ns_if)
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        self._loop_thread.start()
        self._backend = asyncio.run_coroutine_threadsafe(DataBackend().start(), self._loop).result(10)
        self.dns = DnsServer()
        self.dns.add(BACKEND_NAME, ["127.0.0.1"])
        config = (configs.listener(f"{self.proxy_ip}:{self.port}")
                  + configs.table("default", [(SNI, f"{BACKEND_NAME}:{self._backend.port}")])
                  + configs.common(nameserver=self.dns.address, splice=True, pin_dir=self.pin_dir)
                  + "\n[server]\nworkers = 2\n"
                  + f'\n[metrics]\nbind = "127.0.0.1:{self.metrics_port}"\n'
                  + f'\n[xdp]\nenabled = true\ninterfaces = ["{self.host_if}"]\nmode = "generic"\n'
                  + f'allow = ["{self.client_ip}/32"]\n')
        path = self.directory / "proxy.toml"
        path.write_text(config)
        self.proxy = ProxyProcess(path, self.directory / "proxy.log")
        self.proxy.wait_ready()
        (chosen,) = self.proxy.wait_for(lambda e: e.get("event") == "relay_mode")
        assert chosen["mode"] == "splice", chosen
        self.prometheus = PrometheusServer([f"127.0.0.1:{self.metrics_port}"])
        self.prometheus.wait_scraped()

    # -- traffic ------------------------------------------------------------------------------------

    def _client(self, up: int, down: int, seed: int) -> None:
        # Built before connecting: making a ClientHello loads the CA store, which must not count in
        # the proxy's hello-read phase.
        first = real_client_hello(SNI) + f"{down} {seed}\n".encode()
        with netns(self.ns):
            sock = socket.socket()
        with sock:
            sock.settimeout(30)
            sock.bind((self.client_ip, 0))
            sock.connect((self.proxy_ip, self.port))
            sock.sendall(first)
            for chunk in pattern_chunks(up, seed + 1):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            received = 0
            while data := sock.recv(1 << 18):
                received += len(data)
        if received != down:
            raise AssertionError(f"got {received} of {down} bytes")

    def _denied(self) -> None:
        """One connect from an address outside xdp.allow: XDP drops its SYNs, so it times out."""
        with netns(self.ns):
            sock = socket.socket()
        with sock:
            sock.settimeout(0.3)
            sock.bind((self.denied_ip, 0))
            with contextlib.suppress(OSError):
                sock.connect((self.proxy_ip, self.port))
                raise AssertionError("a denied client got through the XDP allow-list")

    def _run_clients(self, seed: int, pace: float) -> None:
        rng = random.Random(seed)
        n = 0
        while not self._stop.is_set():
            try:
                self._client(rng.randrange(1, 4 << 20), rng.randrange(1, 8 << 20), seed * 100000 + n)
                with self._lock:
                    self.completed += 1
            except Exception as exc:  # noqa: BLE001 - reported by the test, not swallowed
                with self._lock:
                    self.errors.append(repr(exc))
            n += 1
            self._stop.wait(rng.uniform(0, pace))

    def _run_denied(self) -> None:
        while not self._stop.is_set():
            self._denied()
            with self._lock:
                self.denied_attempts += 1
            self._stop.wait(1.0)

    def start_traffic(self, clients: int = 3, pace: float = 0.3, denied: bool = True) -> None:
        """`clients` more client loops (and, with `denied`, a loop of denied connects)."""
        first = len(self._traffic)
        added = [threading.Thread(target=self._run_clients, args=(first + i + 1, pace), daemon=True)
                 for i in range(clients)]
        if denied:
            added.append(threading.Thread(target=self._run_denied, daemon=True))
        self._traffic += added
        for t in added:
            t.start()

    def stop_traffic(self) -> None:
        self._stop.set()
        for t in self._traffic:
            t.join(60)
        self._traffic.clear()

    def reload(self) -> None:
        assert self.proxy is not None
        self.proxy.signal(signal.SIGHUP)

    def kill_a_worker(self) -> None:
        """SIGKILL worker 0 (the supervisor replaces it): for the restarts panel."""
        assert self.proxy is not None
        (started,) = self.proxy.wait_for(lambda e: e.get("event") == "workers_started")
        os.kill(started["pids"][0], signal.SIGKILL)
        self.proxy.wait_for(lambda e: e.get("event") == "worker_restarted")

    # -- tearing down -------------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        for t in self._traffic:
            t.join(60)
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.dns is not None:
            self.dns.close()
        if self._backend is not None:
            asyncio.run_coroutine_threadsafe(self._backend.close(), self._loop).result(10)
        if self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
        self._loop.close()
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        assert not os.path.exists(self.pin_dir), f"{self.pin_dir} left behind"
