# Routes whose `$N` template builds an IP literal (issue 15, defect 9), end to end through the real
# proxy with real TLS: they route as nginx's map + proxy_pass would, the open-proxy guard applies to
# the built address, a name that builds no valid host lands on the fallback with its access event
# saying why, and `check` refuses templates that some accepted name turns into no valid host.
from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.test_cli import sniproxy
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who

LIT = r"~^ip(\d+)\.lit\.test$"


@pytest.fixture
async def lit_backends(ca):
    lit = await TlsBackend("lit", server_context(ca, "*.lit.test"), host="127.0.0.2").start()
    fallback = await TlsBackend("fallback", server_context(ca, "*.lit.test"), host="127.0.0.1").start()
    yield lit, fallback
    await lit.close()
    await fallback.close()


async def test_a_template_building_an_ip_literal_routes_to_it(lit_backends, ca, start_proxy, relay_mode):
    lit, fallback = lit_backends
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [(LIT, f"127.0.0.$1:{lit.port}")],
                                        fallback=f"127.0.0.1:{fallback.port}",
                                        allow_private=["127.0.0.0/8"])
                        + configs.common())
    ctx = client_context(ca)
    assert await who("127.0.0.1", port, "ip2.lit.test", ctx) == "backend=lit alpn=None"
    (event,) = await proxy.access()
    assert event["outcome"] == "closed" and event["route"] == LIT and event["backend_host"] == "127.0.0.2"
    assert event["backend"] == f"127.0.0.2:{lit.port}" and "route_skipped" not in event

    # 127.0.0.999 is no address: the fallback serves it, and the access event says why.
    assert await who("127.0.0.1", port, "ip999.lit.test", ctx) == "backend=fallback alpn=None"
    (_, event) = await proxy.access(count=2)
    assert event["route"] == "fallback" and event["outcome"] == "closed"
    assert len(event["route_skipped"]) == 1 and "'127.0.0.999'" in event["route_skipped"][0]


async def test_the_open_proxy_guard_applies_to_a_built_ip_literal(lit_backends, ca, start_proxy):
    lit, _ = lit_backends
    port = free_port()
    proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                        + configs.table("default", [(LIT, f"127.0.0.$1:{lit.port}")])
                        + configs.common())
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await who("127.0.0.1", port, "ip2.lit.test", client_context(ca))
    (event,) = await proxy.access()
    assert event["outcome"] == "backend_refused" and "127.0.0.2 is in 127.0.0.0/8" in event["reason"]
    assert lit.connections == 0


def test_check_accepts_ip_templates_and_refuses_ones_that_build_no_host(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text(configs.listener("127.0.0.1:8443")
                    + configs.table("default", [(LIT, "127.0.0.$1:443")]) + configs.common())
    result = sniproxy("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(configs.listener("127.0.0.1:8443")
                   + configs.table("default", [(r"~^(\w+)\.lit\.test$", "$1:443")]) + configs.common())
    result = sniproxy("check", "-c", str(bad))
    assert result.returncode == 2
    assert "table.default.routes[0].backend" in result.stderr
    assert "builds '1' from the name '1.lit.test'" in result.stderr
