#!/usr/bin/env python3
"""Packets per second dropped by the XDP allow-list versus the same allow-list as nftables rules.

A SYN flood from a denied source is generated with trafgen (netsniff-ng, PF_PACKET TX ring, one CPU)
in namespace G and sent over a veth pair to namespace T, where one filter at a time drops it:

  none         no filter: T's stack answers each SYN with a RST (the reference for the stack's cost)
  xdp-native   ebpf/xdp_filter.c through XdpAllowList, native mode on T's veth
  xdp-generic  the same program in generic (skb) mode
  nft-ingress  nftables netdev ingress hook: the earliest nftables hook, after the skb exists
  nft-input    nftables inet filter input hook: after IP receive and routing

Each mode floods for --seconds; the drop rate comes from the filter's own counter (xdp_stats, or the
nftables rule counter). On a veth the receive path runs in the sender's context, so a cheaper drop
lets the one generator CPU push more packets: the sent rate is part of the result. Everything runs in
namespaces this script creates and deletes (also on Ctrl-C); it needs root, BCC, nft and trafgen.

    .venv/bin/python bench/xdp_drop.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sniproxy.kernel.probe import probe  # noqa: E402
from sniproxy.kernel.xdp import XdpAllowList, parse_network  # noqa: E402

PORT = 8443
# The allow-list both filters enforce. The flood source (10.252.0.2) is outside it.
ALLOW4 = ["10.251.0.0/16", "127.0.0.0/8", "192.168.77.0/24"]
ALLOW6 = ["fd51::/16", "::1/128"]
T_ADDR, G_ADDR = "10.252.0.1", "10.252.0.2"
CLONE_NEWNET = 0x40000000


def sh(*argv: str, input: str | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """The calling thread in namespace `name` for the block (to attach XDP from inside it)."""
    libc = ct.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ct.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                os.abort()
    finally:
        os.close(own)
        os.close(target)


class Link:
    """Namespaces G (generator) and T (target) joined by a veth pair; close() deletes both."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.g, self.t = f"spbench-{pid}-g", f"spbench-{pid}-t"
        self.g_if, self.t_if = "g0", "t0"
        self.created: list[str] = []
        try:
            for ns in (self.g, self.t):
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.t, "link", "add", self.t_if, "type", "veth", "peer", "name", self.g_if,
               "netns", self.g)
            sh("ip", "-n", self.t, "addr", "add", f"{T_ADDR}/24", "dev", self.t_if)
            sh("ip", "-n", self.g, "addr", "add", f"{G_ADDR}/24", "dev", self.g_if)
            for ns, ifname in ((self.t, self.t_if), (self.g, self.g_if)):
                sh("ip", "-n", ns, "link", "set", ifname, "up")
            self.t_mac = json.loads(sh("ip", "-n", self.t, "-j", "link", "show", self.t_if))[0]["address"]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


