# The Debian package (`make deb`) on a fresh Debian 12 root under a real systemd: `apt install` of the
# built .deb resolves its dependencies from a local file repository (no network in the container), the
# service starts, passes a TLS client to a backend on the host's loopback, reloads, stops, survives a
# reinstall with the operator's config kept, and `apt purge` leaves no unit, user, pin, kernel object
# or program behind. The root is built once and cached (tests/support/debroot.py); the container
# overlays it on tmpfs and everything is removed in finalizers.
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who
from tests.support.debroot import fresh_debian_root
from tests.support.nspawn import Container, bpftool, kernel_objects, low_free_port

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "sniproxy-ebpf"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IN_BOX = "/srv/sniproxy-deb"  # where the built .deb is seen inside the container

pytestmark = pytest.mark.timeout(900)  # the first run builds the .deb and the cached root


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    res = subprocess.run(["make", "-C", str(REPO), "deb", f"OUTDIR={out}"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    (built,) = out.iterdir()
    assert built.name == f"{PACKAGE}_{VERSION}_{arch}.deb"
    assert f"built {built}" in res.stderr
    return built


@pytest.fixture(scope="module")
def box(deb: Path) -> Iterator[Container]:
    root = fresh_debian_root(deb)
    c = Container(f"sniproxy-deb-{os.getpid()}", lower=root, nspawn_args=[f"--bind-ro={deb.parent}:{IN_BOX}"],
                  mask=("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer"))
    try:
        c.start()
        c.run("apt-get", "update", "-q")  # the local file repository only: no network
        yield c
    finally:
        c.close()
    assert not c.base.exists()


def _apt(c: Container, command: str) -> subprocess.CompletedProcess[str]:
    return c.run("bash", "-c", f"cd {IN_BOX} && DEBIAN_FRONTEND=noninteractive {command}", timeout=300)


def _status(c: Container, package: str) -> str:
    """dpkg's status of a package, "" when dpkg has no record of it (never installed, or purged)."""
    res = c.run("dpkg-query", "-W", "-f=${Status}", package, check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def _link_kernel_headers(c: Container) -> None:
    """What scripts/setup.sh does on this VM, whose kernel no Debian headers package matches: point
    /lib/modules/$(uname -r)/{build,source} at the headers the package's Recommends installed."""
    c.run("bash", "-c", 'm=/lib/modules/$(uname -r); mkdir -p "$m" && '
                        'ln -sfn "$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1)" "$m/build" && '
                        'ln -sfn "$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n1)" "$m/source"')


def _config(port: int, backend_port: int) -> str:
    return (configs.listener(f"127.0.0.1:{port}")
            + configs.table("default", [("app.test", f"127.0.0.1:{backend_port}")])
            + configs.common(splice=True, pin_dir="/sys/fs/bpf/sniproxy"))


def _leftovers(c: Container) -> list[str]:
    """Every file of the package's kind still on the container's disk."""
    # /lib is /usr/lib here (merged /usr); deb-systemd-helper's state files are named after the unit.
    out = c.run("bash", "-c", "find /etc /usr /var/lib /run -xdev -name '*sniproxy*' 2>/dev/null; true").stdout
    return sorted(out.split())


async def test_install_serve_reload_stop_purge(box: Container, deb: Path, ca) -> None:
    c = box
    # -- install: the issue's own command; every dependency comes from the local repository
    started = time.monotonic()
    res = await asyncio.to_thread(_apt, c, f"apt install -y ./{deb.name}")
    assert _status(c, PACKAGE) == "install ok installed", res.stdout[-3000:]
    summary = re.search(r"^\d+ upgraded, \d+ newly installed.*$", res.stdout, re.M)
    print(f"apt install ./{deb.name}: {summary and summary.group(0)} in {time.monotonic() - started:.0f} s")
    for dep in ("python3-bpfcc", "procps", "adduser", "bpftool", "linux-headers-amd64"):
        assert _status(c, dep) == "install ok installed", f"{dep} was not pulled in:\n{res.stdout[-3000:]}"
    user = c.run("getent", "passwd", "sniproxy").stdout.strip().split(":")
    assert int(user[2]) < 1000 and user[5] == "/nonexistent" and user[6] == "/usr/sbin/nologin", user
    assert c.run("getent", "group", "sniproxy").stdout.startswith("sniproxy:")
    conffiles = c.run("dpkg-query", "-W", "-f=${Conffiles}", PACKAGE).stdout
    assert re.search(r"^ /etc/sniproxy/config.toml [0-9a-f]{32}$", conffiles, re.M), conffiles
    # Neither enabled nor started by the install: the shipped config is an example to edit first.
    assert c.systemctl("is-enabled", "sniproxy", check=False).stdout.strip() == "disabled"
    assert c.systemctl("is-active", "sniproxy", check=False).stdout.strip() == "inactive"
    res = c.run("systemd-analyze", "verify", "/lib/systemd/system/sniproxy.service")
    assert (res.returncode, res.stderr) == (0, "")
    assert c.run("sniproxy", "--version").stdout.strip() == f"sniproxy {VERSION}"
    # The buffer caps for the unprivileged workers, applied at boot by systemd-sysctl.
    installed_sysctl = c.run("cat", "/usr/lib/sysctl.d/30-sniproxy.conf").stdout
    assert "net.core.wmem_max = 8388608" in installed_sysctl and "net.core.rmem_max = 2097152" in installed_sysctl
    c.run("sniproxy", "check", "-c", "/etc/sniproxy/config.toml")  # the shipped config is valid
    vendored = c.run("cat", f"/usr/share/doc/{PACKAGE}/vendored.txt").stdout
    assert {"uvloop", "aiodns", "pycares", "structlog", "cachetools", "h11", "prometheus_client"} <= {
        line.rsplit("-", 1)[0] for line in vendored.split()}, vendored
    _link_kernel_headers(c)

    # -- start, serve, reload, stop: the operator edits the conffile and enables the unit
    a = await TlsBackend("a", server_context(ca, "app.test")).start()
    b = await TlsBackend("b", server_context(ca, "app.test")).start()
    ctx = client_context(ca)
    port = low_free_port()
    try:
        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, a.port))
        await asyncio.to_thread(c.systemctl, "enable", "sniproxy")
        await asyncio.to_thread(c.systemctl, "start", "sniproxy")
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=a alpn=None"
        objects = kernel_objects(c.bpffs)
        assert "splice_verdict" in objects["progs"], objects
        # The unit's User= is the user the package created: the proxy serves as it.
        main_pid = (await asyncio.to_thread(c.show, "sniproxy", "MainPID"))["MainPID"]
        status = (await asyncio.to_thread(c.run, "cat", f"/proc/{main_pid}/status")).stdout
        assert re.search(rf"^Uid:\s+{user[2]}\s+{user[2]}\s+{user[2]}\s+{user[2]}$", status, re.M), status
        assert {"sock_map", "splice_slots", "dns_cache"} <= set(objects["maps"]), objects

        await asyncio.to_thread(c.write, "/etc/sniproxy/config.toml", _config(port, b.port))
        await asyncio.to_thread(c.systemctl, "reload", "sniproxy")
        assert await who("127.0.0.1", port, "app.test", ctx) == "backend=b alpn=None"
        props = await asyncio.to_thread(c.show, "sniproxy", "NRestarts", "ActiveState")
        assert props == {"NRestarts": "0", "ActiveState": "active"}, props

        await asyncio.to_thread(c.systemctl, "stop", "sniproxy")
        journal = (await asyncio.to_thread(c.run, "journalctl", "-u", "sniproxy", "-o", "cat", "--no-pager")).stdout
        assert '"event": "reloaded"' in journal and '"event": "stopped"' in journal, journal[-3000:]
        for bad in ("Traceback", "Failed with result", "Main process exited"):
            assert bad not in journal, journal[-3000:]
    finally:
        await asyncio.to_thread(c.systemctl, "stop", "sniproxy", check=False)
        await a.close()
        await b.close()

    # -- a reinstall (an upgrade's maintainer-script path) keeps the operator's config and the DNS
    # cache pin, which outlives restarts on purpose
    assert (c.bpffs / "sniproxy" / "dns_cache").exists()
    await asyncio.to_thread(_apt, c, f"apt-get install -y --reinstall ./{deb.name}")
    assert f"127.0.0.1:{b.port}" in c.run("cat", "/etc/sniproxy/config.toml").stdout
    assert (c.bpffs / "sniproxy" / "dns_cache").exists()
    assert c.systemctl("is-enabled", "sniproxy", check=False).stdout.strip() == "enabled"

    # -- purge: nothing of it is left (the same probes first see what is there)
    assert {"/usr/bin/sniproxy", "/etc/sniproxy", "/usr/lib/sniproxy"} <= set(_leftovers(c))
    assert c.run("getent", "passwd", "sniproxy", check=False).returncode == 0
    await asyncio.to_thread(_apt, c, f"apt-get purge -y {PACKAGE}")
    assert _status(c, PACKAGE) == ""
    assert c.run("getent", "passwd", "sniproxy", check=False).returncode == 2
    assert c.run("getent", "group", "sniproxy", check=False).returncode == 2
    assert _leftovers(c) == []
    units = c.systemctl("list-unit-files", "--no-legend", "sniproxy*", check=False).stdout
    assert units.strip() == "", units
    assert not (c.bpffs / "sniproxy").exists(), os.listdir(c.bpffs / "sniproxy")
    for name, prog in objects["progs"].items():
        assert bpftool("prog", "show", "id", str(prog)) is None, f"program {name} ({prog}) still loaded"
    for name, map_id in objects["maps"].items():
        assert bpftool("map", "show", "id", str(map_id)) is None, f"map {name} ({map_id}) still exists"
    procs = c.run("ps", "-eo", "args", "--no-headers").stdout
    assert "sniproxy" not in procs, procs


def test_replaces_debians_own_sniproxy(box: Container, deb: Path) -> None:
    """Debian's C `sniproxy` ships sniproxy.service and a `sniproxy` command too: installing this package
    removes it (Conflicts + Replaces) instead of failing on the shared unit path, and the unit left is ours."""
    c = box
    # Debian's daemon must not start here: its config binds :80 and :443 of the shared network namespace.
    c.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n")
    c.run("chmod", "755", "/usr/sbin/policy-rc.d")
    try:
        _apt(c, "apt-get install -y sniproxy")
        assert _status(c, "sniproxy") == "install ok installed"
        res = _apt(c, f"apt install -y ./{deb.name}")
        assert re.search(r"The following packages will be REMOVED:\s+sniproxy\b", res.stdout), res.stdout
        assert _status(c, "sniproxy") == "deinstall ok config-files"
        assert _status(c, PACKAGE) == "install ok installed"
        assert c.run("test", "-e", "/usr/sbin/sniproxy", check=False).returncode == 1
        unit = c.run("cat", "/lib/systemd/system/sniproxy.service").stdout
        assert "ExecStart=/usr/bin/sniproxy run -c /etc/sniproxy/config.toml" in unit, unit
    finally:
        _apt(c, f"apt-get purge -y {PACKAGE} sniproxy")
        c.run("rm", "-f", "/usr/sbin/policy-rc.d")
    assert _status(c, PACKAGE) == "" and _status(c, "sniproxy") == ""
