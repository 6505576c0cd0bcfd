"""The pin directory (issue 15, defects 7 and 8), with real proxies and a real unprivileged user.

- Two proxies on one pin_dir: the second refuses to start (the first holds a lock), naming the first's
  pid; the first keeps its pins and keeps serving; once it stops, a proxy starts there again.
- A pin_dir an unprivileged user created first (on a bpffs mounted 1777, the kernel's default), or one
  that is group/world-writable, is refused before anything is pinned into it.
- The proxy creates the directory 0700, and the bpffs it mounts itself is 0700.
- A failure while stopping is logged as stop_failed, not start_failed (defect 11)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sniproxy.kernel.probe import probe
from tests.conftest import free_port
from tests.support.backends import TlsBackend, client_context, server_context, who
from tests.support.configs import common, listener, table
from tests.support.proxyproc import REPO, ProxyProcess


@pytest.fixture(scope="module", autouse=True)
def kernel_ok() -> None:
    support = probe()
    assert support.available, f"kernel data plane unavailable here: {support.reason}"


def remove_pins(path: str) -> None:
    """Unpin whatever a test left (a bpffs directory holds only pins and directories)."""
    if not os.path.isdir(path):
        return
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            remove_pins(full)
        else:
            os.unlink(full)
    os.rmdir(path)


def spliced_config(port: int, backend_port: int, pin_dir: str) -> str:
    return (listener(f"127.0.0.1:{port}")
            + table("default", [("app.pin.test", f"127.0.0.1:{backend_port}")])
            + common(splice=True, pin_dir=pin_dir))


def start(tmp_path: Path, name: str, config: str, wait: bool = True) -> ProxyProcess:
    path = tmp_path / f"{name}.toml"
    path.write_text(config)
    proc = ProxyProcess(path, tmp_path / f"{name}.log")
    if wait:
        proc.wait_ready()
    return proc


def exit_code(proc: ProxyProcess, timeout: float = 60.0) -> int:
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(f"proxy did not exit:\n{proc.text()[-3000:]}") from None


@pytest.fixture
def pin_dir() -> Iterator[str]:
    path = f"/sys/fs/bpf/sniproxy-test-pindir-{os.getpid()}"
    try:
        yield path
    finally:
        remove_pins(path)


@pytest.fixture
async def backend(ca) -> Iterator[TlsBackend]:
    b = await TlsBackend("pinned", server_context(ca, "app.pin.test")).start()
    yield b
    await b.close()


# --------------------------------------------------------------------------------------------------
# Defect 7: one pin_dir, one proxy


async def test_a_second_proxy_on_a_live_pin_dir_refuses_to_start(tmp_path, pin_dir, backend, ca):
    first = start(tmp_path, "first", spliced_config(free_port(), backend.port, pin_dir))
    second = None
    try:
        first_port = int(first.wait_for(lambda e: e.get("event") == "listening")[0]["listeners"][0].rsplit(":", 1)[1])
        pins = {name: os.stat(os.path.join(pin_dir, name)).st_ino for name in os.listdir(pin_dir)}
        assert {"sock_map", "traffic_stats", "dns_cache"} <= set(pins)

        second = start(tmp_path, "second", spliced_config(free_port(), backend.port, pin_dir), wait=False)
        assert exit_code(second) == 1
        (failed,) = [e for e in second.events() if e.get("event") == "start_failed"]
        assert pin_dir in failed["error"] and f"in use by another sniproxy (pid {first.proc.pid})" in failed["error"]
        assert not [e for e in second.events() if e.get("event") in ("relay_mode", "listening")]

        # The first one's pins are the same objects, and it still serves through them.
        assert {name: os.stat(os.path.join(pin_dir, name)).st_ino for name in os.listdir(pin_dir)} == pins
        assert await who("127.0.0.1", first_port, "app.pin.test", client_context(ca)) == "backend=pinned alpn=None"
        (event,) = await first.access()
        assert event["outcome"] == "closed" and event["relay"] == "splice"
    finally:
        if second is not None:
            second.stop()
        assert first.stop() == 0
    # The lock went with the first proxy: the directory can be used again.
    third = start(tmp_path, "third", spliced_config(free_port(), backend.port, pin_dir))
    assert third.stop() == 0


# --------------------------------------------------------------------------------------------------
# Defect 8: who owns the pin directory


@pytest.fixture
def open_bpffs() -> Iterator[Path]:
    """A bpffs instance mounted 1777 (the kernel's default mode) where `nobody` can reach it."""
    base = Path(f"/tmp/spx-bpffs-{os.getpid()}")
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    mounted = False
    try:
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=1777", "bpf", str(base)], check=True)
        mounted = True
        assert stat.S_IMODE(os.stat(base).st_mode) & 0o777 == 0o777
        yield base
    finally:
        if mounted:
            subprocess.run(["umount", str(base)], check=True)
        base.rmdir()


def test_a_pin_dir_an_unprivileged_user_made_first_is_refused(tmp_path, open_bpffs):
    pins = open_bpffs / "sniproxy"
    # The attacker: a real unprivileged user creates the directory before the proxy starts.
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                    "mkdir", "-m", "0777", str(pins)], check=True)
    assert os.stat(pins).st_uid == 65534
    proxy = start(tmp_path, "owned", spliced_config(free_port(), 9, str(pins)), wait=False)
    assert exit_code(proxy) == 1, proxy.text()[-3000:]
    (failed,) = [e for e in proxy.events() if e.get("event") == "start_failed"]
    assert "owned by uid 65534" in failed["error"] and str(pins) in failed["error"]
    assert os.listdir(pins) == []  # nothing was pinned where that user could rename or delete it


