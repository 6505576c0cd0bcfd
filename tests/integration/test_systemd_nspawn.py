# The installed unit under a real systemd: systemd as PID 1 in a systemd-nspawn container whose root is
# an overlay of this machine's own / (tmpfs upper dir) with a private bpffs on /sys/fs/bpf. scripts/
# install.sh runs inside it; the TLS backends run here (the container shares the host's network
# namespace, so loopback works both ways). The container and every mount are removed in finalizers.
from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who
from tests.support.nspawn import Container
from tests.support.nspawn import bpftool as _bpftool
from tests.support.nspawn import kernel_objects as _kernel_objects
from tests.support.nspawn import low_free_port as _low_free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    box = Container(f"sniproxy-test-{os.getpid()}", nspawn_args=[f"--bind-ro={REPO}"])
    try:
        box.start()
        res = box.run("bash", "-c", f"cd {REPO} && scripts/install.sh")
        assert "installed /etc/sniproxy/config.toml" in res.stderr
        yield box
    finally:
        box.close()
    assert not box.base.exists()


def test_unit_verifies_and_security_score(container: Container) -> None:
    # The exact README command, where /opt/sniproxy exists: no warnings at all.
    res = container.run("bash", "-c", f"cd {REPO} && systemd-analyze verify systemd/sniproxy.service")
    assert (res.returncode, res.stderr) == (0, "")
    res = container.run("systemd-analyze", "verify", "/etc/systemd/system/sniproxy.service")
    assert (res.returncode, res.stderr) == (0, "")
    res = container.run("systemd-analyze", "security", "--no-pager", "sniproxy.service", check=False)
    match = re.search(r"Overall exposure level for sniproxy.service: (\d+\.\d+)", res.stdout)
    assert match, res.stdout + res.stderr
    print(f"systemd-analyze security sniproxy.service: {match.group(1)}")
    assert float(match.group(1)) <= 3.0, res.stdout


def _config(port: int, backend_port: int) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("app.test", f"127.0.0.1:{backend_port}")])
            + configs.common(splice=True, pin_dir="/sys/fs/bpf/sniproxy"))


async def test_start_reload_stop_cycles(container: Container, ca) -> None:
    a = await TlsBackend("a", server_context(ca, "app.test")).start()
    b = await TlsBackend("b", server_context(ca, "app.test")).start()
    ctx = client_context(ca)
    port = _low_free_port()
    c = container
    try:
        # The operator's config is kept by a second install.
        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, a.port))
        res = await asyncio.to_thread(c.run, "bash", "-c", f"cd {REPO} && scripts/install.sh")
        assert "kept existing /etc/sniproxy/config.toml" in res.stderr
        assert f"127.0.0.1:{a.port}" in (await asyncio.to_thread(c.run, "cat", "/etc/sniproxy/config.toml")).stdout

        for cycle in range(3):
            await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, a.port))
            # Type=notify: `start` returns after READY=1, which comes after bind and BPF load.
            await asyncio.to_thread(c.systemctl, "start", "sniproxy")
            assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"
            objects = _kernel_objects(c.bpffs)
            assert "splice_verdict" in objects["progs"], objects
            assert set(objects["maps"]) >= {"sock_map", "splice_slots", "splice_state", "traffic_stats"}

            await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, b.port))
            # The reload job waits for the daemon's READY=1: the new route is in force on return.
            await asyncio.to_thread(c.systemctl, "reload", "sniproxy")
            assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"

            status = (await asyncio.to_thread(c.systemctl, "status", "sniproxy")).stdout
            # STATUS= is sent with READY=1 and then refreshed every few seconds: accepted is 1 or 2 here.
            assert re.search(r'Status: "relay=splice connections=\d+ accepted=[12] over_limit=0 reloads=1"',
                             status), status
            props = await asyncio.to_thread(c.show, "sniproxy", "MainPID", "NRestarts", "CapabilityBoundingSet")
            assert props["NRestarts"] == "0"
            caps = (await asyncio.to_thread(c.run, "grep", "CapEff", f"/proc/{props['MainPID']}/status")).stdout
            assert int(caps.split()[1], 16) == (1 << 10) | (1 << 12) | (1 << 38) | (1 << 39), caps

            await asyncio.to_thread(c.systemctl, "stop", "sniproxy")
            assert (await asyncio.to_thread(c.systemctl, "is-active", "sniproxy", check=False)).stdout == "inactive\n"
            # An inactive unit may be unloaded at once (its exit status with it): read the journal.
            journal = (await asyncio.to_thread(c.run, "journalctl", "-u", "sniproxy", "-o", "cat",
                                               "--no-pager")).stdout
            this_cycle = journal.split("Starting sniproxy.service")[-1]
            assert '"event": "stopped"' in this_cycle, this_cycle
            assert "sniproxy.service: Deactivated successfully." in this_cycle, this_cycle
            for bad in ("Main process exited", "Failed with result", "Traceback", "egmentation fault"):
                assert bad not in this_cycle, this_cycle
            # Nothing of it is left in the kernel: programs and splice maps are freed. Only the DNS
            # cache map stays pinned on purpose (its entries outlive restarts); nothing is attached to it.
            pins = c.bpffs / "sniproxy"
            assert set(os.listdir(pins) if pins.exists() else []) <= {"dns_cache"}
            for name, prog in objects["progs"].items():
                assert _bpftool("prog", "show", "id", str(prog)) is None, f"program {name} ({prog}) still loaded"
            for name, map_id in objects["maps"].items():
                if name != "dns_cache":
                    assert _bpftool("map", "show", "id", str(map_id)) is None, f"map {name} ({map_id}) still exists"
    finally:
        await asyncio.to_thread(c.systemctl, "stop", "sniproxy", check=False)
        await a.close()
        await b.close()


