# The command line: `check` validates a file and names the bad key; `run` refuses a bad file cleanly.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
