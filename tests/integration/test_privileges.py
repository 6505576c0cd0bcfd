# After start the proxy holds no capability at all and runs as [server] user, and still relays (in
# splice mode too: map updates go through descriptors it opened while privileged).
from __future__ import annotations

import os
import pwd
import subprocess
import sys

from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who


def capabilities(pid: int) -> dict[str, int]:
    caps = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Cap"):
            name, value = line.split(":")
            caps[name] = int(value, 16)
    return caps


async def test_running_proxy_has_dropped_every_capability(ca, start_proxy, relay_mode):
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    try:
        port = free_port()
        proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                            + configs.table("default", [("app.test", f"127.0.0.1:{backend.port}")])
                            + configs.common())
        caps = capabilities(proxy.proc.pid)
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == caps["CapAmb"] == 0, caps
        assert caps["CapBnd"] == 0, caps
        (dropped,) = await proxy.until(lambda e: e.get("event") == "capabilities_dropped")
        assert dropped["after"] == "0x0" and dropped["before"] != "0x0"
        for _ in range(3):
            assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
        events = await proxy.access(count=3)
        assert {e["relay"] for e in events} == {proxy.expected_relay}
    finally:
        await backend.close()


def status_fields(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def test_started_as_root_every_process_runs_as_the_configured_user(ca, start_proxy, relay_mode):
    """[server] user (default sniproxy): started as root, the supervisor and its workers all end as
    that user, with no capability and no_new_privs, and still relay (splice included: the BPF objects
    were loaded before the switch). pin_dir is theirs, so they unpin it at stop without privileges."""
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    try:
        port = free_port()
        proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                            + configs.table("default", [("app.test", f"127.0.0.1:{backend.port}")])
                            + configs.common() + "\n[server]\nworkers = 2\n")
        await proxy.until(lambda e: e.get("event") == "workers_started")
        user = pwd.getpwnam("sniproxy")
        pids = [proxy.proc.pid, *children(proxy.proc.pid)]
        assert len(pids) == 3, pids
        for pid in pids:
            status = status_fields(pid)
            assert status["Uid"].split() == [str(user.pw_uid)] * 4, (pid, status["Uid"])
            assert status["Gid"].split() == [str(user.pw_gid)] * 4, (pid, status["Gid"])
            assert status["Groups"].split() == [], (pid, status["Groups"])
            assert status["NoNewPrivs"].strip() == "1", pid
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
        (dropped,) = await proxy.until(lambda e: e.get("event") == "capabilities_dropped")
        assert (dropped["user"], dropped["uid"], dropped["no_new_privs"]) == ("sniproxy", user.pw_uid, True)
        for _ in range(4):
            assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
        events = await proxy.access(count=4)
        assert {e["relay"] for e in events} == {proxy.expected_relay}
        pin_dir = _pin_dir(proxy) if relay_mode == "splice" else None  # nocap: nothing pinned
        if pin_dir is not None:
            assert os.stat(pin_dir).st_uid == user.pw_uid
        assert proxy.stop() == 0
        if pin_dir is not None:  # unpinned by the unprivileged processes (the DNS cache stays, on purpose)
            assert set(os.listdir(pin_dir)) <= {"dns_cache"}, os.listdir(pin_dir)
    finally:
        await backend.close()


def _pin_dir(proxy) -> str | None:
    for line in proxy.config_path.read_text().splitlines():
        if line.startswith("pin_dir"):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def test_an_unknown_user_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(configs.listener(f"127.0.0.1:{free_port()}") + configs.table("default", [("a.test", "127.0.0.1:9")])
                   + configs.common() + '\n[server]\nuser = "no-such-user-here"\n')
    res = subprocess.run([sys.executable, "-m", "sniproxy", "run", "-c", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res
    assert "server.user: no user 'no-such-user-here' on this system" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


async def test_user_root_keeps_uid_0_without_capabilities(ca, start_proxy):
    """user = "root" opts out of the switch (documented as not recommended): still no capability."""
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    try:
        port = free_port()
        proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                            + configs.table("default", [("app.test", f"127.0.0.1:{backend.port}")])
                            + configs.common() + '\n[server]\nuser = "root"\n')
        status = status_fields(proxy.proc.pid)
        assert status["Uid"].split() == ["0"] * 4 and int(status["CapEff"], 16) == 0, status
        assert status["NoNewPrivs"].strip() == "1"
        assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
    finally:
        await backend.close()
