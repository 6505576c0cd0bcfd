# Prometheus metrics ([metrics] bind): every metric's definition, the hooks the proxy calls to feed
# them, and the /metrics endpoint. Invariants: with [metrics] absent each hook is one global check and
# prometheus_client is never imported; every label value comes from a closed set (listener names from
# the config, outcomes, relay modes, phases), never from a client (no SNI, no address).
#
# Workers ([server] workers > 1) use prometheus_client's multiprocess mode rather than the supervisor
# collecting from its workers: each worker writes its own counters to mmap'd files in a private
# directory and the supervisor's endpoint sums them at scrape time. That keeps working while a worker
# is dead, stalled or being replaced (a scrape never waits on a worker, and a dead worker's counters
# keep counting in the totals, so no counter ever goes backwards), and it needs no channel of our own.
# The supervisor removes a dead worker's live-gauge files (active connections) when it reaps it, and
# the whole directory when it exits.
#
# The endpoint runs in a thread of the process that loaded the BPF programs (the supervisor, or the
# only process): it holds the kernel objects, and it outlives any worker. Kernel counters are read from
# the pinned maps at scrape time. A fork while that thread is mid-scrape could leave the child with a
# lock held forever (the logger's, prometheus_client's); _scrape_lock is taken around every scrape and
# around every fork (os.register_at_fork), so a worker is never forked in the middle of one.
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog

from sniproxy import __version__

if TYPE_CHECKING:
    from sniproxy.config import Address
    from sniproxy.connection import Connection
    from sniproxy.dataplane import XdpGate
    from sniproxy.relay import RelayResult

log = structlog.get_logger("sniproxy.metrics")

# RelayResult.mode -> the `mode` label. "kernel": the pair was handed to the kernel (sockhash splice);
# the local short-cut will add "shortcut".
RELAY_MODE_LABELS = {"copy": "copy", "splice": "kernel", "kernel": "kernel", "shortcut": "shortcut"}
# Phases a connection goes through before relaying (State names in sniproxy.connection).
PHASES = ("hello", "resolve", "connect")
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                     900.0, 3600.0)


class _Children(dict):  # type: ignore[type-arg]
    """A metric's labelled children by label values, resolved once: labels() validates and locks on
    every call, which was most of a connection's metrics cost (bench/metrics_hooks.py)."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, key: Any) -> Any:
        child = self[key] = self.metric.labels(*key) if isinstance(key, tuple) else self.metric.labels(key)
        return child


class _Metrics:
    """The metric objects of this process (in multiprocess mode, writing to this process's files)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.connections = Counter(
            "sniproxy_connections", "Client connections by listener and how they ended (the access "
            "log's outcome), counted when they end.", ["listener", "outcome"], registry=registry)
        self.active = Gauge(
            "sniproxy_connections_active", "Client connections open now (accepted, not yet closed).",
            ["listener"], registry=registry, multiprocess_mode="livesum")
        self.relayed = Counter(
            "sniproxy_relayed_connections", "Connections that reached the relay, by how they ended "
            '(mode="kernel": handed off to the kernel splice at some point; "copy": copied '
            "throughout).", ["mode"], registry=registry)
        self.bytes = Counter(
            "sniproxy_relay_bytes", "Bytes relayed, by direction (up: client to backend, the "
            "ClientHello included; down: backend to client) and by the path that moved them (kernel: "
            "redirected by the splice verdict; copy: by the proxy), counted when the connection "
            "ends.", ["direction", "mode"], registry=registry)
        self.phase = Histogram(
            "sniproxy_connection_phase_seconds", "Time spent in each phase before relaying, for "
            "connections that completed it: reading the ClientHello (from accept), resolving the "
            "backend, connecting to it.", ["phase"], buckets=_PHASE_BUCKETS, registry=registry)
        self.duration = Histogram(
            "sniproxy_connection_duration_seconds", "Whole life of a client connection, from accept "
            "to close.", buckets=_DURATION_BUCKETS, registry=registry)
        self.dns_lookups = Counter(
            "sniproxy_dns_cache_lookups", "Backend name lookups by whether the DNS cache answered "
            "(hit) or a query was needed (miss).", ["result"], registry=registry)
        self.dns_memory_entries = Gauge(
            "sniproxy_dns_cache_memory_entries", "Names in the in-process DNS caches ([resolver] "
            "kernel_cache off or unavailable; one per worker), as of each one's latest closed "
            "connection.",
            registry=registry, multiprocess_mode="livesum")
        self.reloads = Counter(
            "sniproxy_reloads", "Configuration reloads (SIGHUP) by result; each worker process "
            "reloads, and counts, on its own.", ["result"], registry=registry)
        # 0 is the right start (nothing failed), and every process's file starts at 0: hence
        # "failed" rather than "success", and livemax: 1 while any live process's latest reload failed.
        self.last_reload_failed = Gauge(
            "sniproxy_last_reload_failed", "1 while the latest reload of a live process failed (it "
            "kept its previous configuration); 0 otherwise.", registry=registry,
            multiprocess_mode="livemax")
        self.worker_restarts = Counter(
            "sniproxy_worker_restarts", "Worker processes replaced by the supervisor after they "
            "died or stalled.", registry=registry)
        for outcome in ("success", "failure"):
            self.reloads.labels(outcome)
        for result in ("hit", "miss"):
            self.dns_lookups.labels(result)
        self.active_by = _Children(self.active)
        self.connections_by = _Children(self.connections)
        self.relayed_by = _Children(self.relayed)
        self.bytes_by = _Children(self.bytes)
        self.phase_by = _Children(self.phase)
        self.dns_by = _Children(self.dns_lookups)