def test_a_group_or_world_writable_pin_dir_is_refused(tmp_path, pin_dir):
    os.makedirs(pin_dir, mode=0o700)
    os.chmod(pin_dir, 0o770)
    proxy = start(tmp_path, "writable", spliced_config(free_port(), 9, pin_dir), wait=False)
    assert exit_code(proxy) == 1
    (failed,) = [e for e in proxy.events() if e.get("event") == "start_failed"]
    assert "writable by group or others (mode 0770)" in failed["error"]
    assert os.listdir(pin_dir) == []


def test_the_proxy_creates_its_pin_dir_0700(tmp_path, pin_dir):
    assert not os.path.exists(pin_dir)
    proxy = start(tmp_path, "fresh", spliced_config(free_port(), 9, pin_dir))
    try:
        st = os.stat(pin_dir)
        # Created by root, then handed to the proxy's [server] user (it unpins there at stop).
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == pwd.getpwnam("sniproxy").pw_uid
    finally:
        assert proxy.stop() == 0


def test_the_bpffs_the_proxy_mounts_is_0700():
    """In a private mount namespace with no bpffs on /sys/fs/bpf, the proxy's own mount is 0700."""
    script = ("import os, sys\n"
              "from sniproxy.kernel.loader import ensure_bpffs\n"
              "ensure_bpffs('/sys/fs/bpf/sniproxy')\n"
              "types = [l.split()[2] for l in open('/proc/self/mounts') if l.split()[1] == '/sys/fs/bpf']\n"
              "print(types[-1], oct(os.stat('/sys/fs/bpf').st_mode & 0o7777))\n")
    shell = ("while grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; do umount /sys/fs/bpf || exit 3; done; "
             f"exec {sys.executable} -c \"$0\"")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, script],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    fstype, mode = result.stdout.split()
    assert fstype == "bpf" and int(mode, 8) & 0o777 == 0o700, result.stdout


# --------------------------------------------------------------------------------------------------
# Defect 11: a failure on the way out is not a failure to start


def test_a_failure_while_stopping_is_logged_as_stop_failed(tmp_path, pin_dir):
    """A real fault at stop: the traffic_stats pin is replaced by a directory, so unpinning it fails
    (EISDIR). That error must be reported as stop_failed, with exit status 1."""
    proxy = start(tmp_path, "stopping", spliced_config(free_port(), 9, pin_dir))
    try:
        pin = os.path.join(pin_dir, "traffic_stats")
        os.unlink(pin)
        os.mkdir(pin)
    finally:
        code = proxy.stop()
    assert code == 1
    events = [e["event"] for e in proxy.events()]
    assert "stop_failed" in events and "start_failed" not in events, events
    (failed,) = [e for e in proxy.events() if e["event"] == "stop_failed"]
    assert "traffic_stats" in failed["error"]