def test_watchdog_restarts_a_stalled_proxy(container: Container) -> None:
    """WATCHDOG=1 comes from the event loop: a stopped loop gets the service restarted by systemd."""
    c = container
    port = _low_free_port()
    c.write("/etc/sniproxy/config.toml", _config(port, 9))
    c.run("mkdir", "-p", "/run/systemd/system/sniproxy.service.d")
    c.write("/run/systemd/system/sniproxy.service.d/watchdog.conf", "[Service]\nWatchdogSec=2s\nRestartSec=0\n")
    try:
        c.systemctl("daemon-reload")
        c.systemctl("start", "sniproxy")
        time.sleep(3)  # longer than WatchdogSec: the pings keep it alive
        first = c.show("sniproxy", "MainPID", "NRestarts", "WatchdogUSec")
        assert first["NRestarts"] == "0" and first["WatchdogUSec"] == "2s", first
        c.run("kill", "-STOP", first["MainPID"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = c.show("sniproxy", "MainPID", "NRestarts", "ActiveState")
            if now["NRestarts"] == "1" and now["ActiveState"] == "active":
                break
            time.sleep(0.5)
        assert now["NRestarts"] == "1" and now["MainPID"] != first["MainPID"], now
        journal = c.run("journalctl", "-u", "sniproxy", "--no-pager").stdout
        assert "Watchdog timeout" in journal, journal[-3000:]
    finally:
        c.systemctl("stop", "sniproxy", check=False)
        c.run("rm", "-rf", "/run/systemd/system/sniproxy.service.d", check=False)
        c.systemctl("daemon-reload", check=False)
        c.systemctl("reset-failed", "sniproxy", check=False)


def test_reload_returns_only_after_the_daemon_reloaded(container: Container) -> None:
    """systemd 252 ends a reload job when ExecReload= exits; `kill -HUP` alone exits at once (measured:
    ~50 ms while the daemon was stopped). The unit's systemd-notify RELOADING=1 makes the job wait."""
    c = container
    c.write("/etc/sniproxy/config.toml", _config(_low_free_port(), 9))
    try:
        c.systemctl("start", "sniproxy")
        pid = c.show("sniproxy", "MainPID")["MainPID"]
        c.run("kill", "-STOP", pid)
        resume = threading.Timer(1.0, lambda: c.run("kill", "-CONT", pid))
        resume.start()
        started = time.monotonic()
        c.systemctl("reload", "sniproxy")
        took = time.monotonic() - started
        resume.join()
        assert took >= 0.9, f"reload returned after {took:.2f} s, before the stopped daemon could reload"
        journal = c.run("journalctl", "-u", "sniproxy", "-o", "cat", "--no-pager").stdout
        assert '"event": "reloaded"' in journal.rsplit("Started sniproxy.service", 1)[1]
    finally:
        c.systemctl("stop", "sniproxy", check=False)
