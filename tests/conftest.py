# Shared fixtures: a CA for real certificates, a real DNS server on loopback, and the real proxy as a
# child process. Every fixture that starts something stops it in its finalizer, pass or fail.
from __future__ import annotations

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


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """start_proxy(config_text, env=None, wait=True) -> a running ProxyProcess, stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(config_text: str, env: dict[str, str] | None = None, wait: bool = True,
              argv_prefix: list[str] | None = None) -> ProxyProcess:
        n = len(started)
        config_path = tmp_path / f"proxy{n}.toml"
        config_path.write_text(textwrap.dedent(config_text))
        proxy = ProxyProcess(config_path, tmp_path / f"proxy{n}.log", env=env, argv_prefix=argv_prefix)
        started.append(proxy)
        if wait:
            proxy.wait_ready()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
