# The installed unit under a real systemd: systemd as PID 1 in a systemd-nspawn container whose root is
# an overlay of this machine's own / (tmpfs upper dir) with a private bpffs on /sys/fs/bpf. scripts/
# install.sh runs inside it; the TLS backends run here (the container shares the host's network
# namespace, so loopback works both ways). The container and every mount are removed in finalizers.
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
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


def _no_daemon_starts(box: Container) -> None:
    """Debian maintainer scripts must not start or stop the C sniproxy (it would bind 80/443 of the
    shared network): invoke-rc.d asks policy-rc.d, and 101 means "not allowed"."""
    box.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n")
    box.run("chmod", "755", "/usr/sbin/policy-rc.d")


def _purge_debian_sniproxy(box: Container) -> None:
    status = box.run("dpkg-query", "-W", "-f=${Status}", "sniproxy", check=False).stdout
    if status.endswith((" installed", " config-files")):
        _no_daemon_starts(box)
        box.run("dpkg", "--purge", "sniproxy")


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    box = Container(f"sniproxy-test-{os.getpid()}", nspawn_args=[f"--bind-ro={REPO}"])
    try:
        box.start()
        # `make bench` installs Debian's C sniproxy on this machine (a peer it measures against), and
        # the overlay shows it in here too; install.sh then refuses the unit name (see the last test).
        # These tests are about our unit under its own name: remove theirs, inside the container only.
        _purge_debian_sniproxy(box)
        # A machine that never had the user (this one has it from make setup): install.sh creates it.
        box.run("deluser", "--quiet", "sniproxy")
        res = box.run("bash", "-c", f"cd {REPO} && scripts/install.sh")
        assert "installed /etc/sniproxy/config.toml" in res.stderr
        assert "created system user sniproxy" in res.stderr, res.stderr
        entry = box.run("getent", "passwd", "sniproxy").stdout.strip().split(":")
        assert int(entry[2]) > 0 and entry[6] == "/usr/sbin/nologin", entry
        res = box.run("bash", "-c", f"cd {REPO} && scripts/install.sh")  # idempotent: the user is kept
        assert "created system user" not in res.stderr, res.stderr
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
    assert float(match.group(1)) <= 2.4, res.stdout
    assert re.search(r"✓ User=/DynamicUser=\s+Service runs under a static non-root user identity", res.stdout), \
        res.stdout


def _config(port: int, backend_port: int, workers: str | None = None) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("app.test", f"127.0.0.1:{backend_port}")])
            + configs.common(splice=True, pin_dir="/sys/fs/bpf/sniproxy")
            + (f"\n[server]\nworkers = {workers}\n" if workers else ""))


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
            # The relay rework attaches only the sk_skb verdict (no sk_msg program on spliced sockets).
            assert "splice_verdict" in objects["progs"] and "redirect_msg" not in objects["progs"], objects
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
            # It started with the unit's capabilities and dropped every one before serving.
            caps = (await asyncio.to_thread(c.run, "grep", "CapEff", f"/proc/{props['MainPID']}/status")).stdout
            assert int(caps.split()[1], 16) == 0, caps

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


def _service_processes(c: Container, unit: str = "sniproxy") -> dict[int, dict[str, str]]:
    """/proc/PID/status fields of every process in the unit's cgroup (seen inside the container)."""
    listing = c.run("ps", "-e", "-o", "pid=,unit=").stdout.split("\n")
    pids = [int(line.split()[0]) for line in listing if line.split()[1:] == [f"{unit}.service"]]
    out = {}
    for pid in pids:
        status = c.run("cat", f"/proc/{pid}/status", check=False).stdout
        if status:
            out[pid] = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return out


