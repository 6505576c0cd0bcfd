# [metrics]: a 2-worker proxy's /metrics, scraped by a real Prometheus server (Debian's) while real
# clients run, must count exactly what the clients did (connections, bytes each way, phases, DNS
# lookups) in every relay mode; pass `promtool check metrics`; keep a killed worker's counts and drop
# its open connections; count reloads and worker restarts.
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import urllib.request
from collections import defaultdict
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import DataBackend, pattern_chunks, pattern_digest, real_client_hello
from tests.support.prometheus import PrometheusServer, promtool_check_metrics
from tests.support.workers import until_every_worker_served

WORKERS = "\n[server]\nworkers = 2\n"
SNI = "data.test"
BACKEND_NAME = "data.backend.test"
MODE_LABEL = {"copy": "copy", "splice": "kernel"}


def metrics_section(port: int) -> str:
    return f'\n[metrics]\nbind = "127.0.0.1:{port}"\n'


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] of one scrape."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(scraped: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in scraped.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


@pytest.fixture
def prometheus() -> Iterator[list[PrometheusServer]]:
    started: list[PrometheusServer] = []
    yield started
    for server in started:
        server.stop()


async def exact_client(port: int, up: int, down: int, seed: int, hold: asyncio.Event) -> int:
    """A real ClientHello and the backend's instructions, then (once `hold` is set) `up` pattern
    bytes and a FIN while reading the `down` bytes back. Returns every byte it sent."""
    hello = real_client_hello(SNI)
    spec = f"{down} {seed}\n".encode()
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(hello + spec)
        await writer.drain()
        await hold.wait()

        async def send() -> None:
            for chunk in pattern_chunks(up, seed + 1):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        async def receive() -> bytes:
            import hashlib

            h, n = hashlib.sha256(), 0
            while chunk := await reader.read(1 << 18):
                n += len(chunk)
                h.update(chunk)
            return n, h.hexdigest()

        _, (received, digest) = await asyncio.gather(send(), receive())
        writer.close()
    assert (received, digest) == (down, pattern_digest(down, seed))
    return len(hello) + len(spec) + up


