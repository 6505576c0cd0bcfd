"""The XDP allow-list on real interfaces: the proxy runs in network namespace P, joined by veth pairs
to an allowed host A and a denied host D (namespaces this module creates and deletes). Real TLS through
the real proxy process, real SYNs dropped by the real program, counters checked against the denied
host's own TCP statistics, SIGHUP replacing the list in place, SIGKILL leaving nothing attached, and
`sniproxy allow` editing the live list.

The proxy is started with `nsenter --net=...` rather than `ip netns exec`: the latter also gives the
process a private mount namespace without /sys/fs/bpf, so its pins would be invisible to the test and
to the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from sniproxy.kernel import xdp
from sniproxy.kernel.errors import KernelError
from sniproxy.kernel.probe import probe
from sniproxy.kernel.xdp import PinnedAllowList, XdpAllowList, parse_network
from tests.support.backends import TlsBackend, client_context, server_context
from tests.support.configs import common, listener, table, toml_str
from tests.support.netns import netns, sh
from tests.support.pins import remove_pin_dir
from tests.support.tun_peer import internet_checksum
from tests.support.proxyproc import REPO, ProxyProcess

PROXY_PORT = 8443
OTHER_PORT = 9000
BACKEND_PORT = 9443
SNI = "app.xdp.test"


@dataclasses.dataclass(frozen=True)
class Host:
    ns: str
    v4: str
    v6: str
    proxy_v4: str  # P's address on this host's link
    proxy_v6: str
    p_if: str  # P's end of the veth
    net_v4: str
    net_v6: str


class Topology:
    """P <-veth-> A (10.251.1.0/24, fd51:1::/64) and P <-veth-> D (10.251.2.0/24, fd51:2::/64).
    All names carry the pid and a tag, so parallel runs never collide; destroy() deletes every
    namespace (and with them the veths and any XDP link on them)."""

    def __init__(self, tag: str) -> None:
        pid = os.getpid()
        self.p = f"spx-{tag}{pid}-p"
        self.namespaces = [self.p]
        self.hosts: dict[str, Host] = {}
        try:
            sh("ip", "netns", "add", self.p)
            sh("ip", "-n", self.p, "link", "set", "lo", "up")
            for i, name in enumerate(("a", "d"), start=1):
                self.hosts[name] = self._host(tag, name, i)
            # The denied host gives up a connect after 3 s (tcp_syn_retries = 1), not after ~2 min.
            sh("ip", "netns", "exec", self.hosts["d"].ns, "sh", "-c",
               "echo 1 > /proc/sys/net/ipv4/tcp_syn_retries")
        except BaseException:
            self.destroy()
            raise

    def _host(self, tag: str, name: str, i: int) -> Host:
        pid = os.getpid()
        ns = f"spx-{tag}{pid}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        p_if, h_if = f"x{tag}{pid}{name}", f"y{tag}{pid}{name}"
        host = Host(ns, f"10.251.{i}.2", f"fd51:{i}::2", f"10.251.{i}.1", f"fd51:{i}::1", p_if,
                    f"10.251.{i}.0/24", f"fd51:{i}::/64")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.p, "link", "add", p_if, "type", "veth", "peer", "name", h_if, "netns", ns)
        for where, ifname, v4, v6 in ((self.p, p_if, host.proxy_v4, host.proxy_v6),
                                      (ns, h_if, host.v4, host.v6)):
            sh("ip", "-n", where, "addr", "add", f"{v4}/24", "dev", ifname)
            sh("ip", "-n", where, "addr", "add", f"{v6}/64", "dev", ifname, "nodad")
            sh("ip", "-n", where, "link", "set", ifname, "up")
        return host

    @property
    def interfaces(self) -> list[str]:
        return [h.p_if for h in self.hosts.values()]

    def xdp_prog(self, ifname: str) -> dict | None:
        """The `xdp` object `ip -d link` shows for P's interface, or None when nothing is attached."""
        out = json.loads(sh("ip", "-n", self.p, "-j", "-d", "link", "show", "dev", ifname).stdout)
        return out[0].get("xdp")

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def tcp_snmp(ns: str) -> dict[str, int]:
    """The Tcp line of /proc/net/snmp as the namespace's own kernel counts it."""
    lines = [line.split() for line in sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").stdout
             .splitlines() if line.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def connect(ns: str, host: str, port: int, timeout: float) -> None:
    """A plain TCP connect from inside ns; raises TimeoutError (or OSError) when it does not complete."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))


def connect_until_kernel_gives_up(ns: str, host: str, port: int) -> None:
    """Block until the kernel abandons the connect after its SYN retries (ETIMEDOUT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(30)
        with pytest.raises(OSError) as info:
            sock.connect((host, port))
        assert info.value.errno == errno.ETIMEDOUT, info.value


def tls_who(ns: str, host: str, port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with ctx.wrap_socket(sock, server_hostname=SNI, do_handshake_on_connect=True) as tls:
        tls.connect((host, port))
        tls.sendall(b"WHO\n")
        line = tls.makefile("rb").readline().decode().strip()
        tls.sendall(b"QUIT\n")
        return line


def ping(ns: str, dst: str, timeout: float = 2.0) -> bool:
    """One ICMP / ICMPv6 echo from inside ns over a raw socket; True when the reply came back."""
    v6 = ":" in dst
    ident = random.randrange(1, 0xFFFF)
    with netns(ns):
        sock = (socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) if v6
                else socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    with sock:
        sock.settimeout(timeout)
        body = struct.pack("!HH", ident, 1) + b"xdp-test"
        if v6:  # the kernel fills in the ICMPv6 checksum for raw sockets
            sock.sendto(struct.pack("!BBH", 128, 0, 0) + body, (dst, 0))
        else:
            sock.sendto(struct.pack("!BBH", 8, 0, internet_checksum(b"\x08\x00\x00\x00" + body)) + body, (dst, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                return False
            icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
            if icmp[0] == (129 if v6 else 0) and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
        return False


def udp_roundtrip(src_ns: str, dst_ns: str, dst: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns(dst_ns):
        server = socket.socket(family, socket.SOCK_DGRAM)
    with netns(src_ns):
        client = socket.socket(family, socket.SOCK_DGRAM)
    with server, client:
        server.bind((dst, port))
        server.settimeout(2.0)
        client.sendto(b"not tcp", (dst, port))
        return server.recv(64) == b"not tcp"


def neigh_flush(ns: str) -> None:
    sh("ip", "-n", ns, "neigh", "flush", "all")


# --------------------------------------------------------------------------------------------------
# The proxy in P


def proxy_config(topo: Topology, pin_dir: str, allow: list[str], mode: str = "auto",
                 interfaces: list[str] | None = None) -> str:
    return (listener(f"0.0.0.0:{PROXY_PORT}") + listener(f"[::]:{PROXY_PORT}")
            + table("default", [(SNI, f"127.0.0.1:{BACKEND_PORT}")])
            + common(splice=False, pin_dir=pin_dir)
            + "\n[xdp]\nenabled = true\n"
            + f"interfaces = [{', '.join(toml_str(i) for i in (interfaces or topo.interfaces))}]\n"
            + f"mode = {toml_str(mode)}\n"
            + f"allow = [{', '.join(toml_str(c) for c in allow)}]\n")


def start_proxy(topo: Topology, directory: Path, name: str, config: str) -> ProxyProcess:
    path = directory / f"{name}.toml"
    path.write_text(config)
    return ProxyProcess(path, directory / f"{name}.log", argv_prefix=["nsenter", f"--net=/run/netns/{topo.p}"])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sniproxy", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def assert_pins_gone(pin_dir: str) -> None:
    assert not os.path.exists(pin_dir) or not set(os.listdir(pin_dir)) & set(xdp.PINNED_MAPS), \
        f"{pin_dir} still has {os.listdir(pin_dir)}"


@pytest.fixture(scope="module")
def kernel_ok() -> None:
    support = probe()
    assert support.available, f"kernel data plane unavailable here: {support.reason}"


@pytest.fixture(scope="module")
def topo(kernel_ok: None) -> Iterator[Topology]:
    t = Topology("m")
    try:
        yield t
    finally:
        t.destroy()


@pytest.fixture(scope="module")
def pin_dir() -> Iterator[str]:
    path = f"/sys/fs/bpf/sniproxy-test-xdpn-{os.getpid()}"
    yield path
    remove_pin_dir(path)  # the proxy unpinned its maps (asserted in `proxy`), not the directory


@pytest.fixture(scope="module")
def allow() -> list[str]:
    return ["10.251.1.0/24", "fd51:1::/64"]


@pytest.fixture(scope="module")
def proxy(topo: Topology, pin_dir: str, allow: list[str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp("xdp-proxy")
    proc = start_proxy(topo, directory, "proxy", proxy_config(topo, pin_dir, allow))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        for ifname in topo.interfaces:
            assert topo.xdp_prog(ifname) is None, f"XDP still attached to {ifname} after stop"
        assert_pins_gone(pin_dir)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def backend(topo: Topology, ca: trustme.CA) -> Iterator[TlsBackend]:
    """The TLS backend the proxy routes SNI to, listening on P's loopback."""
    with netns(topo.p):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", BACKEND_PORT))
    b = TlsBackend("ns-backend", server_context(ca, SNI), port=BACKEND_PORT)
    b.server = await asyncio.start_server(b._serve, sock=sock, ssl=b.context)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def other_port(topo: Topology) -> Iterator[None]:
    """Listeners in P on a port the filter does not gate (v4 and v6)."""
    socks = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with netns(topo.p):
            s = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, OTHER_PORT))
        s.listen(16)
        socks.append(s)
    try:
        yield
    finally:
        for s in socks:
            s.close()


def verdicts(pin_dir: str) -> dict[str, int]:
    with PinnedAllowList(pin_dir) as pinned:
        return pinned.verdicts().as_dict()


def rewrite_and_reload(proxy: ProxyProcess, topo: Topology, pin_dir: str, allow: list[str]) -> None:
    proxy.config_path.write_text(proxy_config(topo, pin_dir, allow))
    proxy.signal(signal.SIGHUP)


# --------------------------------------------------------------------------------------------------
# Tests against the module's proxy


async def test_attached_natively_to_every_interface(proxy: ProxyProcess, topo: Topology):
    event = proxy.wait_for(lambda e: e.get("event") == "xdp_attached")[0]
    assert event["interfaces"] == {ifname: "native" for ifname in topo.interfaces}  # mode "auto" on veth
    assert event["ports"] == [PROXY_PORT]
    for ifname in topo.interfaces:
        assert topo.xdp_prog(ifname)["prog"]["name"] == xdp.PROG_NAME


async def test_allowed_host_completes_tls_v4_and_v6(proxy: ProxyProcess, topo: Topology, backend,
                                                    ca: trustme.CA, pin_dir: str):
    a = topo.hosts["a"]
    before = verdicts(pin_dir)
    for host in (a.proxy_v4, a.proxy_v6):
        line = await asyncio.to_thread(tls_who, a.ns, host, PROXY_PORT, client_context(ca))
        assert line.startswith("backend=ns-backend"), line
    after = verdicts(pin_dir)
    assert after["passed"] > before["passed"]
    assert after["dropped"] == before["dropped"]
    clients = {e["client"].rsplit(":", 1)[0].strip("[]") for e in await proxy.access(count=2)}
    assert {a.v4, a.v6} <= clients


async def test_denied_host_syn_dropped_but_everything_else_passes(proxy: ProxyProcess, topo: Topology,
                                                                  backend, other_port: None):
    d = topo.hosts["d"]
    for host in (d.proxy_v4, d.proxy_v6):
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(connect, d.ns, host, PROXY_PORT, 1.5)
    # Same host, another port: reachable, right after forgetting the neighbours, so ARP and IPv6
    # neighbour discovery had to pass too.
    neigh_flush(d.ns)
    neigh_flush(topo.p)
    for host in (d.proxy_v4, d.proxy_v6):
        await asyncio.to_thread(connect, d.ns, host, OTHER_PORT, 3.0)
    for host in (d.proxy_v4, d.proxy_v6):
        assert await asyncio.to_thread(ping, d.ns, host), f"no echo reply from {host}"
        # UDP to the gated port number is not TCP: it passes.
        assert await asyncio.to_thread(udp_roundtrip, d.ns, topo.p, host, PROXY_PORT)
    assert not [e for e in proxy.access_events() if e["client"].startswith(("10.251.2.", "[fd51:2:"))]


async def test_drop_counter_equals_the_syns_the_denied_host_sent(proxy: ProxyProcess, topo: Topology):
    d = topo.hosts["d"]
    snmp_before, before = tcp_snmp(d.ns), verdicts(proxy_pin(proxy))
    await asyncio.gather(*(asyncio.to_thread(connect_until_kernel_gives_up, d.ns, host, PROXY_PORT)
                           for host in (d.proxy_v4, d.proxy_v6)))
    snmp_after, after = tcp_snmp(d.ns), verdicts(proxy_pin(proxy))
    # Every SYN D sent: one per connect attempt plus each retransmission, by D's own kernel's count.
    syns = (snmp_after["ActiveOpens"] - snmp_before["ActiveOpens"]
            + snmp_after["RetransSegs"] - snmp_before["RetransSegs"])
    # 2 connects, each 1 SYN + its retransmissions. With tcp_syn_retries = 1 the kernel gives up after
    # 3 s; 6.18 sends SYNs at 0 s, 1 s and (the clamped last timer) 3 s, older kernels only the first two.
    assert syns in (4, 6), syns
    assert after["dropped"] - before["dropped"] == syns


def proxy_pin(proxy: ProxyProcess) -> str:
    for line in proxy.config_path.read_text().splitlines():
        if line.startswith("pin_dir"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no pin_dir in the proxy's config")


async def test_sighup_adding_the_denied_range_lets_it_in_without_restart(
        proxy: ProxyProcess, topo: Topology, backend, ca: trustme.CA, pin_dir: str, allow: list[str]):
    d = topo.hosts["d"]
    prog_ids = {i: topo.xdp_prog(i)["prog"]["id"] for i in topo.interfaces}
    replaced = len([e for e in proxy.events() if e.get("event") == "xdp_allow_replaced"])
    try:
        rewrite_and_reload(proxy, topo, pin_dir, [*allow, d.net_v4, d.net_v6])
        event = (await proxy.until(lambda e: e.get("event") == "xdp_allow_replaced", count=replaced + 1))[-1]
        assert event["added"] == [d.net_v4, d.net_v6] and event["removed"] == []
        for host in (d.proxy_v4, d.proxy_v6):
            line = await asyncio.to_thread(tls_who, d.ns, host, PROXY_PORT, client_context(ca))
            assert line.startswith("backend=ns-backend"), line
    finally:
        rewrite_and_reload(proxy, topo, pin_dir, allow)
        await proxy.until(lambda e: e.get("event") == "xdp_allow_replaced", count=replaced + 2)
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(connect, d.ns, d.proxy_v4, PROXY_PORT, 1.5)
    # In place: same process, same programs, never detached.
    assert proxy.proc.poll() is None
    assert {i: topo.xdp_prog(i)["prog"]["id"] for i in topo.interfaces} == prog_ids
    assert not [e for e in proxy.events() if e.get("event") == "xdp_detached"]


async def test_reloads_never_drop_the_allowed_host(proxy: ProxyProcess, topo: Topology, pin_dir: str,
                                                   allow: list[str]):
    """Ten SIGHUPs swapping the list while A keeps connecting: each connect completes on its first SYN
    (a dropped SYN would be retried only after 1 s), and the drop counter does not move."""
    a = topo.hosts["a"]
    lists = [[*allow, "192.0.2.0/24"], [a.net_v4, "198.51.100.0/24", a.net_v6]]
    reloads = len([e for e in proxy.events() if e.get("event") == "reloaded"])
    replaced = len([e for e in proxy.events() if e.get("event") == "xdp_allow_replaced"])
    before = verdicts(pin_dir)
    stop = asyncio.Event()

    async def hammer() -> int:
        n = 0
        while not stop.is_set():
            for host in (a.proxy_v4, a.proxy_v6):
                await asyncio.to_thread(connect, a.ns, host, PROXY_PORT, 0.9)
                n += 1
            await asyncio.sleep(0.01)
        return n

    task = asyncio.create_task(hammer())
    try:
        for i in range(10):
            rewrite_and_reload(proxy, topo, pin_dir, lists[i % 2])
            await proxy.until(lambda e: e.get("event") == "reloaded", count=reloads + i + 1)
    finally:
        stop.set()
        connects = await task
        rewrite_and_reload(proxy, topo, pin_dir, allow)
        await proxy.until(lambda e: e.get("event") == "reloaded", count=reloads + 11)
    assert connects >= 10
    assert len([e for e in proxy.events() if e.get("event") == "xdp_allow_replaced"]) == replaced + 11
    assert verdicts(pin_dir)["dropped"] == before["dropped"]


async def test_sighup_adding_a_listener_on_an_ungated_port_is_refused(
        proxy: ProxyProcess, topo: Topology, pin_dir: str, allow: list[str]):
    """The filter's ports are fixed when it attaches: a new listener there would take clients from
    outside the allow-list, so the reload is refused as a whole and nothing listens on that port."""
    failed = len([e for e in proxy.events() if e.get("event") == "reload_failed"])
    reloads = len([e for e in proxy.events() if e.get("event") == "reloaded"])
    try:
        proxy.config_path.write_text(proxy_config(topo, pin_dir, allow).replace(
            "[table.default]", listener(f"0.0.0.0:{OTHER_PORT + 1}") + "[table.default]"))
        proxy.signal(signal.SIGHUP)
        event = (await proxy.until(lambda e: e.get("event") == "reload_failed", count=failed + 1))[-1]
        assert event["error"] == (f"listener 0.0.0.0:{OTHER_PORT + 1}: port {OTHER_PORT + 1} is not "
                                  f"among the ports the running XDP filter gates ([{PROXY_PORT}]); "
                                  "restart to add it")
        a = topo.hosts["a"]
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(connect, a.ns, a.proxy_v4, OTHER_PORT + 1, 2.0)
    finally:
        rewrite_and_reload(proxy, topo, pin_dir, allow)
        await proxy.until(lambda e: e.get("event") == "reloaded", count=reloads + 1)


async def test_cli_edits_the_live_list_and_says_config_is_untouched(
        proxy: ProxyProcess, topo: Topology, pin_dir: str, allow: list[str]):
    d = topo.hosts["d"]
    config_before = proxy.config_path.read_bytes()
    listed = cli("allow", "--pin-dir", pin_dir, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == allow
    assert "dropped=" in listed.stderr and "warning" not in listed.stderr
    # Options after the action work too (issue 15: `allow list -c FILE` was refused).
    for options in (["-c", str(proxy.config_path)], ["--pin-dir", pin_dir]):
        after = cli("allow", "list", *options)
        assert after.returncode == 0 and after.stdout.split() == allow, after.stderr

    added = cli("allow", "-c", str(proxy.config_path), "add", d.net_v4)
    assert added.returncode == 0, added.stderr
    assert f"added {d.net_v4}" in added.stdout and "not changed" in added.stdout
    await asyncio.to_thread(connect, d.ns, d.proxy_v4, PROXY_PORT, 2.0)

    removed = cli("allow", "--pin-dir", pin_dir, "del", d.net_v4)
    assert removed.returncode == 0, removed.stderr
    assert "not changed" in removed.stdout
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(connect, d.ns, d.proxy_v4, PROXY_PORT, 1.5)

    assert cli("allow", "--pin-dir", pin_dir, "del", d.net_v4).returncode == 1  # not there
    bad = cli("allow", "--pin-dir", pin_dir, "add", "10.0.0.1/8")
    assert bad.returncode == 2 and "host bits" in bad.stderr
    # The last entry is only removed with --force.
    assert cli("allow", "--pin-dir", pin_dir, "del", allow[1]).returncode == 0
    last = cli("allow", "--pin-dir", pin_dir, "del", allow[0])
    assert last.returncode == 1 and "last entry" in last.stderr
    assert cli("allow", "--pin-dir", pin_dir, "add", allow[1]).returncode == 0
    assert cli("allow", "--pin-dir", pin_dir, "list").stdout.split() == allow
    assert proxy.config_path.read_bytes() == config_before


# --------------------------------------------------------------------------------------------------
# Crashes, stale and foreign programs: each on its own namespaces


@pytest.fixture
def own_topo(kernel_ok: None) -> Iterator[Topology]:
    t = Topology("k")
    try:
        yield t
    finally:
        t.destroy()


@pytest.fixture
def own_pin() -> Iterator[str]:
    path = f"/sys/fs/bpf/sniproxy-test-xdpk-{os.getpid()}"
    yield path
    remove_pin_dir(path)  # a SIGKILLed proxy cannot clean up after itself


def test_sigkill_leaves_no_filter_and_the_next_start_takes_over(own_topo: Topology, own_pin: str,
                                                                tmp_path: Path):
    config = proxy_config(own_topo, own_pin, [own_topo.hosts["a"].net_v4], mode="generic")
    first = start_proxy(own_topo, tmp_path, "first", config)
    try:
        first.wait_ready()
        for ifname in own_topo.interfaces:
            assert own_topo.xdp_prog(ifname)["prog"]["name"] == xdp.PROG_NAME
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    # The links died with the process: nothing is attached any more.
    for ifname in own_topo.interfaces:
        assert own_topo.xdp_prog(ifname) is None
    # Its pins are left behind; the CLI says nothing uses them.
    stale = cli("allow", "--pin-dir", own_pin, "list")
    assert stale.returncode == 0 and "no running XDP filter" in stale.stderr
    second = start_proxy(own_topo, tmp_path, "second", config)
    try:
        second.wait_ready()
        event = second.wait_for(lambda e: e.get("event") == "xdp_attached")[0]
        assert event["interfaces"] == {i: "generic" for i in own_topo.interfaces}
        assert "warning" not in cli("allow", "--pin-dir", own_pin, "list").stderr
        with pytest.raises(TimeoutError):
            connect(own_topo.hosts["d"].ns, own_topo.hosts["d"].proxy_v4, PROXY_PORT, 1.5)
    finally:
        assert second.stop() == 0
    for ifname in own_topo.interfaces:
        assert own_topo.xdp_prog(ifname) is None
    assert_pins_gone(own_pin)


def _netlink_attach(topo: Topology, ifname: str, prog_fd: int) -> None:
    """Attach the legacy way (netlink), which outlives the process that did it."""
    with netns(topo.p):
        res = xdp._libbpf().bpf_xdp_attach(socket.if_nametoindex(ifname), prog_fd,
                                            xdp.XDP_FLAGS_SKB_MODE, None)
    assert res == 0, os.strerror(-res)


def test_start_replaces_a_stale_netlink_attached_filter(own_topo: Topology, own_pin: str, tmp_path: Path):
    ifname = own_topo.hosts["a"].p_if
    stale = XdpAllowList.load(f"{own_pin}-stale", [PROXY_PORT], [parse_network("192.0.2.0/24")])
    try:
        _netlink_attach(own_topo, ifname, stale.prog_fd)
    finally:
        stale.close()  # the netlink attachment keeps the program alive, as after a crash
    stale_id = own_topo.xdp_prog(ifname)["prog"]["id"]
    proxy = start_proxy(own_topo, tmp_path, "proxy",
                        proxy_config(own_topo, own_pin, [own_topo.hosts["a"].net_v4]))
    try:
        proxy.wait_ready()
        warning = proxy.wait_for(lambda e: e.get("event") == "xdp_replaced_stale")[0]
        assert warning["interface"] == ifname and str(stale_id) in warning["program"]
        assert own_topo.xdp_prog(ifname)["prog"]["id"] != stale_id
        connect(own_topo.hosts["a"].ns, own_topo.hosts["a"].proxy_v4, PROXY_PORT, 2.0)
    finally:
        assert proxy.stop() == 0
    assert own_topo.xdp_prog(ifname) is None


FOREIGN = textwrap.dedent("""
    #include <uapi/linux/bpf.h>
    int other_filter(struct xdp_md *ctx) { return XDP_PASS; }
""").encode()


def test_a_foreign_xdp_program_is_never_replaced(own_topo: Topology, own_pin: str, tmp_path: Path):
    from bcc import BPF

    ifname = own_topo.hosts["a"].p_if
    foreign = BPF(text=FOREIGN)
    fn = foreign.load_func(b"other_filter", BPF.XDP)
    try:
        _netlink_attach(own_topo, ifname, fn.fd)
        proxy = start_proxy(own_topo, tmp_path, "proxy",
                            proxy_config(own_topo, own_pin, [own_topo.hosts["a"].net_v4]))
        assert proxy.proc.wait(60) == 1
        proxy.stop()
        failed = [e for e in proxy.events() if e.get("event") == "start_failed"]
        assert failed and "other_filter" in failed[0]["error"], proxy.text()
        assert own_topo.xdp_prog(ifname)["prog"]["name"] == "other_filter"
        # All or nothing: the interface that was free got no filter either, and nothing is pinned.
        assert own_topo.xdp_prog(own_topo.hosts["d"].p_if) is None
        assert_pins_gone(own_pin)
    finally:
        with netns(own_topo.p):
            xdp._libbpf().bpf_xdp_detach(socket.if_nametoindex(ifname), xdp.XDP_FLAGS_SKB_MODE, None)
        foreign.cleanup()


def test_missing_interface_stops_the_start(own_topo: Topology, own_pin: str, tmp_path: Path):
    proxy = start_proxy(own_topo, tmp_path, "proxy",
                        proxy_config(own_topo, own_pin, ["10.0.0.0/8"], interfaces=["nosuchif0"]))
    assert proxy.proc.wait(60) == 1
    proxy.stop()
    failed = [e for e in proxy.events() if e.get("event") == "start_failed"]
    assert failed and "nosuchif0" in failed[0]["error"], proxy.text()
    assert_pins_gone(own_pin)


def test_attach_detach_is_idempotent(own_topo: Topology, own_pin: str):
    ifname = own_topo.hosts["a"].p_if
    gate = XdpAllowList.load(own_pin, [PROXY_PORT], [parse_network("10.0.0.0/8")])
    try:
        with netns(own_topo.p):
            attachment = gate.attach(ifname, "native")
            with pytest.raises(KernelError, match="held by a live bpf_link"):
                gate.attach(ifname, "generic")  # a second link on the same interface
            with pytest.raises(KernelError, match="does not exist"):
                gate.attach("nosuchif0")
            with pytest.raises(KernelError, match="unknown XDP mode"):
                gate.attach(ifname, "offload")
        assert attachment.mode == "native"
        assert own_topo.xdp_prog(ifname)["prog"]["name"] == xdp.PROG_NAME
        gate.detach(attachment)
        assert own_topo.xdp_prog(ifname) is None
        with netns(own_topo.p):
            gate.attach(ifname, "generic")
        assert own_topo.xdp_prog(ifname) is not None
    finally:
        gate.close()
        gate.close()
    assert own_topo.xdp_prog(ifname) is None
    assert not os.path.exists(own_pin)