def _journal(c: Container, *args: str, unit: str = "sniproxy") -> str:
    return c.run("journalctl", "-u", unit, "-o", "cat", "--no-pager", *args).stdout


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_every_process_runs_unprivileged_and_splices(container: Container, ca) -> None:
    """Defects 3 and 4 of issue 15: under the shipped unit capset was blocked by seccomp, so the daemon
    kept CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_NET_BIND_SERVICE (CapEff 000000c000001400), as
    uid 0. Now every process of the service (the supervisor and each worker) has no capability, a
    non-root uid and no_new_privs, and the kernel path still splices: the BPF objects were loaded
    before the drop and the workers inherit them as descriptors."""
    c = container
    backend = await TlsBackend("a", server_context(ca, "app.test")).start()
    port = _low_free_port()
    try:
        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, backend.port, '"auto"'))
        await asyncio.to_thread(c.systemctl, "start", "sniproxy")
        for _ in range(4):
            assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=a alpn=None"
        uid = (await asyncio.to_thread(c.run, "id", "-u", "sniproxy")).stdout.strip()
        procs = await asyncio.to_thread(_service_processes, c)
        assert len(procs) == 3, procs  # "auto" on this 2-CPU machine: the supervisor and 2 workers
        for pid, status in procs.items():
            assert status["CapEff"].strip() == "0000000000000000", (pid, status["CapEff"])
            assert status["CapPrm"].strip() == status["CapAmb"].strip() == "0000000000000000", (pid, status)
            assert status["Uid"].split() == [uid] * 4 and uid != "0", (pid, status["Uid"])
            assert status["NoNewPrivs"].strip() == "1", (pid, status["NoNewPrivs"])
        # pin_dir belongs to the service's user (it unpins there at stop, without any capability).
        assert (c.bpffs / "sniproxy").stat().st_uid == int(uid)
        journal = await asyncio.to_thread(_journal, c)
        this_run = journal.split("Starting sniproxy.service")[-1]
        assert "capabilities_kept" not in this_run and "Operation not permitted" not in this_run, this_run
        (dropped,) = [e for e in _events(this_run) if e["event"] == "capabilities_dropped"]
        assert dropped["after"] == "0x0" and dropped["user"] == "sniproxy" and dropped["no_new_privs"] is True
        access = [e for e in _events(this_run) if e["event"] == "access"]
        assert len(access) == 4 and {e["relay"] for e in access} == {"splice"}, access

        await asyncio.to_thread(c.systemctl, "stop", "sniproxy")
        journal = await asyncio.to_thread(_journal, c)
        this_run = journal.split("Starting sniproxy.service")[-1]
        assert "sniproxy.service: Deactivated successfully." in this_run, this_run
        # Unpinned by the unprivileged daemon itself (only the DNS cache stays pinned, on purpose).
        assert set(os.listdir(c.bpffs / "sniproxy")) == {"dns_cache"}
    finally:
        await asyncio.to_thread(c.systemctl, "stop", "sniproxy", check=False)
        await backend.close()


async def test_a_rejected_reload_fails_the_job_and_says_why(container: Container, ca) -> None:
    """Defect 5 of issue 15: with workers = "auto", `systemctl reload` of a broken file returned 0 and
    Status stayed "workers=2/2 restarts=0". Now the job fails and Status names the error, while the
    previous configuration keeps serving; the next good reload clears it."""
    c = container
    a = await TlsBackend("a", server_context(ca, "app.test")).start()
    b = await TlsBackend("b", server_context(ca, "app.test")).start()
    port = _low_free_port()
    ctx = client_context(ca)
    try:
        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, a.port, '"auto"'))
        await asyncio.to_thread(c.systemctl, "start", "sniproxy")
        broken = _config(port, b.port, '"auto"').replace("max_connections = 10000", "max_connections = 0")
        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", broken)
        res = await asyncio.to_thread(c.systemctl, "reload", "sniproxy", check=False)
        assert res.returncode != 0, res
        assert "Job for sniproxy.service failed" in res.stderr, res.stderr
        status = (await asyncio.to_thread(c.systemctl, "status", "sniproxy", check=False)).stdout
        assert ('Status: "workers=2/2 restarts=0 last_reload=failed: /etc/sniproxy/config.toml: '
                'limits.max_connections: must be >= 1, got 0"') in status, status
        assert "Active: active (running)" in status, status
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"

        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, b.port, '"auto"'))
        await asyncio.to_thread(c.systemctl, "reload", "sniproxy")
        status = (await asyncio.to_thread(c.systemctl, "status", "sniproxy")).stdout
        assert 'Status: "workers=2/2 restarts=0"' in status, status
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"
    finally:
        await asyncio.to_thread(c.systemctl, "stop", "sniproxy", check=False)
        await a.close()
        await b.close()