_metrics: _Metrics | None = None
_registry: Any = None  # single-process mode: where the metrics are registered
_multiprocess_dir: str | None = None
_owner_pid = 0
_scrape_lock = threading.Lock()
_fork_hooks_installed = False


def enabled() -> bool:
    return _metrics is not None


def enable(workers: int) -> None:
    """Keep metrics in this process from now on (before any fork when workers > 1: the workers
    inherit the choice). Imports prometheus_client."""
    global _metrics, _multiprocess_dir, _owner_pid, _registry
    if _metrics is not None:
        return
    registry = None
    if workers > 1:
        base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        _multiprocess_dir = tempfile.mkdtemp(prefix="sniproxy-metrics-", dir=base)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _multiprocess_dir
        from prometheus_client import values

        # prometheus_client picks its value class when first imported; if something imported it
        # before the directory existed, pick again (metrics made from here on use the new one).
        if not getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.get_value_class()
    else:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)
    _owner_pid = os.getpid()
    _metrics = _Metrics(registry)
    _registry = registry


def shutdown() -> None:
    """In the process that called enable(): forget the metrics and remove the multiprocess files."""
    global _metrics, _multiprocess_dir
    if os.getpid() != _owner_pid:
        return
    _metrics = None
    if _multiprocess_dir is not None:
        shutil.rmtree(_multiprocess_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        _multiprocess_dir = None


# --------------------------------------------------------------------------------------------------
# Hooks: called from the proxy's code; each does nothing when metrics are off.


def connection_opened(listener: str) -> None:
    if _metrics is not None:
        _metrics.active_by[listener].inc()


def connection_closed(conn: Connection, outcome: str, result: RelayResult | None, now: float) -> None:
    """Once per connection that connection_opened() counted, where its access-log event is made.
    `conn.entered`/`conn.held`: when each State was last entered, and how long RESOLVING and
    CONNECTING were held the last time they were left."""
    m = _metrics
    if m is None:
        return
    m.active_by[conn.listener].dec()
    m.connections_by[(conn.listener, outcome)].inc()
    m.duration.observe(now - conn.started)
    entered, held = conn.entered, conn.held
    # hello: accept -> a complete ClientHello (or HTTP head); resolve: the last lookup that led to a
    # connect (none for a unix-socket backend); connect: the connect to the backend that served.
    routing = entered.get("routing")
    if routing is not None:
        m.phase_by["hello"].observe(routing - conn.started)
        if "connecting" in entered and "resolving" in held:
            m.phase_by["resolve"].observe(held["resolving"])
        if "relaying" in entered:
            m.phase_by["connect"].observe(held["connecting"])
    cache = conn.resolver.cache
    if cache.kind == "memory":  # this process's own cache; the kernel one is read at scrape time
        m.dns_memory_entries.set(len(cache))  # type: ignore[arg-type]
    if result is not None:
        m.relayed_by[RELAY_MODE_LABELS.get(result.mode, result.mode)].inc()
        # A connection starts copied and may be handed to the kernel mid-stream: each byte is
        # counted under the path that moved it (what the kernel redirected, the rest copied).
        up_kernel, down_kernel = result.kernel_up, result.kernel_down
        m.bytes_by[("up", "copy")].inc(result.bytes_up - up_kernel)
        # The local-backend short-circuit's bytes (backend -> client, sk_msg) have a path of their own.
        m.bytes_by[("down", "copy")].inc(result.bytes_down - down_kernel - result.shortcut_bytes)
        if result.shortcut_bytes:
            m.bytes_by[("down", "shortcut")].inc(result.shortcut_bytes)
        if up_kernel or down_kernel or result.mode == "splice":
            m.bytes_by[("up", "kernel")].inc(up_kernel)
            m.bytes_by[("down", "kernel")].inc(down_kernel)


def connection_rejected(listener: str, outcome: str) -> None:
    """A connection closed at accept (over a limit): never opened, counted by outcome."""
    if _metrics is not None:
        _metrics.connections_by[(listener, outcome)].inc()


def dns_lookup(hit: bool) -> None:
    if _metrics is not None:
        _metrics.dns_by["hit" if hit else "miss"].inc()


def reload_done(ok: bool) -> None:
    if _metrics is not None:
        _metrics.reloads.labels("success" if ok else "failure").inc()
        _metrics.last_reload_failed.set(0 if ok else 1)


def worker_restarted() -> None:
    if _metrics is not None:
        _metrics.worker_restarts.inc()


def process_gone(pid: int) -> None:
    """The supervisor reaped worker `pid`: its open-connection gauges no longer count."""
    if _multiprocess_dir is not None and os.getpid() == _owner_pid:
        from prometheus_client import multiprocess

        with _scrape_lock:  # a scrape listing the files must not find one gone when it opens it
            multiprocess.mark_process_dead(pid, _multiprocess_dir)


# --------------------------------------------------------------------------------------------------
# Read at scrape time


@dataclass(frozen=True)
class KernelSources:
    """What the serving process can read at scrape time. splice_pin_dir: where the splice maps are
    pinned (None: copy mode); dns_pin_dir: where the kernel DNS cache is (None: memory cache)."""

    relay_mode: str
    splice_pin_dir: str | None = None
    dns_pin_dir: str | None = None
    xdp: XdpGate | None = None


class _ScrapeCollector:
    """Build info and the kernel's own counters, read when Prometheus asks."""

    def __init__(self, sources: KernelSources, workers: int) -> None:
        self.sources = sources
        self.workers = workers
        self.read_errors: dict[str, int] = {"splice": 0, "xdp": 0, "dns_cache": 0}
        self._warned: set[str] = set()
        # Opened now, while the process may still reach the pins: it drops its privileges (and
        # the bpffs directory becomes unreachable) before the first scrape.
        self._splice_fds: dict[str, int] | None = None
        self._dns_cache: Any = None
        if sources.splice_pin_dir is not None:
            with contextlib.suppress(Exception):  # reported at scrape time, by the by-path fallback
                from sniproxy.stats import open_counter_maps

                self._splice_fds = open_counter_maps(sources.splice_pin_dir)
        if sources.dns_pin_dir is not None:
            with contextlib.suppress(Exception):
                from sniproxy.dataplane import pinned_dns_cache

                self._dns_cache = pinned_dns_cache(sources.dns_pin_dir)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        build = GaugeMetricFamily("sniproxy_build_info", "Always 1: what is running.",
                                  labels=["version", "python", "relay_mode"])
        build.add_metric([__version__, platform.python_version(),
                          RELAY_MODE_LABELS.get(self.sources.relay_mode, self.sources.relay_mode)], 1)
        yield build
        yield GaugeMetricFamily("sniproxy_workers", "Worker processes configured ([server] workers).",
                                value=self.workers)
        src = self.sources
        if src.splice_pin_dir is not None:
            yield from self._read("splice", self._splice, (src.splice_pin_dir, self._splice_fds))
        if src.xdp is not None:
            yield from self._read("xdp", self._xdp, src.xdp)
        if src.dns_pin_dir is not None:
            yield from self._read("dns_cache", self._dns, (src.dns_pin_dir, self._dns_cache))
        errors = CounterMetricFamily(
            "sniproxy_metrics_kernel_read_errors", "Scrapes that could not read a kernel map, by map "
            "group (its metrics are missing from that scrape).", labels=["source"])
        for source, count in self.read_errors.items():
            errors.add_metric([source], count)
        yield errors

    def _read(self, source: str, reader: Any, arg: Any) -> list[Any]:
        try:
            return list(reader(arg))
        except Exception as exc:  # never fail the scrape: the other metrics still count
            self.read_errors[source] += 1
            if source not in self._warned:  # once, or a dead map would log every scrape
                self._warned.add(source)
                log.warning("metrics_kernel_read_failed", source=source, error=str(exc))
            return []

    @staticmethod
    def _splice(where: tuple[str, dict[str, int] | None]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from sniproxy.stats import kernel_counters

        k = kernel_counters(*where)
        t = k["traffic"]
        data = CounterMetricFamily(
            "sniproxy_kernel_bytes", "Bytes seen by the splice verdict (traffic_stats): redirected to "
            "the peer by the kernel, passed to the proxy to forward, held back while the peer's queue "
            "was full; trimmed: repeated bytes of partial retransmits cut off (never delivered).",
            labels=["action"])
        for action, field in (("redirected", "redir_bytes"), ("passed", "pass_bytes"),
                              ("held", "held_bytes"), ("trimmed", "trim_bytes")):
            data.add_metric([action], t[field])
        yield data
        packets = CounterMetricFamily(
            "sniproxy_kernel_packets", "Packets (skbs) seen by the splice verdict (traffic_stats), by "
            "what it did with them.", labels=["action"])
        for action, field in (("redirected", "redir_pkts"), ("passed", "pass_pkts"),
                              ("held", "held_pkts"), ("redirect_failed", "redir_fail"),
                              ("no_peer", "no_peer_pkts"), ("fin", "fin_pkts"),
                              ("unknown", "unknown_pkts"), ("trimmed", "trim_pkts"),
                              ("trim_failed", "trim_fail")):
            packets.add_metric([action], t[field])
        yield packets
        events = CounterMetricFamily(
            "sniproxy_kernel_hold_events", "Hold notifications the verdict sent to the proxy's rings "
            "(lost: a ring was full).", labels=["result"])
        events.add_metric(["sent"], t["events"])
        events.add_metric(["lost"], t["events_lost"])
        yield events
        yield GaugeMetricFamily("sniproxy_kernel_pairs", "Connections handed off to the kernel and "
                                "still tracked there (splice_slots pairs).", value=k["pairs"])
        yield GaugeMetricFamily("sniproxy_kernel_sockets", "Sockets in sock_map now.",
                                value=k["sockets"])

    @staticmethod
    def _xdp(gate: XdpGate) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        v = gate.verdicts()
        packets = CounterMetricFamily(
            "sniproxy_xdp_packets", "Packets the XDP allow-list program judged, by action and reason "
            "(not_allowed: a SYN to a gated port from outside xdp.allow; not_gated: other traffic).",
            labels=["action", "reason"])
        packets.add_metric(["pass", "allowed"], v["passed"])
        packets.add_metric(["drop", "not_allowed"], v["dropped"])
        packets.add_metric(["pass", "not_gated"], v["not_gated"])
        yield packets

    @staticmethod
    def _dns(where: tuple[str, Any]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from sniproxy.dataplane import pinned_dns_cache
        from sniproxy.dnscache import now

        pin_dir, kept = where
        # Its own fd and buffers (the event loop's are not shared), opened at start when it could be.
        cache = kept if kept is not None else pinned_dns_cache(pin_dir)
        try:
            at = now()
            live = sum(1 for _, answer in cache.entries() if answer.expires > at)
        finally:
            if cache is not kept:
                cache.close()
        yield GaugeMetricFamily("sniproxy_dns_cache_entries", "Unexpired names in the kernel DNS "
                                "cache (the pinned dns_cache map, shared by every process).", value=live)


# --------------------------------------------------------------------------------------------------
# The endpoint


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line on stderr per scrape would drown the JSON log


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper never holds up the exit


class Endpoint:
    """The running /metrics server."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]  # type: ignore[return-value]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _app(registry: Any) -> Any:
    from prometheus_client import make_wsgi_app

    inner = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        with _scrape_lock:  # the body is built whole in here; sending it needs no lock
            return inner(environ, start_response)

    return app


def _install_fork_hooks() -> None:
    global _fork_hooks_installed
    if _fork_hooks_installed:
        return
    _fork_hooks_installed = True

    def child() -> None:
        _scrape_lock.release()
        server = _serving.get("server")
        if server is not None:
            # The worker must not keep the metrics port open (it would hold it after the supervisor
            # died). close(), never shutdown(): the socket is shared with the parent.
            server.socket.close()
            _serving.clear()

    os.register_at_fork(before=_scrape_lock.acquire, after_in_parent=_scrape_lock.release,
                        after_in_child=child)


_serving: dict[str, Any] = {}


def serve(bind: Address, sources: KernelSources, workers: int) -> Endpoint:
    """Start serving /metrics on `bind` in a thread. enable() first. Raises OSError (port taken)."""
    assert _metrics is not None, "metrics.enable() first"
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if _multiprocess_dir is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, _multiprocess_dir)
    else:
        registry = _registry
    registry.register(_ScrapeCollector(sources, workers))

    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET

    class Server(_ThreadingServer):
        address_family = family
        allow_reuse_address = True

    server = make_server(bind.host, bind.port, _app(registry), Server, handler_class=_QuietHandler)
    _install_fork_hooks()
    _serving["server"] = server
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics_listening", address=f"http://{bind}/metrics",
             mode="multiprocess" if _multiprocess_dir else "single-process")
    return Endpoint(server, thread)


@contextlib.contextmanager
def serving(bind: Address | None, workers: int, sources: KernelSources) -> Iterator[Endpoint | None]:
    """enable() + serve() for the block when [metrics] bind is set; else nothing at all."""
    if bind is None:
        yield None
        return
    enable(workers)
    try:
        endpoint = serve(bind, sources, workers)
    except BaseException:
        shutdown()
        raise
    try:
        yield endpoint
    finally:
        if os.getpid() == _owner_pid:
            endpoint.close()
            _serving.clear()
            shutdown()
