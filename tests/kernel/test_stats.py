# `sniproxy stats` against a real splice-mode proxy: after a transfer the kernel's counters, read by the
# CLI from the pinned maps, equal the bytes the two endpoints counted, per connection and in total.
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from sniproxy import stats
from tests.conftest import free_port
from tests.support.pins import remove_pin_dir
from tests.support import configs
from tests.support.backends import real_client_hello, tls_record_length
from tests.support.proxyproc import REPO


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sniproxy", "stats", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


async def _read_exactly_counting(reader: asyncio.StreamReader, size: int) -> int:
    got = 0
    while got < size:
        chunk = await reader.read(min(1 << 18, size - got))
        if not chunk:
            break
        got += len(chunk)
    return got


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(0, len(data), 1 << 18):
        writer.write(data[i:i + (1 << 18)])
        await writer.drain()


@pytest.fixture
def stats_pin_dir() -> Iterator[str]:
    path = f"/sys/fs/bpf/sniproxy-test-stats-{os.getpid()}"
    yield path
    # dns_cache outlives the proxy on purpose (docs/configuration.md); this test's copy goes too.
    left = remove_pin_dir(path)
    assert set(left) <= {"dns_cache"}, f"the stopped proxy left {left} in {path}"


async def test_stats_json_matches_the_endpoints_byte_counts(start_proxy, stats_pin_dir: str) -> None:
    pin_dir = stats_pin_dir
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    backend = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
    backend_addr = "127.0.0.1:%d" % backend.sockets[0].getsockname()[1]
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [("stats.test", backend_addr)])
                        + configs.common(splice=True, pin_dir=pin_dir))
    try:
        modes = [e for e in proxy.events() if e.get("event") == "relay_mode"]
        assert modes and modes[0]["mode"] == "splice", modes

        before = json.loads(_cli("--pin-dir", pin_dir, "--json").stdout)
        assert before["totals"]["bytes"] == 0 and before["connections"] == []

        hello = real_client_hello("stats.test")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        b_reader, b_writer = await asyncio.wait_for(accepted.get(), 10)
        assert await _read_exactly_counting(b_reader, tls_record_length(hello)) == len(hello)

        # Send nothing more until both sockets are in sock_map: from then on the kernel sees every byte.
        deadline = time.monotonic() + 10
        while (report := stats.collect(pin_dir))["spliced_sockets"] < 2:
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.02)

        up, down = os.urandom(3 * (1 << 20) + 123), os.urandom((1 << 20) + 7)
        _, _, got_up, got_down = await asyncio.wait_for(asyncio.gather(
            _write(writer, up), _write(b_writer, down),
            _read_exactly_counting(b_reader, len(up)), _read_exactly_counting(reader, len(down))), 60)
        assert (got_up, got_down) == (len(up), len(down))

        res = _cli("--pin-dir", pin_dir, "--json")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["totals"]["bytes"] == got_up + got_down
        assert report["totals"]["redir_bytes"] > 0
        assert report["spliced_sockets"] == 2 and report["connections_total"] == 1
        (conn,) = report["connections"]
        assert (conn["bytes_up"], conn["bytes_down"], conn["bytes"]) == (got_up, got_down, got_up + got_down)
        client_side, backend_side = conn["sides"]
        assert client_side["role"] == "client" and backend_side["role"] == "backend"
        assert client_side["remote"] == "%s:%d" % writer.get_extra_info("sockname")
        assert client_side["local"] == f"127.0.0.1:{port}"
        assert backend_side["remote"] == backend_addr

        text = _cli("--pin-dir", pin_dir)
        assert text.returncode == 0, text.stderr
        assert f"spliced bytes   {got_up + got_down} " in text.stdout
        assert f"127.0.0.1:{port}" not in text.stdout.splitlines()[-1]  # ends are the peers, not us
        assert text.stdout.splitlines()[-1].endswith(f"{client_side['remote']} -> {backend_addr}")

        for w in (writer, b_writer):
            w.close()
        (access,) = await proxy.access()
        assert access["relay"] == "splice"
        assert (access["bytes_up"], access["bytes_down"]) == (len(hello) + got_up, got_down)
        after = json.loads(_cli("--pin-dir", pin_dir, "--json").stdout)
        assert after["connections"] == [] and after["spliced_sockets"] == 0
        assert after["totals"]["bytes"] == got_up + got_down
    finally:
        backend.close()
        await backend.wait_closed()
        proxy.stop()


def test_stats_without_pinned_maps_says_why(tmp_path) -> None:
    res = _cli("--pin-dir", str(tmp_path / "none"), "--json")
    assert res.returncode == 1 and res.stdout == ""
    assert "no traffic_stats map pinned at" in res.stderr and "[ebpf] splice = true" in res.stderr


def test_stats_into_a_closed_pipe_ends_without_a_traceback(dataplane) -> None:
    """`sniproxy stats --json | head -c 900` with the reader gone before the write: a real EPIPE
    (the pipe's read end is closed before the CLI starts), exit status 141, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "sniproxy", "stats", "--pin-dir", dataplane.pin_dir,
                                 "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr
    # And through a real `head -c 900`: whatever it keeps is the start of the JSON document.
    shell = subprocess.run(["sh", "-c", f"{sys.executable} -m sniproxy stats --pin-dir {dataplane.pin_dir} "
                            f"--json --top 1000 | head -c 900"], capture_output=True, text=True, cwd=REPO,
                           timeout=60)
    assert shell.returncode == 0 and "Traceback" not in shell.stderr and "Error" not in shell.stderr
    assert shell.stdout.startswith("{")
