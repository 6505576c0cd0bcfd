# Shared fixtures: a CA for real certificates, a real DNS server on loopback, and the real proxy as a
# child process. Every fixture that starts something stops it in its finalizer, pass or fail.
from __future__ import annotations

import os
import shutil
import socket
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trustme

from tests.support.dnsserver import DnsServer
from tests.support.proxyproc import ProxyProcess


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


StartProxy = Callable[..., ProxyProcess]

# How the end-to-end proxy moves bytes. Tests that take the `relay_mode` fixture run once per mode:
# "copy" ([ebpf] splice = false), "splice" (the real kernel data plane), and "nocap" (splice asked
# for, but the process lacks CAP_BPF/CAP_SYS_ADMIN, so it must fall back and say why in one line).
RELAY_MODES = ("copy", "splice", "nocap")
_NO_BPF_CAPS = ["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--inh-caps=-all", "--"]


@pytest.fixture(params=RELAY_MODES)
def relay_mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def start_proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartProxy]:
    """start_proxy(config_text, env=None, wait=True) -> a running ProxyProcess, stopped at teardown.

    With the `relay_mode` fixture in the test, the config's `[ebpf]` section is set for that mode
    and `proxy.expected_relay` says which relay the access log must show."""
    started: list[ProxyProcess] = []
    pin_dirs: list[Path] = []
    mode = request.getfixturevalue("relay_mode") if "relay_mode" in request.fixturenames else None

    def start(config_text: str, env: dict[str, str] | None = None, wait: bool = True,
              argv_prefix: list[str] | None = None) -> ProxyProcess:
        n = len(started)
        text = textwrap.dedent(config_text)
        prefix = list(argv_prefix or [])
        if mode in ("splice", "nocap"):
            pin_dir = Path(f"/sys/fs/bpf/sniproxy-e2e-{os.getpid()}-{n}")
            pin_dirs.append(pin_dir)
            assert "splice = false" in text, "relay_mode tests must build their config with configs.common()"
            # Hand every connection to the kernel at once: these runs test the kernel path with
            # the short exchanges of the e2e tests (tests/kernel/test_handoff.py: the threshold).
            text = text.replace("splice = false", f'splice = true\nsplice_after = 0\npin_dir = "{pin_dir}"')
            # The kernel DNS cache too: those runs exercise the whole BPF side, not just the splice.
            text = text.replace("kernel_cache = false", "kernel_cache = true")
            if mode == "nocap":
                prefix = _NO_BPF_CAPS + prefix
        config_path = tmp_path / f"proxy{n}.toml"
        config_path.write_text(text)
        proxy = ProxyProcess(config_path, tmp_path / f"proxy{n}.log", env=env, argv_prefix=prefix)
        proxy.expected_relay = "splice" if mode == "splice" else "copy"
        started.append(proxy)
        if wait:
            proxy.wait_ready()
            if mode is not None:
                (chosen,) = proxy.wait_for(lambda e: e.get("event") == "relay_mode")
                assert chosen["mode"] == proxy.expected_relay, chosen
                if mode == "nocap":
                    assert "CAP_BPF" in chosen["reason"] or "capabilit" in chosen["reason"], chosen
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    for pin_dir in pin_dirs:
        # The proxy unpins its splice maps on exit; the DNS cache is pinned to outlive restarts.
        shutil.rmtree(pin_dir, ignore_errors=True)
        assert not pin_dir.exists(), f"{pin_dir} left behind"


# -- no silent skips ------------------------------------------------------------------------------
# Kernel and splice tests are real tests here (root, a BPF-capable kernel): a skipped one would hide
# a broken data plane behind a green run. Any skip fails the session unless SNIPROXY_ALLOW_SKIPS=1
# (for a laptop without root), and the skip reasons are printed either way.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # An xfail is reported as skipped too; it is a known, strict failure, not a silent skip.
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("SNIPROXY_ALLOW_SKIPS") != "1" and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:  # noqa: ANN001 - pytest hook
    if _skipped:
        terminalreporter.write_line(
            f"{len(_skipped)} test(s) skipped; skips fail this suite (SNIPROXY_ALLOW_SKIPS=1 allows them): "
            + ", ".join(_skipped[:10]), red=True)