async def _until(predicate, timeout: float = 20.0, what: str = "") -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_counters_match_what_the_clients_did(start_proxy, relay_mode, dns, prometheus):
    dns.add(BACKEND_NAME, ["127.0.0.1"])
    backend = await DataBackend().start()
    try:
        port, metrics_port = free_port(), free_port()
        proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                            + configs.table("default", [(SNI, f"{BACKEND_NAME}:{backend.port}")])
                            + configs.common(nameserver=dns.address) + WORKERS
                            + metrics_section(metrics_port))
        prom = PrometheusServer([f"127.0.0.1:{metrics_port}"])
        prometheus.append(prom)
        await asyncio.to_thread(prom.wait_scraped)
        mode = MODE_LABEL[proxy.expected_relay]

        sizes = [(i * 300_001 + 17, (11 - i) * 200_003 + 5) for i in range(12)]
        n = len(sizes)
        hold = asyncio.Event()
        clients = [asyncio.create_task(exact_client(port, up, down, i, hold))
                   for i, (up, down) in enumerate(sizes)]
        # While every client is connected and waiting: the proxy counts n open connections, and so
        # does Prometheus.
        await _until(lambda: total(samples(scrape(metrics_port)), "sniproxy_connections_active") == n,
                     what=f"{n} active connections")
        await asyncio.to_thread(prom.wait_value, "sum(sniproxy_connections_active)", lambda v: v == n)
        hold.set()
        sent = await asyncio.gather(*clients)
        events = await proxy.access(count=n)
        assert {e["outcome"] for e in events} == {"closed"}

        await asyncio.to_thread(prom.wait_value, 'sum(sniproxy_connections_total{outcome="closed"})',
                                lambda v: v == n)
        await asyncio.to_thread(prom.wait_value, "sum(sniproxy_connections_active)", lambda v: v == 0)
        expected = {
            "sum(sniproxy_connections_total)": n,
            f'sum(sniproxy_connections_total{{listener="127.0.0.1:{port}",outcome="closed"}})': n,
            f'sum(sniproxy_relayed_connections_total{{mode="{mode}"}})': n,
            'sum(sniproxy_relay_bytes_total{direction="up"})': sum(sent),
            'sum(sniproxy_relay_bytes_total{direction="down"})': sum(d for _, d in sizes),
            'sum(sniproxy_connection_phase_seconds_count{phase="hello"})': n,
            'sum(sniproxy_connection_phase_seconds_count{phase="resolve"})': n,
            'sum(sniproxy_connection_phase_seconds_count{phase="connect"})': n,
            "sum(sniproxy_connection_duration_seconds_count)": n,
            "sum(sniproxy_dns_cache_lookups_total)": n,
            "sniproxy_workers": 2,
            "sum(sniproxy_worker_restarts_total)": 0,
        }
        # A scrape may fall between two updates of a worker's last connection: wait for the final
        # state, marked by the last update a connection makes (its bytes down).
        await asyncio.to_thread(prom.wait_value, 'sum(sniproxy_relay_bytes_total{direction="down"})',
                                lambda v: v == sum(d for _, d in sizes))
        got = {expr: await asyncio.to_thread(prom.value, expr) for expr in expected}
        assert got == expected
        if mode == "copy":  # nothing moved by the kernel
            assert await asyncio.to_thread(prom.value, 'sum(sniproxy_relay_bytes_total{mode="kernel"})') is None

        text = scrape(metrics_port)
        check = promtool_check_metrics(text)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check
        s = samples(text)
        # The endpoint itself agrees with what Prometheus stored.
        assert total(s, "sniproxy_relay_bytes_total", direction="up") == sum(sent)
        assert total(s, "sniproxy_relay_bytes_total", direction="down") == sum(d for _, d in sizes)
        assert total(s, "sniproxy_connections_total", outcome="closed") == n
        # Each phase took some time, and no phase longer than the whole connection.
        for phase in ("hello", "resolve", "connect"):
            assert 0 < total(s, "sniproxy_connection_phase_seconds_sum", phase=phase) \
                < total(s, "sniproxy_connection_duration_seconds_sum")
        # Concurrent lookups of one name share one query, but each connection's lookup counts: every
        # query the server saw (one A and one AAAA per query: ipv4_first) follows at least one miss.
        misses = total(s, "sniproxy_dns_cache_lookups_total", result="miss")
        assert misses >= dns.queries[(BACKEND_NAME, "A")] >= 1
        assert dns.queries[(BACKEND_NAME, "AAAA")] == dns.queries[(BACKEND_NAME, "A")]
        (build,) = s["sniproxy_build_info"]
        assert build[0]["relay_mode"] == mode and build[1] == 1
        # Bounded labels only: no client's name or address becomes a label.
        for name, rows in s.items():
            for labels, _ in rows:
                assert not {"sni", "client", "address", "backend", "host"} & set(labels), (name, labels)
                assert not {SNI, BACKEND_NAME} & set(labels.values()), (name, labels)
                assert all("127.0.0.1" not in v for k, v in labels.items() if k != "listener"), (name, labels)

        if relay_mode == "splice":
            # The kernel's own counters, read from the pinned maps at scrape time: every byte after
            # what the proxy read with the ClientHello went through the verdict (redirected or passed).
            kernel = total(s, "sniproxy_kernel_bytes_total", action="redirected") \
                + total(s, "sniproxy_kernel_bytes_total", action="passed")
            moved = sum(sent) + sum(d for _, d in sizes)
            assert moved - n * 65536 <= kernel <= moved, (kernel, moved)
            assert total(s, "sniproxy_kernel_bytes_total", action="redirected") > 0
            # Split by path: what the connections report the kernel redirected is exactly what the
            # verdict counted as redirected; the proxy copied the rest (at least every ClientHello).
            assert total(s, "sniproxy_relay_bytes_total", mode="kernel") \
                == total(s, "sniproxy_kernel_bytes_total", action="redirected")
            assert total(s, "sniproxy_relay_bytes_total", mode="copy", direction="up") \
                >= n * len(real_client_hello(SNI))
            assert total(s, "sniproxy_kernel_pairs") == 0 and total(s, "sniproxy_kernel_sockets") == 0
            assert total(s, "sniproxy_dns_cache_entries") == 1  # one name, in the shared kernel map
        else:
            assert "sniproxy_kernel_bytes_total" not in s
            # One in-process cache per worker that served a connection, each holding the one name.
            workers_used = {e["worker"] for e in events}
            assert total(s, "sniproxy_dns_cache_memory_entries") == len(workers_used)
        assert total(s, "sniproxy_metrics_kernel_read_errors_total") == 0
    finally:
        await backend.close()