def flood(link: Link, seconds: float, workdir: Path) -> int:
    """SYNs with random source ports from G to T's gated port for `seconds`; returns packets sent."""
    conf = workdir / "syn.trafgen"
    conf.write_text(f"{{ eth(da={link.t_mac}), ipv4(sa={G_ADDR}, da={T_ADDR}), "
                    f"tcp(sp=drnd(), dp={PORT}, syn) }}\n")
    # --no-sock-mem / --notouch-irq: trafgen must not retune the host's socket memory or IRQs.
    # Its own process group: trafgen forks a worker per CPU, and SIGINT must reach the worker too.
    proc = subprocess.Popen(["ip", "netns", "exec", link.g, "trafgen", "-o", link.g_if, "-i", str(conf),
                             "-P", "1", "--no-sock-mem", "--notouch-irq"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        time.sleep(seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    m = re.search(r"(\d+) packets outgoing", out)
    if m is None:
        raise RuntimeError(f"trafgen did not report its count:\n{out}")
    return int(m.group(1))


def nft_rules(family: str, hook: str, device: str) -> str:
    where = f'hook ingress device "{device}"' if hook == "ingress" else "hook input"
    return f"""
table {family} spbench {{
  set allow4 {{ type ipv4_addr; flags interval; elements = {{ {", ".join(ALLOW4)} }} }}
  set allow6 {{ type ipv6_addr; flags interval; elements = {{ {", ".join(ALLOW6)} }} }}
  chain gate {{
    type filter {where} priority 0; policy accept;
    ip saddr != @allow4 tcp dport {PORT} counter drop
    ip6 saddr != @allow6 tcp dport {PORT} counter drop
  }}
}}
"""


def nft_dropped(link: Link, family: str) -> int:
    doc = json.loads(sh("ip", "netns", "exec", link.t, "nft", "-j", "list", "table", family, "spbench"))
    total = 0
    for item in doc["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total


@contextlib.contextmanager
def mode_none(link: Link) -> Iterator[Callable[[], int]]:
    yield lambda: 0


def mode_xdp(xdp_mode: str) -> Callable[[Link], contextlib.AbstractContextManager[Callable[[], int]]]:
    @contextlib.contextmanager
    def run(link: Link) -> Iterator[Callable[[], int]]:
        pin = f"/sys/fs/bpf/sniproxy-bench-{os.getpid()}"
        gate = XdpAllowList.load(pin, [PORT], [parse_network(c) for c in ALLOW4 + ALLOW6])
        try:
            with netns(link.t):
                gate.attach(link.t_if, xdp_mode)
            yield lambda: gate.verdicts().dropped
        finally:
            gate.close()
    return run


def mode_nft(family: str, hook: str) -> Callable[[Link], contextlib.AbstractContextManager[Callable[[], int]]]:
    @contextlib.contextmanager
    def run(link: Link) -> Iterator[Callable[[], int]]:
        sh("ip", "netns", "exec", link.t, "nft", "-f", "-", input=nft_rules(family, hook, link.t_if))
        try:
            yield lambda: nft_dropped(link, family)
        finally:
            subprocess.run(["ip", "netns", "exec", link.t, "nft", "delete", "table", family, "spbench"],
                           capture_output=True)
    return run


MODES = {
    "none": mode_none,
    "xdp-native": mode_xdp("native"),
    "xdp-generic": mode_xdp("generic"),
    "nft-ingress": mode_nft("netdev", "ingress"),
    "nft-input": mode_nft("inet", "input"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="flood time per mode (default 3)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: "
                        + ", ".join(MODES))
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not 0.5 <= args.seconds <= 60:
        parser.error(f"unknown modes {unknown}" if unknown else "--seconds must be 0.5..60")
    missing = [tool for tool in ("trafgen", "nft", "ip") if shutil.which(tool) is None]
    if missing:
        print(f"xdp_drop: missing {', '.join(missing)} (run scripts/setup.sh as root)", file=sys.stderr)
        return 1
    support = probe()
    if not support.available:
        print(f"xdp_drop: {support.reason}", file=sys.stderr)
        return 1

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the namespaces are always deleted.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows = []
    link = Link()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in modes:
                with MODES[name](link) as dropped:
                    before = dropped()
                    start = time.monotonic()
                    sent = flood(link, args.seconds, Path(tmp))
                    elapsed = time.monotonic() - start
                    rows.append((name, sent / elapsed, (dropped() - before) / elapsed, dropped() - before, sent))
    finally:
        link.close()

    print(f"SYN flood from a denied source over veth, {args.seconds:g} s per mode, trafgen on 1 CPU, "
          f"{os.cpu_count()} CPUs, kernel {os.uname().release}")
    print(f"allow-list: {', '.join(ALLOW4 + ALLOW6)}; gated port {PORT}")
    # ns/pkt: the generator's one busy CPU also runs T's receive path (veth), so 1e9 / sent pps is the
    # whole cost of one packet: send, receive and the drop (or the RST, for "none").
    print(f"{'mode':<12} {'sent pps':>12} {'dropped pps':>12} {'dropped':>10} {'of sent':>8} {'ns/pkt':>7}")
    for name, sent_pps, drop_pps, dropped_n, sent in rows:
        share = f"{dropped_n / sent:.1%}" if sent else "-"
        ns = f"{1e9 / sent_pps:,.0f}" if sent_pps else "-"
        print(f"{name:<12} {sent_pps:>12,.0f} {drop_pps:>12,.0f} {dropped_n:>10,} {share:>8} {ns:>7}")
    by = {r[0]: r[2] for r in rows}
    for xdp_name in ("xdp-native", "xdp-generic"):
        for nft_name in ("nft-ingress", "nft-input"):
            if by.get(xdp_name) and by.get(nft_name):
                print(f"{xdp_name} / {nft_name}: {by[xdp_name] / by[nft_name]:.2f}x dropped pps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