async def test_journal_priorities_follow_log_levels(container: Container, ca) -> None:
    """Defect 5 of issue 15: every line reached journald at priority 6, so `journalctl -p err` was
    empty. A connection the proxy fails to serve (its backend refuses) is an error there; a served one
    is not; `-o cat` still shows bare JSON lines (journald strips the <N> prefix)."""
    c = container
    backend = await TlsBackend("a", server_context(ca, "app.test")).start()
    port = _low_free_port()
    refuser = socket.socket()  # bound, never listening: a connect to it is refused (connect_failed)
    refuser.bind(("127.0.0.1", 0))
    closed = refuser.getsockname()[1]
    try:
        text = (configs.listener(f"127.0.0.1:{port}")
                + configs.table("default", [("app.test", f"127.0.0.1:{backend.port}"),
                                            ("down.test", f"127.0.0.1:{closed}")])
                + configs.common(splice=True, pin_dir="/sys/fs/bpf/sniproxy") + '\n[server]\nworkers = "auto"\n')
        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", text)
        await asyncio.to_thread(c.systemctl, "start", "sniproxy")
        assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=a alpn=None"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await who("127.0.0.1", port, "down.test", client_context(ca))
        deadline = time.monotonic() + 10
        while True:
            errors = _events(await asyncio.to_thread(_journal, c, "-p", "err"))
            failed = [e for e in errors if e.get("event") == "access" and e.get("sni") == "down.test"]
            if failed or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert len(failed) == 1 and failed[0]["outcome"] == "connect_failed", errors
        assert failed[0]["level"] == "error"
        assert not [e for e in errors if e.get("sni") == "app.test"], errors
        everything = await asyncio.to_thread(_journal, c, "-p", "info")
        served = [e for e in _events(everything) if e.get("event") == "access" and e.get("sni") == "app.test"]
        assert len(served) >= 1, everything[-3000:]
        # No line of the service's own output carries a visible "<N>" prefix.
        assert not re.search(r"^<\d>", everything, re.M), everything[-3000:]
    finally:
        await asyncio.to_thread(c.systemctl, "stop", "sniproxy", check=False)
        await backend.close()
        refuser.close()


DEBS = REPO / ".cache" / "debian-sniproxy"


def test_install_beside_debians_sniproxy_package() -> None:
    """Defect 10 of issue 15: with Debian's C sniproxy installed, our unit in /etc/systemd/system
    shadowed theirs and `systemctl enable sniproxy` ran systemd-sysv-install on their init script.
    The real .deb is installed in a fresh container (never on this machine): `make install` (the same
    scripts/install.sh) refuses and says what to do, installing nothing; UNIT_NAME=sniproxy-ebpf puts
    ours beside theirs, and both units stay what they are."""
    debs = sorted(str(p) for p in DEBS.glob("*.deb"))
    assert any("/sniproxy_" in d for d in debs), f"no Debian sniproxy .deb in {DEBS}: run make setup"
    box = Container(f"sniproxy-deb-{os.getpid()}", nspawn_args=[f"--bind-ro={REPO}"])
    try:
        box.start()
        # Installed from the real .deb (again, when this machine has it already: same result).
        _no_daemon_starts(box)
        box.run("dpkg", "-i", *debs)
        res = box.run("bash", "-c", f"cd {REPO} && make install", check=False)
        assert res.returncode != 0, res.stdout + res.stderr
        assert "Debian's sniproxy (the C proxy) is on this machine and owns the name sniproxy.service" in res.stderr
        assert "install:   /etc/init.d/sniproxy\n" in res.stderr and "Nothing was installed" in res.stderr, res.stderr
        (deb,) = [d for d in debs if "/sniproxy_" in d]
        version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        assert f"install:   Debian package sniproxy {version} (install ok installed)\n" in res.stderr, res.stderr
        assert "make install UNIT_NAME=sniproxy-ebpf" in res.stderr, res.stderr
        assert box.run("test", "-e", "/etc/systemd/system/sniproxy.service", check=False).returncode == 1
        assert box.run("test", "-e", "/opt/sniproxy", check=False).returncode == 1
        assert box.show("sniproxy", "FragmentPath")["FragmentPath"] == "/lib/systemd/system/sniproxy.service"

        res = box.run("bash", "-c", f"cd {REPO} && make install UNIT_NAME=sniproxy-ebpf")
        assert "installed /etc/systemd/system/sniproxy-ebpf.service" in res.stderr, res.stderr
        port = _low_free_port()
        box.write("/etc/sniproxy/config.toml", _config(port, 9))
        rc_links = box.run("sh", "-c", "ls -l /etc/rc*.d").stdout
        res = box.systemctl("enable", "--now", "sniproxy-ebpf")
        assert "SysV" not in res.stderr and "sysv" not in res.stderr, res.stderr  # their init script untouched
        assert box.run("sh", "-c", "ls -l /etc/rc*.d").stdout == rc_links
        assert box.show("sniproxy-ebpf", "ActiveState")["ActiveState"] == "active"
        assert box.show("sniproxy", "FragmentPath")["FragmentPath"] == "/lib/systemd/system/sniproxy.service"
        assert box.show("sniproxy", "ActiveState")["ActiveState"] == "inactive"
        box.systemctl("stop", "sniproxy-ebpf")
    finally:
        box.close()
    assert not box.base.exists()