async def test_a_killed_worker_keeps_its_counts_and_drops_its_open_connections(start_proxy, prometheus):
    backend = await DataBackend().start()
    try:
        port, metrics_port = free_port(), free_port()
        text = (configs.listener(f"127.0.0.1:{port}")
                + configs.table("default", [(SNI, f"127.0.0.1:{backend.port}")])
                + configs.common() + WORKERS + metrics_section(metrics_port))
        proxy = start_proxy(text)
        (started,) = proxy.wait_for(lambda e: e.get("event") == "workers_started")
        prom = PrometheusServer([f"127.0.0.1:{metrics_port}"])
        prometheus.append(prom)

        done = asyncio.Event()
        done.set()

        async def burst() -> int:
            assert len(await asyncio.gather(*(exact_client(port, 1000, 2000, i, done) for i in range(10)))) == 10
            return 10

        # Whichever worker is killed below, it served some of these first.
        served = len(await until_every_worker_served(proxy, burst))
        await asyncio.to_thread(prom.wait_value, "sum(sniproxy_connections_total)", lambda v: v == served)

        hold = asyncio.Event()
        held = [asyncio.create_task(exact_client(port, 1000, 2000, 100 + i, hold)) for i in range(12)]
        await _until(lambda: total(samples(scrape(metrics_port)), "sniproxy_connections_active") == 12,
                     what="12 active connections")
        # The victim: the worker holding most of them (which worker accepted each is a race).
        holding = _holders(port)
        assert sum(holding.values()) == 12 and set(holding) <= set(started["pids"]), holding
        victim = max(holding, key=holding.__getitem__)
        os.kill(victim, signal.SIGKILL)
        (restarted,) = await proxy.until(lambda e: e.get("event") == "worker_restarted")
        hold.set()
        results = await asyncio.gather(*held, return_exceptions=True)
        lost = sum(1 for r in results if isinstance(r, BaseException))
        assert lost == holding[victim], (holding, results)  # exactly the victim's
        await asyncio.to_thread(prom.wait_value, "sum(sniproxy_connections_active)", lambda v: v == 0)
        # The dead worker's finished connections still count; the ones it took down with it were
        # never counted as ended (it died before their access-log event), the survivors' were.
        await asyncio.to_thread(prom.wait_value, "sum(sniproxy_connections_total)",
                                lambda v: v == served + (12 - lost))
        s = samples(scrape(metrics_port))
        assert total(s, "sniproxy_worker_restarts_total") == 1
        assert total(s, "sniproxy_connections_total") == served + (12 - lost)
        assert total(s, "sniproxy_connections_active") == 0

        # SIGHUP: each worker reloads and counts; a broken file is counted as a failure by each.
        proxy.signal(signal.SIGHUP)
        await asyncio.to_thread(prom.wait_value, 'sum(sniproxy_reloads_total{result="success"})',
                                lambda v: v == 2)
        assert await asyncio.to_thread(prom.value, "max(sniproxy_last_reload_failed)") == 0
        proxy.config_path.write_text(text.replace("[limits]", "[limits]\nbogus = 1"))
        proxy.signal(signal.SIGHUP)
        await asyncio.to_thread(prom.wait_value, 'sum(sniproxy_reloads_total{result="failure"})',
                                lambda v: v == 2)
        await asyncio.to_thread(prom.wait_value, "max(sniproxy_last_reload_failed)", lambda v: v == 1)
        assert restarted["worker"] == started["pids"].index(victim)
    finally:
        await backend.close()


def _holders(port: int) -> dict[int, int]:
    """pid -> how many established client connections to `port` it holds (ss -p)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    holding: dict[int, int] = {}
    for line in out.splitlines():
        for pid in set(re.findall(r"pid=(\d+)", line)):
            holding[int(pid)] = holding.get(int(pid), 0) + 1
    return holding


async def test_connections_refused_over_the_limit_are_counted(start_proxy):
    backend = await DataBackend().start()
    try:
        port, metrics_port = free_port(), free_port()
        proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                            + configs.table("default", [(SNI, f"127.0.0.1:{backend.port}")])
                            + configs.common(limits={"max_connections": 1})
                            + metrics_section(metrics_port))
        hold = asyncio.Event()
        first = asyncio.create_task(exact_client(port, 10, 10, 0, hold))
        await _until(lambda: total(samples(scrape(metrics_port)), "sniproxy_connections_active") == 1,
                     what="one active connection")
        refused = [asyncio.create_task(exact_client(port, 10, 10, i, hold)) for i in range(1, 4)]
        await proxy.until(lambda e: e.get("outcome") == "over_limit", count=3)
        hold.set()
        await first
        assert all(isinstance(r, BaseException) for r in await asyncio.gather(*refused, return_exceptions=True))
        s = samples(scrape(metrics_port))
        assert total(s, "sniproxy_connections_total", outcome="over_limit") == 3
        assert total(s, "sniproxy_connections_total", outcome="closed") == 1
        assert s["sniproxy_workers"] == [({}, 1.0)]
    finally:
        await backend.close()


def test_metrics_bind_in_use_stops_the_start(start_proxy, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proxy = start_proxy(configs.listener(f"127.0.0.1:{free_port()}")
                            + configs.table("default", [(SNI, "127.0.0.1:9")])
                            + configs.common() + metrics_section(busy), wait=False)
        assert proxy.proc.wait(30) == 1
        (failed,) = proxy.wait_for(lambda e: e.get("event") == "start_failed")
        assert "in use" in failed["error"], failed
