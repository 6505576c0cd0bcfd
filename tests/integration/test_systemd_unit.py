# The shipped unit file, checked by systemd's own tools on this machine (no running systemd needed):
# `systemd-analyze verify` without a single warning, and the offline security review's exposure score.
# tests/integration/test_systemd_nspawn.py runs the same checks against the installed unit in a container.
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "sniproxy.service"


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with /opt/sniproxy pointing at this checkout's venv: verify checks that ExecStart's binary
    exists, and /opt/sniproxy exists only after `make install`. Nothing else in the file changes."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "sniproxy").symlink_to(Path(sys.executable).parent / "sniproxy")
    path = tmp_path / "sniproxy.service"
    path.write_text(UNIT.read_text().replace("/opt/sniproxy", str(prefix)))
    return path


def test_verify_has_no_warnings(unit_copy: Path) -> None:
    # A parse error is only a warning with exit code 0: stderr must be empty as well.
    res = subprocess.run(["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True)
    assert (res.returncode, res.stderr) == (0, "")


def test_offline_security_exposure(unit_copy: Path) -> None:
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_copy)],
                         capture_output=True, text=True)
    match = re.search(r"Overall exposure level for sniproxy.service: (\d+\.\d+)", res.stdout)
    assert match, res.stdout + res.stderr
    assert float(match.group(1)) <= 2.5, res.stdout  # 2.3 in the container (test_systemd_nspawn)


def _service_section() -> dict[str, list[str]]:
    # Not configparser: systemd allows repeated keys (ExecReload=), which it rejects.
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_contract() -> None:
    """What the daemon relies on: notify readiness, SIGHUP reload that waits and fails on a rejected
    file, restarts, the watchdog, an unprivileged user with the measured start-up capabilities (and
    capset allowed, to drop them), and enough descriptors for the default max_connections."""
    service = _service_section()
    assert service["Type"] == ["notify"]
    assert service["ExecReload"] == ["/bin/systemd-notify RELOADING=1", "/bin/kill -HUP $MAINPID",
                                     "/opt/sniproxy/bin/sniproxy check -c /etc/sniproxy/config.toml"]
    assert service["NotifyAccess"] == ["exec"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] == ["30s"]
    caps = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_NET_BIND_SERVICE", "CAP_DAC_OVERRIDE"}
    assert set(service["CapabilityBoundingSet"][0].split()) == caps
    assert set(service["AmbientCapabilities"][0].split()) == caps
    assert service["User"] == service["Group"] == ["sniproxy"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert "capset" in service["SystemCallFilter"][-1].split()
    assert int(service["LimitNOFILE"][0]) >= 2 * 10000 + 64
    assert service["ExecStart"] == ["/opt/sniproxy/bin/sniproxy run -c /etc/sniproxy/config.toml"]
