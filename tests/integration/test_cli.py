# The command line: `check` validates a file and names the bad key; `run` refuses a bad file cleanly.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxyproc import REPO


def sniproxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sniproxy", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_check_accepts_the_shipped_config():
    result = sniproxy("check", "-c", str(REPO / "config.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_names_the_key_path_of_an_error(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    text = (REPO / "config.toml").read_text().replace('timeout = 2.0', 'timeout = "soon"')
    bad.write_text(text)
    result = sniproxy("check", "-c", str(bad))
    assert result.returncode == 2
    assert "resolver.timeout" in result.stderr


def test_check_rejects_unknown_keys(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "config.toml").read_text() + "\n[limits2]\nx = 1\n")
    result = sniproxy("check", "-c", str(bad))
    assert result.returncode == 2 and "limits2" in result.stderr


def test_run_with_a_broken_config_exits_non_zero_without_traceback(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[listener]]\nbind = '127.0.0.1:99999'\n")
    result = sniproxy("run", "-c", str(bad))
    assert result.returncode == 2
    assert "listener[0].bind" in result.stderr and "Traceback" not in result.stderr


def test_run_reports_a_taken_port_in_one_line(tmp_path: Path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[[listener]]\nbind = "127.0.0.1:{port}"\n[table.default]\nroutes = []\n'
                       '[resolver]\nkernel_cache = false\n[ebpf]\nsplice = false\n')
        result = sniproxy("run", "-c", str(cfg))
    assert result.returncode == 1
    assert '"start_failed"' in result.stdout and "Address already in use" in result.stdout


def test_check_accepts_and_rejects_the_routing_keys_of_issue_16(tmp_path: Path):
    good = tmp_path / "good.toml"
    base = (
        '[[listener]]\nbind = "127.0.0.1:8443"\n\n[table.default]\nroutes = [\n'
        '  { match = "a.test", alpn = "acme-tls/1", backend = "unix:/run/acme.sock", proxy_protocol = "v2" },\n'
        '  { match = "a.test", alpn = ["h2", "http/1.1"], backend = ["127.0.0.1:1", "127.0.0.1:2"] },\n'
        ']\nfallback = ["127.0.0.1:3", "unix:/run/fb.sock"]\n\n'
        '[backends]\nhold_down = 5\nhealth_check_interval = 2\nhealth_check_timeout = 1\n')
    good.write_text(base)
    result = sniproxy("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    for old, new, key_path in [
        ('alpn = "acme-tls/1"', 'alpn = ""', "table.default.routes[0].alpn"),
        ('alpn = ["h2", "http/1.1"]', 'alpn = ["h2", "h2"]', "table.default.routes[1].alpn[1]"),
        ('"127.0.0.1:2"]', '"*:2"]', "table.default.routes[1].backend[1]"),
        ('"unix:/run/acme.sock"', '"unix:run/acme.sock"', "table.default.routes[0].backend"),
        ('"unix:/run/fb.sock"]', '"127.0.0.1:3"]', "table.default.fallback[1]"),
        ("hold_down = 5", "hold_down = -5", "backends.hold_down"),
        ("health_check_interval = 2", "health_check_interval = 'often'", "backends.health_check_interval"),
        ("health_check_timeout = 1", "health_check_timeout = 3", "backends.health_check_timeout"),
    ]:
        bad = tmp_path / "bad.toml"
        assert old in base
        bad.write_text(base.replace(old, new))
        result = sniproxy("check", "-c", str(bad))
        assert result.returncode == 2, (new, result.stdout)
        assert f"{bad}: {key_path}: " in result.stderr, (new, result.stderr)


_HTTP_CONFIG = """
[[listener]]
bind = "127.0.0.1:8080"
protocol = "http"

[table.default]
routes = [{ match = "a.test", backend = "127.0.0.1:9080" }]

[limits]
http_head_timeout = 3.0
max_http_head_size = 8192
"""


def test_check_accepts_an_http_listener_and_its_limits(tmp_path: Path):
    good = tmp_path / "http.toml"
    good.write_text(_HTTP_CONFIG)
    result = sniproxy("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "1 listener(s)" in result.stdout


@pytest.mark.parametrize("old, new, key_path, reason", [
    ('protocol = "http"', 'protocol = "https"', "listener[0].protocol", "must be one of tls, http"),
    ("http_head_timeout = 3.0", "http_head_timeout = 0", "limits.http_head_timeout", "must be > 0"),
    ("max_http_head_size = 8192", "max_http_head_size = 64", "limits.max_http_head_size",
     "must be between 512 and 1048576"),
    ("max_http_head_size = 8192", 'max_http_head_size = "8k"', "limits.max_http_head_size",
     "expected an integer"),
])
def test_check_rejects_bad_http_keys_naming_them(tmp_path: Path, old, new, key_path, reason):
    bad = tmp_path / "bad.toml"
    assert old in _HTTP_CONFIG
    bad.write_text(_HTTP_CONFIG.replace(old, new))
    result = sniproxy("check", "-c", str(bad))
    assert result.returncode == 2
    assert f"{key_path}: {reason}" in result.stderr, result.stderr
