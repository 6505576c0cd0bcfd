# The short-circuit end to end: the real proxy (`sniproxy run`, [ebpf] shortcut_cgroup) in front of a
# real nginx TLS backend from Debian running in a throwaway cgroup, fetched with curl, a 200 MB file
# once with sendfile and once without. nginx is non-blocking and edge-triggered, so its connections
# are captured and then kept on the loopback path (see ebpf/shortcut.c): the transfers must complete
# byte-exact, and the access log and `sniproxy stats` must say so. After the proxy stops nothing is
# attached to the cgroup.
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support import configs
from tests.support.proxyproc import REPO, ProxyProcess

from . import cgroups
from .test_shortcut import bpftool_cgroup

SIZE = 200 << 20  # 200 MiB
NAME = "shortcut.test"


@pytest.fixture(scope="module")
def site() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sniproxy-nginx-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "www").mkdir(mode=0o755)
    block = os.urandom(1 << 20)
    with open(root / "www" / "big.bin", "wb") as f:
        for _ in range(SIZE // len(block)):
            f.write(block)
    (root / "www" / "big.bin").chmod(0o644)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}", "-keyout", str(root / "key.pem"),
                    "-out", str(root / "cert.pem")], check=True, capture_output=True)
    try:
        yield root
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _nginx_conf(root: Path, port_sendfile: int, port_plain: int) -> Path:
    temp = root / "tmp"
    temp.mkdir(exist_ok=True)
    servers = "".join(f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {root}/cert.pem;
        ssl_certificate_key {root}/key.pem;
        root {root}/www;
        sendfile {flag};
    }}""" for port, flag in ((port_sendfile, "on"), (port_plain, "off")))
    conf = root / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{servers}
}}
""")
    return conf


def _wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_curl_through_the_proxy_to_nginx_in_a_cgroup(site: Path, tmp_path: Path, pin_dir: str) -> None:
    cgroups.sweep_stale()
    expected = hashlib.sha256((site / "www" / "big.bin").read_bytes()).hexdigest()
    with cgroups.temporary("nginx") as cgroup:
        port_sendfile, port_plain = free_port(), free_port()
        proxy_pins = f"{pin_dir}-nginx"
        nginx = cgroups.spawn(cgroup, ["/usr/sbin/nginx", "-c", str(_nginx_conf(site, port_sendfile, port_plain)),
                                       "-e", str(site / "error.log")])
        try:
            _wait_port(port_sendfile)
            _wait_port(port_plain)
            assert nginx.pid in cgroups.pids(cgroup)
            listen_sendfile, listen_plain = free_port(), free_port()
            text = (configs.listener(f"127.0.0.1:{listen_sendfile}", "sendfile")
                    + configs.listener(f"127.0.0.1:{listen_plain}", "plain")
                    + configs.table("sendfile", [(NAME, f"127.0.0.1:{port_sendfile}")])
                    + configs.table("plain", [(NAME, f"127.0.0.1:{port_plain}")])
                    + configs.common(splice=True, pin_dir=proxy_pins, kernel_cache=False)
                    + f"shortcut_cgroup = {configs.toml_str(cgroup)}\n")
            config = tmp_path / "proxy.toml"
            config.write_text(text)
            proxy = ProxyProcess(config, tmp_path / "proxy.log")
            try:
                proxy.wait_for(lambda e: e.get("event") == "shortcut", timeout=60)
                [started] = [e for e in proxy.events() if e.get("event") == "shortcut"]
                assert started["enabled"] is True, started
                assert [p["name"] for p in bpftool_cgroup(cgroup)] == ["shortcut_ops"]
                proxy.wait_ready()
                for port in (listen_sendfile, listen_plain):
                    out = subprocess.run(
                        ["curl", "-sS", "--fail", "--cacert", str(site / "cert.pem"), "--resolve",
                         f"{NAME}:{port}:127.0.0.1", "-o", "-", f"https://{NAME}:{port}/big.bin"],
                        capture_output=True, timeout=120)
                    assert out.returncode == 0, out.stderr
                    assert len(out.stdout) == SIZE and hashlib.sha256(out.stdout).hexdigest() == expected
                events = proxy.wait_for(lambda e: e.get("event") == "access", count=2, timeout=30)
                stats = subprocess.run([sys.executable, "-m", "sniproxy", "stats", "--pin-dir", proxy_pins,
                                        "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
                assert stats.returncode == 0, stats.stderr
                short = json.loads(stats.stdout)["shortcut"]
            finally:
                assert proxy.stop() == 0, proxy.text()[-3000:]
            for event in events:
                # nginx is a non-blocking, edge-triggered server: captured, then kept on the loopback
                # path (a redirect into a full client buffer would leave it waiting for an EPOLLOUT
                # that never comes: before this fallback the first curl stopped at 49 MB and nginx
                # reset it after its 60 s send_timeout). Both transfers complete, byte-exact.
                assert event["shortcut"] is False, event
                assert "non-blocking backend" in event["shortcut_fallback"], event
                assert SIZE < event["bytes_down"] < SIZE * 1.01 and event["outcome"] == "closed", event
            assert short["totals"]["captured"] >= 2 and short["totals"]["fallbacks"] >= 2, short
            assert bpftool_cgroup(cgroup) == [], "shortcut_ops still attached after the proxy stopped"
            assert not os.path.exists(os.path.join(proxy_pins, "shortcut_conns"))
        finally:
            cgroups.stop(nginx)
            # The proxy (unprivileged by then) could unpin but not remove its directory.
            with contextlib.suppress(OSError):
                os.rmdir(proxy_pins)
