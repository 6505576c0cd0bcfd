# After start the proxy holds no capability at all, and still relays (in splice mode too: map updates
# go through descriptors it opened while privileged).
from __future__ import annotations

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
